"""Every rule by name: the built-in ones, the default rule list, the plugins of the entry-point group
"greend.rules", and building the configured rules (parameters validated, errors naming the entry)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .adjustments import BudgetRule, CarbonDeferral, RightSizing
from .filters import (
    AccountAllowed,
    ClusterOpen,
    FitsPartition,
    HdsCertified,
    Overflow,
    Reachable,
    TierConditions,
)
from .rule import PLUGIN_GROUP, AdjustRule, FilterRule, Rule, ScoreRule
from .scores import CarbonScore, DataLocality, EnergyScore, ExpectedWait, TierPreference, WaterScore

BUILTIN: dict[str, type[Rule]] = {
    cls.name: cls for cls in (
        ClusterOpen, HdsCertified, AccountAllowed, FitsPartition, TierConditions, Reachable, Overflow,
        TierPreference, CarbonScore, WaterScore, EnergyScore, ExpectedWait, DataLocality,
        BudgetRule, CarbonDeferral, RightSizing,
    )
}

DEFAULT_RULES: list[dict[str, Any]] = [
    {"rule": "cluster_open"},
    {"rule": "hds"},
    {"rule": "account_allowed"},
    {"rule": "fits_partition"},
    {"rule": "tier_conditions", "tier": "local"},
    {"rule": "reachable"},
    {"rule": "overflow", "tier": "site"},
    {"rule": "tier_preference", "weight": 4},
    {"rule": "expected_wait", "weight": 2},
    {"rule": "carbon", "weight": 1},
    {"rule": "water", "weight": 1},
    {"rule": "data_locality", "weight": 1},
    {"rule": "budget"},
    {"rule": "carbon_deferral"},
    {"rule": "right_sizing"},
]

_plugins: dict[str, type[Rule]] | None = None


def plugins() -> dict[str, type[Rule]]:
    """Rules other packages declare under the entry-point group "greend.rules" (loaded once)."""
    global _plugins
    if _plugins is None:
        from importlib.metadata import entry_points

        found = {}
        for ep in entry_points(group=PLUGIN_GROUP):
            found[ep.name] = ep
        _plugins = found  # type: ignore[assignment]
    return _plugins  # type: ignore[return-value]


def rule_class(name: str) -> type[Rule]:
    if name in BUILTIN:
        return BUILTIN[name]
    eps = plugins()
    if name not in eps:
        raise LookupError(
            f"unknown rule {name!r}: built-in rules are {', '.join(BUILTIN)}"
            + (f"; plugins: {', '.join(eps)}" if eps else "; no plugin declares the entry-point group "
               f"{PLUGIN_GROUP!r}")
        )
    ep = eps[name]
    try:
        cls = ep.load() if hasattr(ep, "load") else ep
    except Exception as e:  # a broken plugin must not become a traceback
        raise LookupError(f"rule {name!r}: cannot load plugin {getattr(ep, 'value', ep)}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, FilterRule | ScoreRule | AdjustRule)):
        raise LookupError(f"rule {name!r}: plugin {getattr(ep, 'value', ep)} is not a FilterRule, ScoreRule "
                          "or AdjustRule subclass")
    if not cls.name:
        cls.name = name
    return cls


def _where(i: int | None, name: str) -> str:
    return f"rule {name!r}" if i is None else f"[[policy.rules]] #{i + 1} (rule = {name!r})"


def instantiate(spec, index: int | None, trusted: bool = False) -> Rule:
    """A rule from a RuleSpec (or a plain dict); ValueError names the entry and the key. trusted:
    the parameters are known to be valid (the built-in defaults): set without validating."""
    raw = spec if isinstance(spec, dict) else {"rule": spec.rule, "weight": spec.weight,
                                               "enabled": spec.enabled, **spec.params}
    name = raw.get("rule")
    where = _where(index, name)
    try:
        cls = rule_class(name)
    except LookupError as e:
        raise ValueError(str(e) if index is None else f"[[policy.rules]] #{index + 1}: {e}") from None
    params = {k: v for k, v in raw.items() if k not in ("rule", "weight", "enabled")}
    weight = raw.get("weight")
    if weight is not None and cls.kind != "score":
        raise ValueError(f"{where}: 'weight' applies to score rules only; {name} is a {cls.kind} rule")
    if cls.mandatory and raw.get("enabled") is False:
        raise ValueError(f"{where}: this rule cannot be disabled")
    if trusted:
        return cls(cls.Params.model_construct(**params), weight)
    try:
        p = cls.Params.model_validate(params)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "(parameters)"
            if err["type"] == "extra_forbidden":
                known = ", ".join(cls.Params.model_fields) or "none"
                msgs.append(f"unknown parameter {key!r} (parameters of {name}: {known})")
            else:
                msgs.append(f"parameter {key!r}: {err['msg'].removeprefix('Value error, ')}")
        raise ValueError(f"{where}: " + "; ".join(msgs)) from None
    return cls(p, weight)


def build_rules(specs, site) -> list[Rule]:
    """The rules in order, from the configuration (None: the default set); mandatory rules that the
    list leaves out are put first; disabled ones dropped."""
    entries = DEFAULT_RULES if specs is None else specs
    rules = []
    for i, spec in enumerate(entries):
        enabled = spec.get("enabled", True) if isinstance(spec, dict) else spec.enabled
        if not enabled:
            continue
        rules.append(instantiate(spec, i, trusted=specs is None))
    present = {r.name for r in rules}
    missing = [cls(cls.Params.model_construct(), None) for cls in BUILTIN.values()
               if cls.mandatory and cls.name not in present]
    rules = missing + rules
    for r in rules:
        r.setup(site)
    return rules
