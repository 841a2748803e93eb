"""What collectors return: typed readings that carry how they were obtained.

Collectors only read their source. Turning counters into interval energy (wrap and reset handling)
and splitting it among jobs happens in greend.attribution, in one place for every source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Source = Literal["cpu", "dram", "gpu", "memory"]


class SourceUnavailable(Exception):
    """The source does not exist on this machine (no RAPL, no GPU): normal, not an error."""


@dataclass(frozen=True, slots=True)
class EnergyCounter:
    """A cumulative energy counter of one domain, as read now."""

    domain: str
    """Unique name of the domain on this node, e.g. "package-0", "dram-0", "gpu-0"."""
    source: Source
    value_uj: int
    max_range_uj: int | None
    """The counter wraps to 0 after this value (RAPL); None: it only resets (driver reload)."""
    provenance: str
    """How the figure was obtained, e.g. "measured: RAPL powercap" or "modelled: TDP"."""


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """Node-wide CPU time from /proc/stat, in clock ticks (USER_HZ)."""

    total_ticks: int
    idle_ticks: int  # idle + iowait: time no task ran
    ncpu: int

    @property
    def active_ticks(self) -> int:
        return self.total_ticks - self.idle_ticks


@dataclass(slots=True)
class JobUsage:
    """Cumulative resource use of one job (or pseudo-job) on this node, as read now."""

    key: str
    """Identity on this node across samples: "slurm/<cluster>/<id>", "cmd/<pid>-<start>", "user/<uid>"."""
    kind: Literal["slurm", "command", "user"]
    job_id: str
    uid: int
    cpu_time_ns: int
    mem_bytes: int = 0
    alloc_cpus: float | None = None
    alloc_mem_bytes: int | None = None
    cluster: str | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class CollectorStatus:
    """How a collector is doing, for /healthz and greend_collector_* metrics."""

    name: str
    present: bool = True
    ok: bool = True
    error: str = ""
    errors_total: int = 0
    last_duration_s: float = 0.0
    detail: str = ""
