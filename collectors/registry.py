"""Every collector of a node, registered in one table (as node_exporter does), each with its switch in
the configuration's [collectors] table: "auto" (used when its source exists), "on" (required: a
missing source is an error at start) or "off".

The monitor opens the energy sources that are switched on or auto, and the first job source that
is; /proc (CPU times, the CPU and memory models) is always read and has no switch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .base import Describes, EnergySource, JobSource, SourceUnavailable

log = logging.getLogger(__name__)

Switch = Literal["auto", "on", "off"]


@dataclass(frozen=True, slots=True)
class Where:
    """What a collector needs to open its source: the configured roots and this node's identity."""

    procfs: Path
    sysfs: Path
    cgroupfs: Path
    cluster: str
    node: str


def _rapl(w: Where) -> EnergySource:
    from .rapl import RaplCollector

    return RaplCollector(w.sysfs)


def _nvml(w: Where) -> EnergySource:
    from .nvml import NvmlCollector

    return NvmlCollector()


def _cgroups(w: Where) -> JobSource:
    from .cgroups import SlurmCgroups

    return SlurmCgroups(w.cgroupfs, w.cluster, w.node)


def _procscan(w: Where) -> JobSource:
    from .procscan import ProcScan

    return ProcScan(w.procfs, w.cluster)


@dataclass(frozen=True, slots=True)
class Collector:
    name: str
    kind: Literal["energy", "jobs"]
    open: Callable[[Where], EnergySource | JobSource]
    """Opens the source; raises SourceUnavailable when it does not exist here."""
    what: str
    when_missing: str
    """What greend does without it (logged once, at info level)."""


# The table: energy sources are all opened; job sources are tried in this order, the first one
# present is used.
COLLECTORS: dict[str, Collector] = {c.name: c for c in (
    Collector("rapl", "energy", _rapl, "CPU package and DRAM energy counters (powercap sysfs)",
              "CPU energy will be modelled from TDP"),
    Collector("nvml", "energy", _nvml, "GPU energy, utilisation and processes (NVML)",
              "no GPU energy"),
    Collector("cgroups", "jobs", _cgroups, "per-job CPU time and memory from Slurm's job cgroups",
              "scanning processes instead"),
    Collector("procscan", "jobs", _procscan,
              "per-job CPU time from a scan of /proc (SLURM_JOB_ID in the environment)",
              "no job source"),
)}


class CollectorMissing(Exception):
    """A collector switched "on" whose source does not exist, or no job source at all."""


@dataclass(slots=True)
class Opened:
    name: str
    source: EnergySource | JobSource | None
    detail: str
    """The source's description when present, else why it is missing."""


def open_energy(switches: dict[str, Switch], where: Where) -> list[Opened]:
    """Every energy collector not switched off, present or not (missing ones with the reason)."""
    out = []
    for c in COLLECTORS.values():
        if c.kind != "energy" or switches.get(c.name, "auto") == "off":
            continue
        out.append(_open(c, switches.get(c.name, "auto"), where))
    return out


def open_jobs(switches: dict[str, Switch], where: Where) -> Opened:
    """The first job collector present among those not switched off."""
    tried = []
    for c in COLLECTORS.values():
        sw = switches.get(c.name, "auto")
        if c.kind != "jobs" or sw == "off":
            continue
        o = _open(c, sw, where)
        if o.source is not None:
            return o
        tried.append(f"{c.name}: {o.detail}")
    raise CollectorMissing("no job source: " + ("; ".join(tried) if tried else
                                                "every job collector is switched off in [collectors]"))


def _open(c: Collector, switch: Switch, where: Where) -> Opened:
    try:
        src = c.open(where)
    except SourceUnavailable as e:
        if switch == "on":
            raise CollectorMissing(f"collector {c.name} is switched on in [collectors] but its "
                                   f"source is missing: {e}") from None
        log.info("%s: %s; %s", c.name, e, c.when_missing)
        return Opened(c.name, None, str(e))
    return Opened(c.name, src, src.describe() if isinstance(src, Describes) else "")
