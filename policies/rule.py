"""What a routing rule is, in the manner of the Kubernetes scheduler framework: filter rules remove
clusters, score rules rank the rest (normalised to 0-100 and weighted by the configuration; the
engine sums them), adjust rules act on the chosen cluster. Each returns a small result object: a
Check (Check.ok / Check.reject), a Score, a list of Actions; the engine turns them into the
decision's verdicts.

The rules themselves live in filters.py, scores.py and adjustments.py; registry.py names them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from greend import quantities as q

if TYPE_CHECKING:
    from .site import PartitionSpec

PLUGIN_GROUP = "greend.rules"

Reason = str | Callable[[], str]
"""A reason is a string, or a function returning one: then only called when the explanation is
read, which keeps a busy router fast without losing any explanation."""


class Params(BaseModel):
    """Base of a rule's parameters: unknown keys are errors.

    Built lazily (defer_build): a rule's validator is only made when a configuration names it, so
    `greend route` does not pay for the rules it does not use.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


def _dur(v):
    if v is None:
        return None
    q.parse_duration(v)
    return v


def _mem(v):
    if v is None:
        return None
    q.parse_memory_mb(v)
    return v


# -- what rules return ---------------------------------------------------------------------------
@dataclass(slots=True)
class Check:
    """A filter's answer for one cluster; `partition`: the partition the filter chose there."""

    passes: bool
    reason: Reason
    numbers: dict[str, Any] = field(default_factory=dict)
    partition: PartitionSpec | None = None

    @classmethod
    def ok(cls, reason: Reason, numbers: dict[str, Any] | None = None, *,
           partition: PartitionSpec | None = None) -> Check:
        return cls(True, reason, {} if numbers is None else numbers, partition)

    @classmethod
    def reject(cls, reason: Reason, numbers: dict[str, Any] | None = None) -> Check:
        return cls(False, reason, {} if numbers is None else numbers)


@dataclass(slots=True)
class Score:
    """A score rule's raw value for one cluster (None: unknown), before normalisation."""

    raw: float | None
    reason: Reason
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Action:
    """One step of an adjust rule on the plan: its verdict (ok, skip, warn, nice, defer, refuse,
    advice), reason and numbers."""

    verdict: str
    reason: Reason
    numbers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def ok(cls, reason: Reason, numbers: dict[str, Any] | None = None) -> Action:
        return cls("ok", reason, numbers or {})

    @classmethod
    def skip(cls, reason: Reason, numbers: dict[str, Any] | None = None) -> Action:
        return cls("skip", reason, numbers or {})

    @classmethod
    def warn(cls, reason: Reason, numbers: dict[str, Any] | None = None) -> Action:
        return cls("warn", reason, numbers or {})

    @classmethod
    def nice(cls, reason: Reason, numbers: dict[str, Any] | None = None) -> Action:
        return cls("nice", reason, numbers or {})

    @classmethod
    def defer(cls, reason: Reason, numbers: dict[str, Any] | None = None) -> Action:
        return cls("defer", reason, numbers or {})

    @classmethod
    def refuse(cls, reason: Reason, numbers: dict[str, Any] | None = None) -> Action:
        return cls("refuse", reason, numbers or {})

    @classmethod
    def advice(cls, reason: Reason, numbers: dict[str, Any] | None = None) -> Action:
        return cls("advice", reason, numbers or {})


# -- the kinds of rule ---------------------------------------------------------------------------
class Rule:
    """What every rule has: its registered name, kind, parameters and (score rules) weight."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = Params
    default_weight: ClassVar[float] = 1.0
    mandatory: ClassVar[bool] = False
    """Always applied, even when the configuration leaves it out (HDS, closed clusters)."""

    def __init__(self, params: BaseModel, weight: float | None = None):
        self.params = params
        self.weight = self.default_weight if weight is None else weight
        self.relaxable = False

    def setup(self, site) -> None:
        """Precompute from the site (called once when the engine is built)."""

    def describe(self) -> dict:
        d = {"rule": self.name, "kind": self.kind, "params": self.params.model_dump(mode="json")}
        if self.kind == "score":
            d["weight"] = self.weight
        return d


class FilterRule(Rule):
    kind = "filter"

    def filter(self, ctx, cand) -> Check:
        """Whether one candidate cluster passes, why, with numbers (Check.ok / Check.reject)."""
        raise NotImplementedError


class ScoreRule(Rule):
    kind = "score"

    def score(self, ctx, cand) -> Score:
        """The raw value for one candidate (None: unknown), its reason and numbers."""
        raise NotImplementedError

    def normalize(self, raws: list[float | None]) -> list[float]:
        """Scores in 0-100 from the raw values of all candidates (default: raw, clamped)."""
        return [50.0 if r is None else min(max(r, 0.0), 100.0) for r in raws]


class LowerIsBetter(ScoreRule):
    """100 for the lowest raw value, 100 x lowest / value for the others (proportional)."""

    def normalize(self, raws):
        known = [r for r in raws if r is not None]
        lo = min(known) if known else 0.0
        out = []
        for r in raws:
            if r is None:
                out.append(50.0)
            elif r <= 0 or r <= lo:
                out.append(100.0)
            else:
                out.append(100.0 * lo / r)
        return out


class AdjustRule(Rule):
    kind = "adjust"

    def adjust(self, ctx, cand, plan) -> list[Action]:
        """Act on the plan for the chosen cluster; one Action per step taken (or not)."""
        raise NotImplementedError
