"""Routing rules, in the manner of the Kubernetes scheduler framework: filter rules remove clusters
(each verdict with its reason and numbers), score rules rank the rest (normalised to 0-100 and
weighted by the configuration; the engine sums them), adjust rules act on the chosen cluster (budget
actions, carbon-aware --begin, right-sizing advice).

A site adds its own rule by subclassing FilterRule, ScoreRule or AdjustRule and declaring it under
the entry-point group "greend.rules"; the configuration then names it like a built-in one.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import quantities as q
from .request import resolve

PLUGIN_GROUP = "greend.rules"


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

    def filter(self, ctx, cand) -> tuple[bool, Any, dict]:
        """(passes, reason, numbers) for one candidate cluster. The reason is a string, or a function
        returning one (then only called when the explanation is read)."""
        raise NotImplementedError


class ScoreRule(Rule):
    kind = "score"

    def score(self, ctx, cand) -> tuple[float | None, Any, dict]:
        """(raw value, reason, numbers) for one candidate; None: unknown. Reason as for filters."""
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

    def adjust(self, ctx, cand, plan) -> list[tuple[str, str, dict]]:
        """Act on the plan for the chosen cluster; return (verdict, reason, numbers) entries."""
        raise NotImplementedError


# -- filters ------------------------------------------------------------------------------------
class ClusterOpen(FilterRule):
    name = "cluster_open"
    mandatory = True

    def filter(self, ctx, cand):
        c = cand.cluster
        if c.open:
            return True, "open", {}
        return False, f"{c.name} is closed (open = false in the configuration)", {}


class HdsParams(Params):
    classes: list[str] = Field(default_factory=lambda: ["hds"])
    """Data classes that may only run on HDS-certified clusters ("hds" is always one of them)."""


class HdsCertified(FilterRule):
    name = "hds"
    mandatory = True
    Params = HdsParams

    def setup(self, site):
        self.classes = frozenset(c.lower() for c in self.params.classes) | {"hds"}

    def filter(self, ctx, cand):
        dc = ctx.request.data_class
        if dc not in self.classes:
            return True, f"data class {dc or 'none'}: any cluster", {}
        if cand.cluster.hds:
            return True, f"{dc} data: {cand.cluster.name} is HDS-certified", {"hds": True}
        return False, f"{dc} data may only run on an HDS-certified cluster; {cand.cluster.name} is not", {
            "hds": False}


class AccountAllowed(FilterRule):
    name = "account_allowed"

    def filter(self, ctx, cand):
        allowed = cand.cluster.accounts
        acct = ctx.request.account
        if allowed is None:
            return True, "any account", {}
        if acct is None:
            return False, (f"{cand.cluster.name} accepts only accounts {', '.join(sorted(allowed))}; the "
                           "job gives none (--account)"), {}
        if acct in allowed:
            return True, f"account {acct} allowed", {}
        names = ", ".join(sorted(allowed))
        return False, f"account {acct} may not use {cand.cluster.name} (allowed: {names})", {}


class FitsPartition(FilterRule):
    name = "fits_partition"

    def filter(self, ctx, cand):
        c = cand.cluster
        r = ctx.request
        if not c.partitions:
            return True, "no partition limits configured", {}
        asked = [p for p in (c.partition(n) for n in r.partitions) if p is not None]
        note = ""
        if asked:
            order = asked
        else:
            if r.partitions:
                note = f"partition {','.join(r.partitions)} not on {c.name}; "
            d = c.default_partition
            order = [d, *[p for p in c.partitions if p is not d]]
        misfits = []
        for p in order:
            why = self.misfit(ctx, c, p)
            if why is None:
                cand.partition = p
                res = ctx.resolved(cand)
                return True, note + "fits " + p.name, {
                    "partition": p.name, "cpus": r.cpus, "nodes": r.nodes, "gpus": r.gpus,
                    "mem_mb": res.mem_mb, "walltime_s": res.walltime_s}
            misfits.append((p.name, why))

        def reason() -> str:
            return note + "fits no partition (" + "; ".join(f"{n}: {w()}" for n, w in misfits) + ")"

        return False, reason, {"cpus": r.cpus, "gpus": r.gpus}

    def misfit(self, ctx, c, p):
        """None if the request fits partition p, else a function that says why not."""
        r = ctx.request
        s = ctx.site.settings
        res = resolve(r, p, s.default_walltime_s, s.default_mem_per_cpu_mb, p.name)
        cpus = r.cpus
        if r.walltime_s is not None and p.max_walltime_s is not None and r.walltime_s > p.max_walltime_s:
            return lambda: (f"walltime {q.format_duration(r.walltime_s)} > max "
                            f"{q.format_duration(p.max_walltime_s)}")
        if p.max_cpus is not None and cpus > p.max_cpus:
            return lambda: f"{cpus} CPUs > max {p.max_cpus}"
        if p.max_nodes is not None and r.nodes > p.max_nodes:
            return lambda: f"{r.nodes} nodes > max {p.max_nodes}"
        if p.cpus_per_node is not None and res.cpus_per_node > p.cpus_per_node:
            return lambda: f"{res.cpus_per_node} CPUs per node > {p.cpus_per_node}"
        if (p.mem_per_node_mb is not None and not r.mem_whole_node
                and res.mem_per_node_mb > p.mem_per_node_mb + 1e-6):
            return lambda: (f"{q.format_memory(res.mem_per_node_mb)} per node > "
                            f"{q.format_memory(p.mem_per_node_mb)}")
        if r.gpus:
            types = p.gpu_types if p.gpu_types is not None else c.gpu_types
            if p.max_gpus == 0 or (not types and p.max_gpus is None):
                return lambda: f"{r.gpus} GPU(s) asked, none here"
            if p.max_gpus is not None and r.gpus > p.max_gpus:
                return lambda: f"{r.gpus} GPUs > max {p.max_gpus}"
            per_node = -(-r.gpus // r.nodes)
            if p.gpus_per_node is not None and per_node > p.gpus_per_node:
                return lambda: f"{per_node} GPUs per node > {p.gpus_per_node}"
            if r.gpu_type and types and r.gpu_type not in types:
                return lambda: f"GPU type {r.gpu_type} not here ({', '.join(sorted(types))})"
        return None


class TierParams(Params):
    tier: str = "local"
    max_walltime: Any = "2h"
    max_cpus: int | None = 4
    max_mem: Any = "16G"
    max_gpus: int | None = 1
    or_flags: list[str] = Field(default_factory=lambda: ["interactive", "debug"])
    """A job with one of these flags passes whatever its size."""

    _v_wall = field_validator("max_walltime")(classmethod(lambda cls, v: _dur(v)))
    _v_mem = field_validator("max_mem")(classmethod(lambda cls, v: _mem(v)))

    @field_validator("tier")
    @classmethod
    def _tier(cls, v):
        if v not in ("local", "site", "national"):
            raise ValueError(f"expected local, site or national, got {v!r}")
        return v

    @field_validator("or_flags")
    @classmethod
    def _flags(cls, v):
        bad = [f for f in v if f not in ("interactive", "debug")]
        if bad:
            raise ValueError(f"unknown flag(s) {bad}: expected interactive, debug")
        return v


class TierConditions(FilterRule):
    """A tier's own admission rule; by default "local only for short, small, interactive or debug
    jobs"."""

    name = "tier_conditions"
    Params = TierParams

    def setup(self, site):
        p = self.params
        self.max_walltime_s = None if p.max_walltime is None else q.parse_duration(p.max_walltime)
        self.max_mem_mb = None if p.max_mem is None else q.parse_memory_mb(p.max_mem)
        self.or_flags = frozenset(p.or_flags)

    def filter(self, ctx, cand):
        p = self.params
        if cand.cluster.tier != p.tier:
            return True, f"not a {p.tier} cluster", {}
        r = ctx.request
        flags = r.flags & self.or_flags
        if flags:
            return True, f"{'/'.join(sorted(flags))} job: allowed on {p.tier}", {}
        res = ctx.resolved(cand)
        too = []
        if self.max_walltime_s is not None and res.walltime_s > self.max_walltime_s:
            too.append(f"walltime {q.format_duration(res.walltime_s)} > "
                       f"{q.format_duration(self.max_walltime_s)}")
        if p.max_cpus is not None and r.cpus > p.max_cpus:
            too.append(f"{r.cpus} CPUs > {p.max_cpus}")
        if self.max_mem_mb is not None and res.mem_mb > self.max_mem_mb + 1e-6:
            too.append(f"{q.format_memory(res.mem_mb)} > {q.format_memory(self.max_mem_mb)}")
        if p.max_gpus is not None and r.gpus > p.max_gpus:
            too.append(f"{r.gpus} GPUs > {p.max_gpus}")
        nums = {"walltime_s": res.walltime_s, "cpus": r.cpus, "mem_mb": res.mem_mb, "gpus": r.gpus}
        if too:
            flags_txt = " or ".join(sorted(self.or_flags))
            return False, (f"{p.tier} takes only short, small jobs" + (f" or {flags_txt} jobs" if flags_txt
                                                                        else "")
                           + ": " + ", ".join(too)), nums
        return True, f"short and small enough for {p.tier}", nums


class Reachable(FilterRule):
    name = "reachable"

    def filter(self, ctx, cand):
        st = ctx.state(cand)
        if st is None:
            return True, f"not checked ({ctx.state_note})", {}
        age = max(ctx.now - st.fetched_at, 0.0)
        if st.ok:
            return True, lambda: f"controller answered {q.human_duration(age)} ago", {"state_age_s": age}
        return False, lambda: f"{st.error} ({q.human_duration(age)} ago)", {"state_age_s": age}


class OverflowParams(Params):
    tier: str = "site"
    max_wait: Any = "1h"
    """Expected wait above which the tier is passed over (unset: no wait threshold)."""
    max_load: float | None = Field(default=None, ge=0, le=1)
    """Allocated fraction of CPUs above which the tier is passed over (unset: none)."""
    relax: bool = True
    """When no other cluster can take the job, it stays on this tier and waits."""

    _v_wait = field_validator("max_wait")(classmethod(lambda cls, v: _dur(v)))


class Overflow(FilterRule):
    """The preferred tier overflows to the others when it is too busy."""

    name = "overflow"
    Params = OverflowParams

    def setup(self, site):
        self.max_wait_s = None if self.params.max_wait is None else q.parse_duration(self.params.max_wait)
        self.relaxable = self.params.relax

    def filter(self, ctx, cand):
        p = self.params
        if cand.cluster.tier != p.tier:
            return True, f"not a {p.tier} cluster", {}
        st = ctx.state(cand)
        if st is None or not st.ok:
            return True, "no live state: not checked", {}
        part = cand.partition.name if cand.partition else None
        load, alloc, total = st.load(part)
        w = ctx.wait(cand)
        nums = {"load": load, "alloc_cpus": alloc, "total_cpus": total,
                "expected_wait_s": None if w is None else _finite(w.seconds)}
        if self.max_wait_s is not None and w is not None and w.seconds > self.max_wait_s:
            nums["max_wait_s"] = self.max_wait_s
            shown = q.human_duration(w.seconds) if w.seconds != float("inf") else "unbounded"
            return False, (f"expected wait {shown}"
                           f" > {q.human_duration(self.max_wait_s)} ({w.reason})"), nums
        if p.max_load is not None and load > p.max_load:
            nums["max_load"] = p.max_load
            return False, f"load {load:.0%} ({alloc}/{total} CPUs) > {p.max_load:.0%}", nums
        def reason() -> str:
            wait_txt = "" if w is None else f", expected wait {q.human_duration(w.seconds)}"
            return f"load {load:.0%}{wait_txt}: below thresholds"

        return True, reason, nums


def _finite(x: float) -> float | None:
    return None if x == float("inf") else x


# -- scores -------------------------------------------------------------------------------------
class TierPreferenceParams(Params):
    tiers: dict[str, float] = Field(default_factory=lambda: {"site": 1.0, "national": 0.6, "local": 0.3})
    """Preference of each tier, 0-1 ("priorité au site, débordement au national")."""

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, v):
        for k, x in v.items():
            if k not in ("local", "site", "national"):
                raise ValueError(f"unknown tier {k!r}: expected local, site, national")
            if not 0 <= x <= 1:
                raise ValueError(f"tier {k}: expected a preference between 0 and 1, got {x}")
        return v


class TierPreference(ScoreRule):
    name = "tier_preference"
    Params = TierPreferenceParams
    default_weight = 4.0

    def score(self, ctx, cand):
        tier = cand.cluster.tier
        v = self.params.tiers.get(tier, 0.0)
        return 100.0 * v, lambda: f"tier {tier}: preference {v:g}", {"preference": v}


class CarbonScore(LowerIsBetter):
    name = "carbon"

    def score(self, ctx, cand):
        e = ctx.estimate(cand)
        ci = e.factors.carbon_intensity_g_per_kwh
        return e.carbon_g, lambda: f"{e.carbon_g:.4g} g CO2e at {ci:.4g} g/kWh, PUE {e.factors.pue:g}", {
            "carbon_g": e.carbon_g, "carbon_intensity_g_per_kwh": ci}


class WaterScore(LowerIsBetter):
    name = "water"

    def score(self, ctx, cand):
        e = ctx.estimate(cand)
        f = e.footprint
        return f.water_l, lambda: (f"{f.water_l:.4g} L ({f.water_site_l:.3g} on site + "
                                   f"{f.water_offsite_l:.3g} off site)"), {"water_l": f.water_l}


class EnergyScore(LowerIsBetter):
    name = "energy"

    def score(self, ctx, cand):
        e = ctx.estimate(cand)
        kwh = e.footprint.facility_energy_j / 3.6e6
        return kwh, lambda: f"{kwh:.4g} kWh facility energy", {"energy_kwh": kwh}


class WaitParams(Params):
    half_score_wait: Any = "1h"
    """The wait that scores 50 (score = 100 x h / (h + wait))."""

    _v = field_validator("half_score_wait")(classmethod(lambda cls, v: _dur(v)))


class ExpectedWait(ScoreRule):
    name = "expected_wait"
    Params = WaitParams
    default_weight = 2.0

    def setup(self, site):
        self.h = float(q.parse_duration(self.params.half_score_wait) or 3600)

    def score(self, ctx, cand):
        w = ctx.wait(cand)
        if w is None:
            return None, f"unknown ({ctx.state_note})", {}
        if w.seconds == float("inf"):
            return w.seconds, w.reason, {"expected_wait_s": None}
        return w.seconds, lambda: f"{q.human_duration(w.seconds)}: {w.reason}", {"expected_wait_s": w.seconds}

    def normalize(self, raws):
        h = self.h
        return [50.0 if r is None else (0.0 if r == float("inf") else 100.0 * h / (h + r)) for r in raws]


class DataLocality(ScoreRule):
    name = "data_locality"

    def score(self, ctx, cand):
        want = ctx.request.data_stores
        if not want:
            return 100.0, "no data stores declared", {}
        have = [d for d in want if d in cand.cluster.data_stores]
        missing = [d for d in want if d not in cand.cluster.data_stores]
        frac = len(have) / len(want)
        reason = f"{len(have)}/{len(want)} data stores local" + (f" (to move: {', '.join(missing)})"
                                                                if missing else "")
        return 100.0 * frac, reason, {"local_stores": have, "missing_stores": missing}


# -- adjustments ----------------------------------------------------------------------------------
_ACTION_RANK = {"warn": 1, "nice": 2, "defer": 3, "refuse": 4}


def period_start(period: str, now: float) -> tuple[float, float]:
    """(start, end) of the local calendar period containing now (mktime normalises day 32 etc.)."""
    lt = time.localtime(now)
    y, m, d = lt.tm_year, lt.tm_mon, lt.tm_mday

    def mk(y: int, m: int, d: int) -> float:
        return time.mktime((y, m, d, 0, 0, 0, 0, 0, -1))

    if period == "day":
        return mk(y, m, d), mk(y, m, d + 1)
    if period == "week":
        monday = d - lt.tm_wday
        return mk(y, m, monday), mk(y, m, monday + 7)
    if period == "month":
        return mk(y, m, 1), mk(y, m + 1, 1)
    if period == "quarter":
        qm = (m - 1) // 3 * 3 + 1
        return mk(y, qm, 1), mk(y, qm + 3, 1)
    return mk(y, 1, 1), mk(y + 1, 1, 1)


class BudgetRule(AdjustRule):
    """Per-project budgets of [[policy.budgets]]: usage this period from the ledger (+ this job)."""

    name = "budget"

    def setup(self, site):
        self.budgets = list(site.config.policy.budgets)

    def adjust(self, ctx, cand, plan):
        acct = ctx.request.account
        mine = [b for b in self.budgets if b.account == acct] if acct else []
        if not mine:
            return [("skip", "no budget for " + (f"account {acct}" if acct else "a job without --account"),
                     {})]
        out = []
        est = ctx.estimate(cand)
        for b in mine:
            start, end = period_start(b.period, ctx.now)
            use = ctx.usage(b.account, start)
            if use is None:
                out.append(("skip", f"budget {b.account}/{b.period}: usage unknown ({ctx.ledger_note})", {}))
                continue
            job_kwh = est.footprint.facility_energy_j / 3.6e6 if b.include_estimate else 0.0
            job_kg = est.footprint.carbon_g / 1000 if b.include_estimate else 0.0
            job_l = est.footprint.water_l if b.include_estimate else 0.0
            checks = []
            nums: dict[str, Any] = {"period": b.period, "period_start": q.iso(start), "jobs": use.jobs}
            for label, used, job, limit, unit in (
                ("energy", use.facility_energy_j / 3.6e6, job_kwh, b.energy_kwh, "kWh"),
                ("carbon", use.carbon_g / 1000, job_kg, b.carbon_kg, "kg CO2e"),
                ("water", use.water_l, job_l, b.water_l, "L"),
            ):
                if limit is None:
                    continue
                nums[f"{label}_used"] = round(used, 4)
                nums[f"{label}_job"] = round(job, 4)
                nums[f"{label}_limit"] = limit
                if used + job > limit:
                    checks.append(f"{label} {used:.4g} {unit} used + {job:.3g} this job > {limit:g} {unit}")
            if not checks:
                out.append(("ok", f"budget {b.account}/{b.period}: within limits", nums))
                continue
            what = f"budget {b.account}/{b.period} exceeded: " + "; ".join(checks)
            if b.action == "warn":
                plan.warnings.append(what)
                out.append(("warn", what, nums))
            elif b.action == "nice":
                plan.nice = max(plan.nice or 0, b.nice)
                out.append(("nice", f"{what}: priority lowered (--nice={b.nice})", nums))
            elif b.action == "defer":
                r = ctx.request
                if r.deadline is not None and end + plan.walltime_s > r.deadline:
                    plan.refused = (f"{what}; deferring to the next period ({q.iso(end)}) would miss the "
                                    f"deadline {q.iso(r.deadline)}")
                    out.append(("refuse", plan.refused, nums))
                else:
                    plan.not_before = max(plan.not_before or 0.0, end)
                    plan.begin = max(plan.begin or 0.0, end)
                    nums["begin"] = q.iso(end)
                    out.append(("defer", f"{what}: deferred to the next period (--begin {q.iso(end)})", nums))
            else:
                plan.refused = what
                out.append(("refuse", f"{what}: not submitted", nums))
        return out


class DeferralParams(Params):
    min_saving_pct: float = Field(default=5.0, ge=0, le=100)
    """Defer only when the best window saves at least this much carbon intensity."""


class CarbonDeferral(AdjustRule):
    """A deferrable job with a deadline starts (--begin) in the lowest-carbon window that still ends
    by the deadline; Slurm holds it until then."""

    name = "carbon_deferral"
    Params = DeferralParams

    def adjust(self, ctx, cand, plan):
        r = ctx.request
        if not r.deferrable:
            return [("skip", "not deferrable", {})]
        if r.deadline is None:
            return [("skip", "deferrable but no deadline: not deferred", {})]
        c = cand.cluster
        if not c.carbon.has_series:
            return [("skip", f"{c.name} has a static carbon intensity ({c.carbon.source}): no better window",
                     {})]
        if plan.refused:
            return [("skip", "job refused", {})]
        earliest = max(ctx.now, plan.not_before or 0.0, r.begin or 0.0)
        latest = r.deadline - plan.walltime_s
        est = ctx.estimate(cand)
        if latest < earliest:
            return [("warn", f"walltime {q.format_duration(plan.walltime_s)} from {q.iso(earliest)} ends "
                     "after "
                     f"the deadline {q.iso(r.deadline)}: not deferred", {})]
        best = c.carbon.lowest(earliest, latest, est.runtime_s)
        first = c.carbon.mean(earliest, earliest + est.runtime_s)
        saving = (first - best.mean_g_per_kwh) / first * 100 if first > 0 else 0.0
        nums = {"earliest": q.iso(earliest), "latest_start": q.iso(latest), "deadline": q.iso(r.deadline),
                "mean_now_g_per_kwh": round(first, 2), "mean_best_g_per_kwh": round(best.mean_g_per_kwh, 2),
                "saving_pct": round(saving, 1), "best_start": q.iso(best.start)}
        if gap := c.carbon.coverage_note(earliest, r.deadline):  # a window the series does not see
            nums["coverage"] = gap
        if best.start <= earliest + 1 or saving < self.params.min_saving_pct:
            return [("ok", f"starting at {q.iso(earliest)} is within {self.params.min_saving_pct:g} % of the "
                     f"lowest-carbon window ({first:.4g} vs {best.mean_g_per_kwh:.4g} g/kWh)", nums)]
        plan.begin = best.start
        return [("defer", (f"begin {q.iso(best.start)}: mean {best.mean_g_per_kwh:.4g} g/kWh instead of "
                           f"{first:.4g} now (-{saving:.0f} %), ends by "
                           f"{q.iso(best.start + plan.walltime_s)} "
                           f"<= deadline {q.iso(r.deadline)}"), nums)]


class RightSizingParams(Params):
    min_jobs: int = Field(default=2, ge=1)
    cpu_below: float = Field(default=0.5, gt=0, le=1)
    mem_below: float = Field(default=0.5, gt=0, le=1)
    gpu_below: float = Field(default=0.2, gt=0, le=1)


class RightSizing(AdjustRule):
    """Advice when the user's similar jobs used far less than they asked."""

    name = "right_sizing"
    Params = RightSizingParams

    def adjust(self, ctx, cand, plan):
        h = ctx.history()
        p = self.params
        if h is None or h.n < p.min_jobs:
            n = 0 if h is None else h.n
            return [("skip", f"{n} similar job(s) in the ledger (needs {p.min_jobs})", {})]
        r = ctx.request
        res = ctx.resolved(cand)
        out = []
        if h.cpu_efficiency is not None and h.cpu_efficiency < p.cpu_below:
            used = max(h.peak_cpus_used, 1e-9)
            suggest = max(1, int(-(-used * 1.2 // 1)))
            msg = (f"your {h.n} similar '{h.name}' jobs used {h.cpu_efficiency:.0%} of their CPUs (at most "
                   f"{used:.1f} busy on average); asked {r.cpus}: about {suggest} would do")
            out.append(("advice", msg, {"cpu_efficiency": round(h.cpu_efficiency, 3),
                                        "suggest_cpus": suggest}))
        if h.mem_efficiency is not None and h.mem_efficiency < p.mem_below:
            suggest_mb = h.peak_mem_mb * 1.25
            msg = (f"your {h.n} similar jobs peaked at {q.format_memory(h.peak_mem_mb)} "
                   f"({h.mem_efficiency:.0%} of what they had); asking {q.format_memory(res.mem_mb)}: "
                   f"--mem={max(int(suggest_mb), 1)}M would do")
            out.append(("advice", msg, {"mem_efficiency": round(h.mem_efficiency, 3),
                                        "suggest_mem_mb": int(suggest_mb)}))
        if r.gpus and h.gpu_use is not None and h.gpu_use < p.gpu_below:
            msg = (f"the GPUs of your {h.n} similar jobs drew {h.gpu_use:.0%} of their TDP on average: "
                   "check that the job uses them, or ask for fewer")
            out.append(("advice", msg, {"gpu_use": round(h.gpu_use, 3)}))
        if not out:
            return [("ok", f"{h.n} similar jobs used what they asked for",
                     {"jobs": h.n, "cpu_efficiency": h.cpu_efficiency, "mem_efficiency": h.mem_efficiency,
                      "gpu_use": h.gpu_use})]
        plan.advice.extend(m for _, m, _ in out)
        return out


# -- registry -----------------------------------------------------------------------------------
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
