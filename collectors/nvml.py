"""GPU energy per device from NVML (pynvml), and how a device's energy is shared among jobs.

Energy comes from the device's total-energy counter (Volta and newer) or, where NVML has none
(NOT_SUPPORTED before Volta), from power readings integrated over time into a counter of our own.
The same pass takes the exporter's gauges and what attribution needs (processes on the device, their
SM utilisation samples, device utilisation, MIG layout), so nothing else calls NVML. docs/gpu.md
says what these figures can and cannot show on each GPU generation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .base import CpuIdleRule, DomainEnergy, EnergyCounter, Gauge, JobUsage, SourceUnavailable

try:
    import pynvml
except ImportError:  # a declared dependency, but a node without it must still run
    pynvml = None

log = logging.getLogger(__name__)

PROV_COUNTER = "measured: NVML energy counter"
PROV_INTEGRATED = "measured: NVML power integrated (no energy counter on this GPU)"
PROV_MIG = ("MIG: GPU energy split by the compute slices of the instances each job uses "
            "(NVML gives no per-instance power)")

UJ_PER_MJ = 1000


@dataclass(slots=True)
class _Instance:
    """One MIG device (a compute instance) as the last read saw it."""

    uuid: str
    slices: int
    pids: frozenset[int]


@dataclass(slots=True)
class _Gpu:
    index: int
    handle: object
    uuid: str
    model: str
    has_counter: bool = True
    no_energy: str = ""  # why this device gives no energy at all (no counter and no power)
    # the synthetic counter of a device without an energy counter
    energy_uj: float = 0.0
    last_power_mw: int | None = None
    last_t: float | None = None
    # NVML sample buffers are read from the newest timestamp already seen (µs)
    last_proc_ts: int = 0
    last_util_ts: int = 0
    unsupported: set[str] = field(default_factory=set)
    failing: bool = False
    # what the last good read saw over its interval, for split_hint
    pids: frozenset[int] = frozenset()
    sm: dict[int, int] = field(default_factory=dict)
    active_ratio: float | None = None
    mig: bool = False
    mig_slices: int = 0
    instances: list[_Instance] = field(default_factory=list)
    slices_of: dict[str, int] = field(default_factory=dict)

    @property
    def domain(self) -> str:
        return f"gpu-{self.index}"

    @property
    def provenance(self) -> str:
        return PROV_COUNTER if self.has_counter else PROV_INTEGRATED


def _value_field(vtype: int) -> str:
    """Which member of an nvmlValue_t union holds a sample of this value type."""
    return {
        pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
    }.get(vtype, "uiVal")


class NvmlCollector:
    """Every GPU NVML sees on this node, one energy domain ("gpu-<index>") each."""

    name = "nvml"

    def __init__(self, *, clock: Callable[[], float] = time.monotonic):
        if pynvml is None:
            raise SourceUnavailable("nvidia-ml-py (module pynvml) is not installed")
        self.clock = clock
        self.errors_total = 0
        """NVML calls that failed during reads (a device's energy or a gauge), for the exporter."""
        self.device_errors: dict[int, int] = {}
        self.last_error = ""
        self._gauges: list[Gauge] = []
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            if isinstance(e, (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded)):
                raise SourceUnavailable(f"no NVIDIA driver ({e})") from None
            log.warning("nvml: NVML did not start: %s", e)
            raise SourceUnavailable(f"NVML did not start: {e}") from None
        self._open = True
        self.gpus: list[_Gpu] = []
        try:
            count = pynvml.nvmlDeviceGetCount()
            skipped = []
            for i in range(count):
                try:
                    self.gpus.append(self._open_device(i))
                except pynvml.NVMLError as e:
                    log.warning("nvml: GPU %d does not answer and is left out: %s", i, e)
                    skipped.append(f"GPU {i}: {e}")
        except pynvml.NVMLError as e:
            self.close()
            raise SourceUnavailable(f"NVML cannot count GPUs: {e}") from None
        if not self.gpus:
            self.close()
            why = "; ".join(skipped) if count else "NVML found no GPU"
            raise SourceUnavailable(why)
        self._by_domain = {g.domain: g for g in self.gpus}

    def _open_device(self, i: int) -> _Gpu:
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        g = _Gpu(i, h, str(pynvml.nvmlDeviceGetUUID(h)), str(pynvml.nvmlDeviceGetName(h)))
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        except pynvml.NVMLError_NotSupported:
            g.has_counter = False
        except pynvml.NVMLError as e:
            log.debug("nvml: gpu-%d energy counter probe failed: %s", i, e)
        return g

    def describe(self) -> str:
        parts = []
        for g in self.gpus:
            how = "energy counter" if g.has_counter else "power integrated"
            parts.append(f"{g.domain} {g.model} ({how})")
        return ", ".join(parts)

    # -- reading --------------------------------------------------------------------------------
    def read(self) -> list[EnergyCounter]:
        out: list[EnergyCounter] = []
        gauges: list[Gauge] = []
        for g in self.gpus:
            try:
                value = self._energy(g)
            except pynvml.NVMLError as e:
                # This device is skipped for this read; its counter is cumulative, so the next good
                # read carries the energy of the missed interval.
                self._error(g, "energy", e)
                if not g.failing:
                    log.warning("nvml: %s failed: %s", g.domain, e)
                g.failing = True
                continue
            if g.failing:
                log.warning("nvml: %s recovered", g.domain)
                g.failing = False
            self._observe(g, gauges)
            if value is not None:
                out.append(EnergyCounter(g.domain, "gpu", value, None, g.provenance))
        self._gauges = gauges
        return out

    def _energy(self, g: _Gpu) -> int | None:
        if g.has_counter:
            try:
                return pynvml.nvmlDeviceGetTotalEnergyConsumption(g.handle) * UJ_PER_MJ
            except pynvml.NVMLError_NotSupported:
                log.info("nvml: %s has no energy counter; integrating its power", g.domain)
                g.has_counter = False
        if g.no_energy:
            return None
        try:
            p = pynvml.nvmlDeviceGetPowerUsage(g.handle)
        except pynvml.NVMLError_NotSupported:
            g.no_energy = "NVML reads neither energy nor power on this GPU"
            log.warning("nvml: %s: %s; its energy is not measured", g.domain, g.no_energy)
            return None
        t = self.clock()
        if g.last_t is not None and g.last_power_mw is not None and t > g.last_t:
            # trapezoid between two reads: mW x s = mJ
            g.energy_uj += (g.last_power_mw + p) / 2 * (t - g.last_t) * UJ_PER_MJ
        g.last_power_mw, g.last_t = p, t
        return int(g.energy_uj)

    def _call(self, g: _Gpu, what: str, fn, *args):
        """An NVML call whose failure costs only what it would have told: None then."""
        if what in g.unsupported:
            return None
        try:
            return fn(*args)
        except pynvml.NVMLError_NotSupported:
            g.unsupported.add(what)
        except pynvml.NVMLError_NotFound:
            pass  # no samples newer than the timestamp, no MIG device at that index
        except pynvml.NVMLError as e:
            self._error(g, what, e)
        except pynvml.NVMLLibraryMismatchError as e:  # driver older than the bindings
            g.unsupported.add(what)
            log.warning("nvml: %s: %s", g.domain, e)
        return None

    def _error(self, g: _Gpu, what: str, e: Exception) -> None:
        self.errors_total += 1
        self.device_errors[g.index] = self.device_errors.get(g.index, 0) + 1
        self.last_error = f"{g.domain} {what}: {e}"
        log.debug("nvml: %s", self.last_error)

    def _observe(self, g: _Gpu, gauges: list[Gauge]) -> None:
        h = g.handle
        labels = {"gpu": str(g.index), "uuid": g.uuid, "model": g.model}
        power = g.last_power_mw if not g.has_counter and not g.no_energy else (
            self._call(g, "power", pynvml.nvmlDeviceGetPowerUsage, h))
        if power is not None:
            gauges.append(("greend_gpu_power_watts", labels, power / 1000))
        mode = self._call(g, "mig", pynvml.nvmlDeviceGetMigMode, h)
        g.mig = bool(mode) and mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE
        rates = None if g.mig else self._call(g, "utilization", pynvml.nvmlDeviceGetUtilizationRates, h)
        if rates is not None:
            gauges.append(("greend_gpu_utilization_ratio", labels, rates.gpu / 100))
        mem = self._call(g, "memory", pynvml.nvmlDeviceGetMemoryInfo, h)
        if mem is not None:
            gauges.append(("greend_gpu_memory_used_bytes", labels, float(mem.used)))
        limit = self._call(g, "power_limit", pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
        if limit is not None:
            gauges.append(("greend_gpu_power_limit_watts", labels, limit / 1000))
        temp = self._call(g, "temperature", pynvml.nvmlDeviceGetTemperature, h,
                          pynvml.NVML_TEMPERATURE_GPU)
        if temp is not None:
            gauges.append(("greend_gpu_temperature_celsius", labels, float(temp)))
        if g.mig:
            self._observe_mig(g)
            return
        g.instances = []
        pids = set()
        for what, fn in (("compute_processes", pynvml.nvmlDeviceGetComputeRunningProcesses),
                         ("graphics_processes", pynvml.nvmlDeviceGetGraphicsRunningProcesses)):
            for p in self._call(g, what, fn, h) or ():
                pids.add(p.pid)
        g.pids = frozenset(pids)
        sm: dict[int, int] = {}
        samples = self._call(g, "process_utilization", pynvml.nvmlDeviceGetProcessUtilization, h,
                             g.last_proc_ts)
        last = newest = g.last_proc_ts
        for s in samples or ():
            ts = s.timeStamp  # pynvml structures make every field read a Python call: read once
            if ts <= last:
                continue
            pid = s.pid
            sm[pid] = sm.get(pid, 0) + s.smUtil
            if ts > newest:
                newest = ts
        g.last_proc_ts = newest
        g.sm = sm
        # The device's utilisation over the whole interval (its samples since the last read) says
        # what share of the energy is activity; the instantaneous rate is the fallback.
        got = self._call(g, "utilization_samples", pynvml.nvmlDeviceGetSamples, h,
                         pynvml.NVML_GPU_UTILIZATION_SAMPLES, g.last_util_ts)
        vals = []
        if got:
            vtype, usamples = got
            member = _value_field(vtype)
            last = newest = g.last_util_ts
            for s in usamples:
                ts = s.timeStamp
                if ts > last:
                    vals.append(float(getattr(s.sampleValue, member)))
                    if ts > newest:
                        newest = ts
            g.last_util_ts = newest
        if vals:
            g.active_ratio = min(1.0, max(0.0, sum(vals) / len(vals) / 100))
        elif rates is not None:
            g.active_ratio = rates.gpu / 100
        else:
            g.active_ratio = None

    def _observe_mig(self, g: _Gpu) -> None:
        h = g.handle
        g.pids, g.sm, g.active_ratio = frozenset(), {}, None
        n = self._call(g, "mig_count", pynvml.nvmlDeviceGetMaxMigDeviceCount, h) or 0
        instances = []
        for i in range(n):
            mh = self._call(g, "mig_handle", pynvml.nvmlDeviceGetMigDeviceHandleByIndex, h, i)
            if mh is None:
                continue
            uuid = self._call(g, "mig_uuid", pynvml.nvmlDeviceGetUUID, mh)
            if uuid is None:
                continue
            uuid = str(uuid)
            slices = g.slices_of.get(uuid)
            if slices is None:
                attrs = self._call(g, "mig_attributes", pynvml.nvmlDeviceGetAttributes, mh)
                slices = max(1, attrs.computeInstanceSliceCount) if attrs is not None else 1
                g.slices_of[uuid] = slices
            procs = self._call(g, "mig_processes", pynvml.nvmlDeviceGetComputeRunningProcesses, mh)
            instances.append(_Instance(uuid, slices, frozenset(p.pid for p in procs or ())))
        g.instances = instances
        # The GPU's compute slices (7 on A100/H100) are the whole; unused slices stay unattributed.
        g.mig_slices = max(n, sum(x.slices for x in instances))

    def gauges(self) -> list[Gauge]:
        """What the last read saw, for the exporter (no NVML call here)."""
        return list(self._gauges)

    # -- attribution ----------------------------------------------------------------------------
    def owns(self, domain: str) -> bool:
        return domain in self._by_domain

    def split_hint(self, counter: EnergyCounter, energy_uj: int, jobs: Iterable[JobUsage],
                   accounts: Mapping, cpu_interval: CpuIdleRule,
                   pid_owner: Callable[[int], str | None] | None = None) -> DomainEnergy:
        """How the interval's energy of one GPU is shared among the jobs that held it.

        A job holds a GPU when one of its processes is on the device (NVML's process lists and
        utilisation samples, mapped through pid_owner) or when its allocation names the device
        (meta "gpus": indices or UUIDs). One holder gets the whole energy; several share the active
        part by their processes' SM utilisation and the idle part by the node's idle rule.
        """
        g = self._by_domain[counter.domain]
        jobs = list(jobs)
        known = {u.key for u in jobs}
        cache: dict[int, str | None] = {}

        def owner(pid: int) -> str | None:
            if pid not in cache:
                k = pid_owner(pid) if pid_owner is not None else None
                cache[pid] = k if k in known else None
            return cache[pid]

        alloc = {u.key: _alloc_tokens(u) for u in jobs}
        alloc = {k: v for k, v in alloc.items() if v}
        if g.mig:
            return self._split_mig(g, counter, energy_uj, alloc, owner)
        ratio = g.active_ratio
        holders = {k for k, toks in alloc.items() if str(g.index) in toks or g.uuid in toks}
        sm_job: dict[str, float] = {}
        sm_unowned = 0
        for pid, sm in g.sm.items():
            k = owner(pid)
            if k is None:
                sm_unowned += sm
                continue
            holders.add(k)
            sm_job[k] = sm_job.get(k, 0) + sm
        for pid in g.pids:
            k = owner(pid)
            if k is not None:
                holders.add(k)
        prov = counter.provenance
        if ratio is None:
            ratio = 1.0  # utilisation unknown: the whole energy is split as activity
        if not holders:
            return DomainEnergy(g.domain, "gpu", energy_uj, prov, ratio, {}, 1.0, {}, 1.0)
        if len(holders) == 1 and sm_unowned == 0:
            (k,) = holders
            return DomainEnergy(g.domain, "gpu", energy_uj, prov, ratio, {k: 1.0}, 1.0, {k: 1.0}, 1.0)
        active_w = {k: float(v) for k, v in sm_job.items() if v > 0}
        active_den = float(sum(active_w.values()) + sm_unowned)
        if active_den <= 0:  # no SM samples over the interval: equal shares among the holders
            active_w = dict.fromkeys(holders, 1.0)
            active_den = float(len(holders))
        if cpu_interval is not None and cpu_interval.idle_rule == "allocated":
            idle_w: dict[str, float] = dict.fromkeys(holders, 1.0)
            idle_den = float(len(holders))
        else:
            idle_w, idle_den = {}, 1.0
        return DomainEnergy(g.domain, "gpu", energy_uj, prov, ratio, active_w, active_den, idle_w,
                            idle_den)

    def _split_mig(self, g: _Gpu, counter: EnergyCounter, energy_uj: int,
                   alloc: dict[str, set[str]], owner):
        weights: dict[str, float] = {}
        for inst in g.instances:
            holders = {k for k, toks in alloc.items() if inst.uuid in toks}
            holders.update(k for k in map(owner, inst.pids) if k is not None)
            for k in holders:
                weights[k] = weights.get(k, 0.0) + inst.slices / len(holders)
        den = float(max(g.mig_slices, 1))
        # NVML cannot tell activity from idle power under MIG: each job pays for the slices it
        # holds, whatever the idle rule.
        return DomainEnergy(g.domain, "gpu", energy_uj, f"{counter.provenance}; {PROV_MIG}", 1.0,
                            weights, den, {}, 1.0)

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as e:
                log.debug("nvml: shutdown: %s", e)


def _alloc_tokens(u: JobUsage) -> set[str]:
    """The GPUs a job was given (meta "gpus": "0,1", or UUIDs "GPU-...", "MIG-...")."""
    raw = (u.meta or {}).get("gpus", "")
    return {t.strip() for t in raw.split(",") if t.strip()}
