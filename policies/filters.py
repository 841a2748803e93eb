"""Filter rules: each removes the clusters that cannot or may not take the job, with a reason and
numbers (Check.ok / Check.reject); fits_partition also returns the partition it chose."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, field_validator

from greend import quantities as q

from .request import Resolved, resolve
from .rule import Check, FilterRule, Params, _dur, _mem

# Answers that never change, made once: a router decides thousands of times a second. (A verdict's
# numbers are never modified after the rule returns them, so sharing them is safe.)
_OPEN = Check.ok("open")
_ANY_ACCOUNT = Check.ok("any account")
_NO_LIMITS = Check.ok("no partition limits configured")


class ClusterOpen(FilterRule):
    name = "cluster_open"
    mandatory = True

    def filter(self, ctx, cand):
        c = cand.cluster
        if c.open:
            return _OPEN
        return Check.reject(f"{c.name} is closed (open = false in the configuration)")


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
            return Check.ok(f"data class {dc or 'none'}: any cluster")
        if cand.cluster.hds:
            return Check.ok(f"{dc} data: {cand.cluster.name} is HDS-certified", {"hds": True})
        return Check.reject(f"{dc} data may only run on an HDS-certified cluster; "
                            f"{cand.cluster.name} is not", {"hds": False})


class AccountAllowed(FilterRule):
    name = "account_allowed"

    def filter(self, ctx, cand):
        allowed = cand.cluster.accounts
        acct = ctx.request.account
        if allowed is None:
            return _ANY_ACCOUNT
        if acct is None:
            return Check.reject(f"{cand.cluster.name} accepts only accounts "
                                f"{', '.join(sorted(allowed))}; the job gives none (--account)")
        if acct in allowed:
            return Check.ok(f"account {acct} allowed")
        names = ", ".join(sorted(allowed))
        return Check.reject(f"account {acct} may not use {cand.cluster.name} (allowed: {names})")


class FitsPartition(FilterRule):
    name = "fits_partition"

    def filter(self, ctx, cand):
        c = cand.cluster
        r = ctx.request
        if not c.partitions:
            return _NO_LIMITS
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
            res, why = self.misfit(ctx, c, p)
            if why is None:
                # The chosen partition goes back to the engine with the verdict.
                return Check.ok(note + "fits " + p.name, {
                    "partition": p.name, "cpus": r.cpus, "nodes": r.nodes, "gpus": r.gpus,
                    "mem_mb": res.mem_mb, "walltime_s": res.walltime_s}, partition=p)
            misfits.append((p.name, why))

        def reason() -> str:
            return note + "fits no partition (" + "; ".join(f"{n}: {w()}" for n, w in misfits) + ")"

        return Check.reject(reason, {"cpus": r.cpus, "gpus": r.gpus})

    def misfit(self, ctx, c, p) -> tuple[Resolved, Callable[[], str] | None]:
        """The request resolved on partition p, and None if it fits there, else a function that
        says why not."""
        r = ctx.request
        s = ctx.site.settings
        res = resolve(r, p, s.default_walltime_s, s.default_mem_per_cpu_mb, p.name)
        cpus = r.cpus
        if r.walltime_s is not None and p.max_walltime_s is not None and r.walltime_s > p.max_walltime_s:
            return res, lambda: (f"walltime {q.format_duration(r.walltime_s)} > max "
                                 f"{q.format_duration(p.max_walltime_s)}")
        if p.max_cpus is not None and cpus > p.max_cpus:
            return res, lambda: f"{cpus} CPUs > max {p.max_cpus}"
        if p.max_nodes is not None and r.nodes > p.max_nodes:
            return res, lambda: f"{r.nodes} nodes > max {p.max_nodes}"
        if p.cpus_per_node is not None and res.cpus_per_node > p.cpus_per_node:
            return res, lambda: f"{res.cpus_per_node} CPUs per node > {p.cpus_per_node}"
        if (p.mem_per_node_mb is not None and not r.mem_whole_node
                and res.mem_per_node_mb > p.mem_per_node_mb + 1e-6):
            return res, lambda: (f"{q.format_memory(res.mem_per_node_mb)} per node > "
                                 f"{q.format_memory(p.mem_per_node_mb)}")
        if r.gpus:
            types = p.gpu_types if p.gpu_types is not None else c.gpu_types
            if p.max_gpus == 0 or (not types and p.max_gpus is None):
                return res, lambda: f"{r.gpus} GPU(s) asked, none here"
            if p.max_gpus is not None and r.gpus > p.max_gpus:
                return res, lambda: f"{r.gpus} GPUs > max {p.max_gpus}"
            per_node = -(-r.gpus // r.nodes)
            if p.gpus_per_node is not None and per_node > p.gpus_per_node:
                return res, lambda: f"{per_node} GPUs per node > {p.gpus_per_node}"
            if r.gpu_type and types and r.gpu_type not in types:
                return res, lambda: f"GPU type {r.gpu_type} not here ({', '.join(sorted(types))})"
        return res, None


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
        self.other_tier = Check.ok(f"not a {self.params.tier} cluster")
        p = self.params
        self.max_walltime_s = None if p.max_walltime is None else q.parse_duration(p.max_walltime)
        self.max_mem_mb = None if p.max_mem is None else q.parse_memory_mb(p.max_mem)
        self.or_flags = frozenset(p.or_flags)

    def filter(self, ctx, cand):
        p = self.params
        if cand.cluster.tier != p.tier:
            return self.other_tier
        r = ctx.request
        flags = r.flags & self.or_flags
        if flags:
            return Check.ok(f"{'/'.join(sorted(flags))} job: allowed on {p.tier}")
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
            also = f" or {flags_txt} jobs" if flags_txt else ""
            return Check.reject(f"{p.tier} takes only short, small jobs{also}: " + ", ".join(too), nums)
        return Check.ok(f"short and small enough for {p.tier}", nums)


class Reachable(FilterRule):
    name = "reachable"

    def filter(self, ctx, cand):
        st = ctx.state(cand)
        if st is None:
            return Check.ok(f"not checked ({ctx.state_note})")
        age = max(ctx.now - st.fetched_at, 0.0)
        if st.ok:
            return Check.ok(lambda: f"controller answered {q.human_duration(age)} ago", {"state_age_s": age})
        return Check.reject(lambda: f"{st.error} ({q.human_duration(age)} ago)", {"state_age_s": age})


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
        self.other_tier = Check.ok(f"not a {self.params.tier} cluster")
        self.max_wait_s = None if self.params.max_wait is None else q.parse_duration(self.params.max_wait)
        self.relaxable = self.params.relax

    def filter(self, ctx, cand):
        p = self.params
        if cand.cluster.tier != p.tier:
            return self.other_tier
        st = ctx.state(cand)
        if st is None or not st.ok:
            return Check.ok("no live state: not checked")
        part = cand.partition.name if cand.partition else None
        load, alloc, total = st.load(part)
        w = ctx.wait(cand)
        nums = {"load": load, "alloc_cpus": alloc, "total_cpus": total,
                "expected_wait_s": None if w is None else _finite(w.seconds)}
        if self.max_wait_s is not None and w is not None and w.seconds > self.max_wait_s:
            nums["max_wait_s"] = self.max_wait_s
            shown = q.human_duration(w.seconds) if w.seconds != float("inf") else "unbounded"
            return Check.reject(f"expected wait {shown} > {q.human_duration(self.max_wait_s)} ({w.reason})",
                                nums)
        if p.max_load is not None and load > p.max_load:
            nums["max_load"] = p.max_load
            return Check.reject(f"load {load:.0%} ({alloc}/{total} CPUs) > {p.max_load:.0%}", nums)
        def reason() -> str:
            wait_txt = "" if w is None else f", expected wait {q.human_duration(w.seconds)}"
            return f"load {load:.0%}{wait_txt}: below thresholds"

        return Check.ok(reason, nums)


def _finite(x: float) -> float | None:
    return None if x == float("inf") else x
