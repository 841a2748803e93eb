"""Cost of one NVML sampling tick per GPU: 8 GPUs, 32 processes, with the fake NVML of the tests.

Each tick reads every GPU (energy, gauges, processes, SM samples, utilisation samples) and splits
each GPU's energy among the jobs holding it, as the monitor does. The figures include the fake's
own cost of building pynvml structures; on real hardware each NVML call adds its driver latency
instead (bench/gpu_check.py measures that). Prints the figures; not a test. Usage:

    .venv/bin/python bench/bench_nvml.py [--gpus 8] [--procs 32] [--ticks 200] [--interval 5]

Goal (issue 5): under 2 ms per GPU per tick.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_nvml import FakeGpu, FakeNvml
from greend.collectors.base import JobUsage
from greend.collectors.nvml import NvmlCollector

from greend.attribution import CpuInterval, counter_delta, split_domain


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--procs", type=int, default=32)
    ap.add_argument("--ticks", type=int, default=200)
    ap.add_argument("--interval", type=float, default=5.0, help="simulated seconds between ticks")
    args = ap.parse_args()

    mp = pytest.MonkeyPatch()
    fake = FakeNvml([FakeGpu(f"GPU-{i:04d}", power_w=300.0, util=70) for i in range(args.gpus)])
    fake.install(mp)
    owners: dict[int, str] = {}
    jobs: list[JobUsage] = []
    for p in range(args.procs):
        pid = 10_000 + p
        gpu = fake.gpus[p % args.gpus]
        gpu.add_process(pid, sm=10 + (p * 7) % 80)
        key = f"slurm/bench/{p // 2}"  # two processes per job: jobs share GPUs
        owners[pid] = key
    for key in sorted(set(owners.values())):
        jobs.append(JobUsage(key, "slurm", key.rsplit("/", 1)[1], 1000, 0))
    cpu = CpuInterval(1, 1, 64, 10_000_000, {}, {}, "allocated")

    nvml = NvmlCollector(clock=fake.monotonic)
    prev = {c.domain: c.value_uj for c in nvml.read()}
    times: list[float] = []
    calls_before = sum(fake.calls.values())
    for _ in range(args.ticks):
        fake.advance(args.interval)  # samples accumulate between ticks, as in the daemon
        t0 = time.perf_counter()
        counters = nvml.read()
        for c in counters:
            e = counter_delta(prev[c.domain], c.value_uj, c.max_range_uj)
            s = split_domain(nvml.split_hint(c, e, jobs, {}, cpu, owners.get))
            assert sum(s.jobs.values()) + s.unattributed_uj == e
            prev[c.domain] = c.value_uj
        times.append(time.perf_counter() - t0)
    calls = (sum(fake.calls.values()) - calls_before) / args.ticks / args.gpus
    nvml.close()
    mp.undo()

    per_gpu_ms = [t / args.gpus * 1000 for t in times]
    per_gpu_ms.sort()
    samples = args.interval / fake.sample_period_s * args.procs / args.gpus
    print(f"{args.gpus} GPUs, {args.procs} processes ({args.procs // 2} jobs), {args.ticks} ticks, "
          f"{args.interval:g} s apart (~{samples:.0f} process samples per GPU per tick)")
    print(f"tick (all GPUs): mean {statistics.fmean(times) * 1000:.3f} ms, "
          f"p99 {sorted(times)[int(0.99 * (len(times) - 1))] * 1000:.3f} ms")
    print(f"per GPU per tick: mean {statistics.fmean(per_gpu_ms):.3f} ms, "
          f"median {statistics.median(per_gpu_ms):.3f} ms, "
          f"p99 {per_gpu_ms[int(0.99 * (len(per_gpu_ms) - 1))]:.3f} ms (goal < 2 ms)")
    print(f"NVML calls per GPU per tick: {calls:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
