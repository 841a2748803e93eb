"""What collectors are and what they return: the interfaces every source implements (EnergySource,
JobSource and their optional capabilities) and typed readings that carry how they were obtained.

Collectors only read their source. Turning counters into interval energy (wrap and reset handling)
and splitting it among jobs happens in greend.attribution, in one place for every source. This
module, like every collector, imports nothing from the core (tests/test_layering.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

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


@dataclass(frozen=True, slots=True)
class DomainEnergy:
    """Energy of one domain over the interval, and how to split it (greend.attribution.split_domain
    does the split; a source that knows better, a GPU, describes its own split with one of these)."""

    domain: str
    source: str  # cpu, dram, gpu, memory
    energy_uj: int
    provenance: str
    active_ratio: float
    """Share of the domain's energy that is due to activity (the rest is idle/static power)."""
    active_weights: Mapping[str, float]
    active_denominator: float
    idle_weights: Mapping[str, float]
    idle_denominator: float


Gauge = tuple[str, dict[str, str], float]
"""(metric name of greend.exporter.METRICS, labels, value): a device's own gauges (GPU power...)."""


# -- the interfaces -----------------------------------------------------------------------------
# A source that does not exist raises SourceUnavailable at construction (normal: reported once).
# The optional capabilities are separate protocols, checked once when the monitor is set up.
@runtime_checkable
class EnergySource(Protocol):
    """Cumulative energy counters of some domains of this node (RAPL packages, GPUs)."""

    name: str

    def read(self) -> list[EnergyCounter]: ...


@runtime_checkable
class JobSource(Protocol):
    """Per-job cumulative resource use on this node (Slurm job cgroups, a process scan)."""

    name: str

    def read(self) -> list[JobUsage]: ...


@runtime_checkable
class Describes(Protocol):
    """A source that can say in a few words what it reads (/healthz's collector detail)."""

    def describe(self) -> str: ...


@runtime_checkable
class Closeable(Protocol):
    """A source holding descriptors or a library handle, released when the monitor closes."""

    def close(self) -> None: ...


@runtime_checkable
class PartialFailures(Protocol):
    """A source whose read can succeed for some devices and fail for others (one GPU of eight):
    the read returns, and these say the source is not healthy."""

    errors_total: int
    last_error: str


@runtime_checkable
class CpuIdleRule(Protocol):
    """What a domain split needs to know of the CPU interval (greend.attribution.CpuInterval)."""

    idle_rule: str


@runtime_checkable
class SplitsOwnDomains(Protocol):
    """An energy source that says how its domains' energy is shared among jobs (GPUs: by the
    processes on the device and the job's allocation), instead of by CPU time."""

    def owns(self, domain: str) -> bool: ...

    def split_hint(self, counter: EnergyCounter, energy_uj: int, jobs: Iterable[JobUsage],
                   accounts: Mapping, cpu_interval: CpuIdleRule,
                   pid_owner: Callable[[int], str | None] | None = None) -> DomainEnergy: ...


@runtime_checkable
class HasGauges(Protocol):
    """An energy source with gauges of its own for the exporter (no device call in gauges())."""

    def gauges(self) -> list[Gauge]: ...


@runtime_checkable
class KnowsPidOwner(Protocol):
    """A job source that can say which job a process belongs to (for GPU attribution)."""

    def owner_of(self, pid: int) -> str | None: ...
