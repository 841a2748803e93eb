"""A scriptable fake of NVML at the pynvml function boundary.

`FakeNvml.install(monkeypatch)` replaces the pynvml functions the NVML collector calls with methods
of a small GPU model: devices with an energy counter (or none, as before Volta), power, utilisation,
processes with SM utilisation samples, MIG instances, and injected failures. Return values are the
real pynvml structures and failures the real `pynvml.NVMLError` subclasses, so the collector runs
exactly as it would against libnvidia-ml.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pynvml

NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId outside MIG


def err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # pynvml maps the code to its NVMLError_* subclass


@dataclass
class FakeProcess:
    pid: int
    sm: int = 0
    """smUtil (percent) of each utilisation sample while the process runs."""
    used_memory: int = 1 << 30
    graphics: bool = False


@dataclass
class FakeMigDevice:
    uuid: str
    slices: int
    """Compute slices of the instance (1g: 1, 3g: 3, 7g: 7)."""
    gi_id: int = 0
    ci_id: int = 0
    processes: dict[int, FakeProcess] = field(default_factory=dict)
    memory_used: int = 0

    def add_process(self, pid: int, **kw) -> FakeProcess:
        p = FakeProcess(pid, **kw)
        self.processes[pid] = p
        return p


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    power_w: float = 100.0
    energy_counter: bool = True
    """False: nvmlDeviceGetTotalEnergyConsumption is NOT_SUPPORTED (Pascal and older)."""
    energy_mj: float = 5_000_000.0
    util: int = 0
    """Device utilisation (percent), reported by the rates and by each utilisation sample."""
    memory_total: int = 80 << 30
    memory_used: int = 1 << 30
    power_limit_w: float = 400.0
    temperature_c: int = 40
    mig_capable: bool = False
    mig: bool = False
    max_mig_devices: int = 7
    mig_devices: list[FakeMigDevice] = field(default_factory=list)
    processes: dict[int, FakeProcess] = field(default_factory=dict)
    # NVML's sample buffers, (timestamp µs, the pynvml structure the driver would fill)
    proc_samples: list[tuple[int, object]] = field(default_factory=list)
    util_samples: list[tuple[int, object]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    """pynvml function name -> NVML error code raised by every call until removed."""

    def add_process(self, pid: int, **kw) -> FakeProcess:
        p = FakeProcess(pid, **kw)
        self.processes[pid] = p
        return p

    def add_mig(self, uuid: str, slices: int) -> FakeMigDevice:
        m = FakeMigDevice(uuid, slices, gi_id=len(self.mig_devices) + 1)
        self.mig_devices.append(m)
        return m


class _Handle:
    __slots__ = ("gpu", "mig")

    def __init__(self, gpu: FakeGpu, mig: FakeMigDevice | None = None):
        self.gpu, self.mig = gpu, mig


class FakeNvml:
    """The NVML of a node: its GPUs, a clock, and counts of every call made."""

    FUNCTIONS = (
        "nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetPowerUsage", "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetTemperature",
        "nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses",
        "nvmlDeviceGetProcessUtilization", "nvmlDeviceGetSamples", "nvmlDeviceGetMigMode",
        "nvmlDeviceGetMaxMigDeviceCount", "nvmlDeviceGetMigDeviceHandleByIndex",
        "nvmlDeviceGetAttributes",
    )

    def __init__(self, gpus: list[FakeGpu] | None = None, *, init_error: int | None = None,
                 sample_period_s: float = 1 / 6):
        self.gpus = list(gpus or [])
        self.init_error = init_error
        self.sample_period_s = sample_period_s
        self.t = 100.0  # seconds, the collector's monotonic clock
        self.epoch_us = 1_700_000_000_000_000  # NVML sample timestamps are wall-clock µs
        self.initialised = 0
        self.calls: Counter[str] = Counter()

    # -- driving the model ----------------------------------------------------------------------
    def monotonic(self) -> float:
        return self.t

    def now_us(self) -> int:
        return self.epoch_us + round(self.t * 1e6)

    def advance(self, seconds: float) -> None:
        """Time passes: each GPU draws its power, its running processes leave samples."""
        for g in self.gpus:
            g.energy_mj += g.power_w * seconds * 1000
        steps = max(1, round(seconds / self.sample_period_s))
        start = self.t
        for i in range(1, steps + 1):
            self.t = start + seconds * i / steps
            ts = self.now_us()
            for g in self.gpus:
                if g.mig:
                    continue
                u = pynvml.c_nvmlSample_t()
                u.timeStamp = ts
                u.sampleValue.uiVal = g.util
                g.util_samples.append((ts, u))
                for p in g.processes.values():
                    g.proc_samples.append(
                        (ts, pynvml.c_nvmlProcessUtilizationSample_t(p.pid, ts, p.sm, 0, 0, 0)))
                # NVML keeps a bounded ring of recent samples
                del g.util_samples[:-120]
                del g.proc_samples[:-2000]

    def install(self, monkeypatch) -> FakeNvml:
        for fn in self.FUNCTIONS:
            monkeypatch.setattr(pynvml, fn, self._wrap(fn, getattr(self, "_" + fn)))
        return self

    def _wrap(self, name, impl):
        def call(*args):
            self.calls[name] += 1
            if name not in ("nvmlInit", "nvmlShutdown") and not self.initialised:
                raise err(pynvml.NVML_ERROR_UNINITIALIZED)
            h = args[0] if args and isinstance(args[0], _Handle) else None
            if h is not None and name in h.gpu.failures:
                raise err(h.gpu.failures[name])
            return impl(*args)

        call.__name__ = name
        return call

    # -- pynvml functions -----------------------------------------------------------------------
    def _nvmlInit(self):
        if self.init_error is not None:
            raise err(self.init_error)
        self.initialised += 1

    def _nvmlShutdown(self):
        if not self.initialised:
            raise err(pynvml.NVML_ERROR_UNINITIALIZED)
        self.initialised -= 1

    def _nvmlDeviceGetCount(self):
        return len(self.gpus)

    def _nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.gpus):
            raise err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(self.gpus[index])

    def _nvmlDeviceGetUUID(self, h):
        return h.mig.uuid if h.mig else h.gpu.uuid

    def _nvmlDeviceGetName(self, h):
        return h.gpu.name

    def _nvmlDeviceGetTotalEnergyConsumption(self, h):
        if h.mig or not h.gpu.energy_counter:
            raise err(NOT_SUPPORTED)
        return round(h.gpu.energy_mj)

    def _nvmlDeviceGetPowerUsage(self, h):
        if h.mig:
            raise err(NOT_SUPPORTED)
        return round(h.gpu.power_w * 1000)

    def _nvmlDeviceGetUtilizationRates(self, h):
        if h.mig or h.gpu.mig:
            raise err(NOT_SUPPORTED)
        return pynvml.c_nvmlUtilization_t(h.gpu.util, 0)

    def _nvmlDeviceGetMemoryInfo(self, h, version=None):
        if h.mig:
            used = h.mig.memory_used
            return pynvml.c_nvmlMemory_t(h.gpu.memory_total // 7, h.gpu.memory_total // 7 - used, used)
        g = h.gpu
        return pynvml.c_nvmlMemory_t(g.memory_total, g.memory_total - g.memory_used, g.memory_used)

    def _nvmlDeviceGetEnforcedPowerLimit(self, h):
        return round(h.gpu.power_limit_w * 1000)

    def _nvmlDeviceGetTemperature(self, h, sensor):
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return h.gpu.temperature_c

    def _procs(self, h, graphics: bool):
        if h.mig:
            procs = [] if graphics else list(h.mig.processes.values())
            gi, ci = h.mig.gi_id, h.mig.ci_id
            out = []
            for p in procs:
                out.append(pynvml.nvmlStructToFriendlyObject(
                    pynvml.c_nvmlProcessInfo_v3_t(p.pid, p.used_memory, gi, ci)))
            return out
        out = []
        if h.gpu.mig:  # the parent of MIG devices lists every instance's processes
            for m in h.gpu.mig_devices:
                if not graphics:
                    for p in m.processes.values():
                        out.append(pynvml.nvmlStructToFriendlyObject(
                            pynvml.c_nvmlProcessInfo_v3_t(p.pid, p.used_memory, m.gi_id, m.ci_id)))
            return out
        for p in h.gpu.processes.values():
            if p.graphics == graphics:
                out.append(pynvml.nvmlStructToFriendlyObject(
                    pynvml.c_nvmlProcessInfo_v3_t(p.pid, p.used_memory, NO_INSTANCE, NO_INSTANCE)))
        return out

    def _nvmlDeviceGetComputeRunningProcesses(self, h):
        return self._procs(h, graphics=False)

    def _nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return self._procs(h, graphics=True)

    def _nvmlDeviceGetProcessUtilization(self, h, timeStamp):
        if h.mig or h.gpu.mig:
            raise err(NOT_SUPPORTED)
        got = [s for ts, s in h.gpu.proc_samples if ts > timeStamp]
        if not got:
            raise err(NOT_FOUND)
        return got

    def _nvmlDeviceGetSamples(self, h, sampling_type, timeStamp):
        if h.mig or h.gpu.mig or sampling_type != pynvml.NVML_GPU_UTILIZATION_SAMPLES:
            raise err(NOT_SUPPORTED)
        got = [s for ts, s in h.gpu.util_samples if ts > timeStamp]
        if not got:
            raise err(NOT_FOUND)
        return (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, got)

    def _nvmlDeviceGetMigMode(self, h):
        if h.mig or not h.gpu.mig_capable:
            raise err(NOT_SUPPORTED)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if h.gpu.mig else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def _nvmlDeviceGetMaxMigDeviceCount(self, h):
        if h.mig:
            raise err(NOT_SUPPORTED)
        return h.gpu.max_mig_devices if h.gpu.mig_capable else 0

    def _nvmlDeviceGetMigDeviceHandleByIndex(self, h, index):
        g = h.gpu
        if h.mig or not g.mig:
            raise err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not 0 <= index < len(g.mig_devices):
            raise err(NOT_FOUND)
        return _Handle(g, g.mig_devices[index])

    def _nvmlDeviceGetAttributes(self, h):
        if not h.mig:
            raise err(NOT_SUPPORTED)  # only MIG device handles have attributes
        n = h.mig.slices
        return pynvml.c_nvmlDeviceAttributes(16 * n, 0, 0, 0, 0, 0, n, n, 10_000 * n)
