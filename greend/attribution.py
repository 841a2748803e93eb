"""Splitting measured node energy among jobs, with books that balance exactly.

Energy is counted in integer microjoules, so "sum over jobs + unattributed = measured" holds to the
microjoule rather than to a float tolerance. The model is Kepler's (docs/methodology.md §2):

    usage_ratio = active / total                     over the interval, from /proc/stat
    E_active    = dE x usage_ratio,  E_idle = dE - E_active
    E_job       = E_active x dCPU_job / dCPU_all    (+ idle share, by the configured rule)

The idle rule is explicit: "allocated" shares E_idle among running jobs by allocated cores (a node
is powered for the jobs placed on it); "unattributed" leaves it in the remainder.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from greend.collectors.base import DomainEnergy  # described by sources too (a GPU's own split)


def counter_delta(prev: int, cur: int, max_range: int | None) -> int:
    """Energy between two readings of a cumulative counter.

    A decrease is a wrap when the counter has a known range (RAPL: the energy up to the top of the
    range plus what came after zero), otherwise a reset (driver reload): what the counter shows is
    all that is known since.
    """
    if cur >= prev:
        return cur - prev
    if max_range:
        return (max_range - prev) + cur
    return cur


def split_exact(total: int, weights: Mapping[str, float], denominator: float) -> dict[str, int]:
    """Integer shares of `total` proportional to weights/denominator, never more than total.

    Each share is the floor of its exact quota; the microjoules lost to flooring go to the largest
    fractional parts (largest-remainder method), up to the rounded sum of all quotas. What is not
    handed out (denominator above the weights' sum) is the caller's remainder.
    """
    if total <= 0 or not weights:
        return dict.fromkeys(weights, 0)
    # Lists rather than per-key dict updates: this runs for every domain of every tick.
    keys = list(weights)
    ws = [w if w > 0 else 0.0 for w in weights.values()]
    wsum = math.fsum(ws)
    if wsum <= 0:
        return dict.fromkeys(keys, 0)
    denom = max(float(denominator), wsum)
    quotas = [total * (w / denom) for w in ws]
    shares = [min(int(q), total) for q in quotas]
    target = min(total, round(total * (wsum / denom)))
    left = target - sum(shares)
    if left > 0:
        # The largest fractional parts, among jobs with a weight, each get one more microjoule.
        live = [i for i, w in enumerate(ws) if w > 0]
        for i in heapq.nlargest(left, live, key=lambda i: quotas[i] - shares[i]):
            shares[i] += 1
    elif left < 0:  # float rounding pushed the floors over the target: take back from the smallest
        for i in sorted(range(len(ws)), key=lambda i: quotas[i] - shares[i]):
            if left == 0:
                break
            if shares[i] > 0:
                shares[i] -= 1
                left += 1
    return dict(zip(keys, shares, strict=True))


@dataclass(slots=True)
class Split:
    domain: str
    source: str
    provenance: str
    energy_uj: int
    jobs: dict[str, int] = field(default_factory=dict)
    unattributed_uj: int = 0
    idle_uj: int = 0
    job_idle: dict[str, int] = field(default_factory=dict)
    """Of each job's share, the part that is idle power (the rest is its activity)."""


def split_domain(d: DomainEnergy) -> Split:
    ratio = min(1.0, max(0.0, d.active_ratio))
    active = min(d.energy_uj, max(0, round(d.energy_uj * ratio)))
    idle = d.energy_uj - active
    a = split_exact(active, d.active_weights, d.active_denominator)
    i = split_exact(idle, d.idle_weights, d.idle_denominator)
    jobs = dict(a)
    for k, v in i.items():
        jobs[k] = jobs.get(k, 0) + v
    given = sum(jobs.values())
    return Split(d.domain, d.source, d.provenance, d.energy_uj, jobs, d.energy_uj - given, idle,
                 {k: v for k, v in i.items() if v})


@dataclass(frozen=True, slots=True)
class CpuInterval:
    """What the CPU-like domains (package, dram) are split by over one interval."""

    active_ticks: int
    total_ticks: int
    ncpu: int
    tick_ns: int
    job_cpu_ns: Mapping[str, int]
    job_alloc_cpus: Mapping[str, float]
    idle_rule: str  # "allocated" | "unattributed"

    @property
    def usage_ratio(self) -> float:
        return self.active_ticks / self.total_ticks if self.total_ticks > 0 else 0.0

    def domain(self, domain: str, source: str, energy_uj: int, provenance: str,
               active_ratio: float | None = None) -> DomainEnergy:
        node_active_ns = self.active_ticks * self.tick_ns
        job_sum = sum(self.job_cpu_ns.values())
        if self.idle_rule == "allocated":
            idle_w: Mapping[str, float] = self.job_alloc_cpus
            idle_den = max(float(self.ncpu), float(sum(self.job_alloc_cpus.values())))
        else:
            idle_w, idle_den = {}, 1.0
        ratio = self.usage_ratio if active_ratio is None else active_ratio
        if active_ratio is None and node_active_ns <= 0 and job_sum > 0:
            ratio = 1.0  # /proc/stat saw nothing (too short an interval) but jobs ran
        return DomainEnergy(
            domain, source, energy_uj, provenance, ratio,
            self.job_cpu_ns, max(float(node_active_ns), float(job_sum)), idle_w, idle_den,
        )


TDP_IDLE_FRACTION = 0.1


def tdp_power_w(tdp_w: float, load: float) -> float:
    """CodeCarbon's CPU model when no counter is readable: P = TDP x (0.1 + 0.9 x load^3)."""
    load = min(1.0, max(0.0, load))
    return tdp_w * (TDP_IDLE_FRACTION + (1 - TDP_IDLE_FRACTION) * load**3)


def tdp_active_ratio(load: float) -> float:
    """The active share of the modelled CPU power: what is above the model's idle floor (0.1 x TDP).

    The floor is the node's idle power whatever the load, so a job's idle share does not depend on
    how busy other jobs keep the node (E x (1 - load) would fall to zero on a busy node).
    """
    load = min(1.0, max(0.0, load))
    busy = (1 - TDP_IDLE_FRACTION) * load**3
    return busy / (TDP_IDLE_FRACTION + busy)
