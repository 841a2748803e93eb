"""/metrics render time and the daemon's memory with many active jobs on one node.

A real Daemon (ledger, exporter, API registry) whose monitor reads a synthetic jobs source of N
Slurm jobs (and no energy counter: CPU energy is modelled, as on a machine without RAPL). Prints
the figures; not a test. Usage:

    .venv/bin/python bench/bench_metrics.py [--jobs 1000] [--renders 50] [--promtool]

Goals (issue 3): render < 50 ms and RSS < 100 MB with 1,000 active jobs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from greend.collectors.base import JobUsage


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class SyntheticJobs:
    """N Slurm jobs, each burning CPU time and holding memory, as a jobs source."""

    name = "synthetic"

    def __init__(self, n: int, cluster: str):
        self.n = n
        self.cluster = cluster
        self.reads = 0

    def read(self) -> list[JobUsage]:
        self.reads += 1
        return [JobUsage(key=f"slurm/{self.cluster}/{100000 + i}", kind="slurm",
                         job_id=str(100000 + i), uid=1000 + i % 50,
                         cpu_time_ns=self.reads * 10**9 * (1 + i % 4), mem_bytes=(1 + i % 8) << 28,
                         alloc_cpus=float(1 + i % 4), cluster=self.cluster,
                         meta={"user": f"user{i % 50}", "account": f"proj{i % 20}",
                               "partition": "cpu" if i % 3 else "gpu", "name": f"job-{i}"})
                for i in range(self.n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--renders", type=int, default=50)
    ap.add_argument("--promtool", action="store_true", help="check the output with promtool")
    args = ap.parse_args()

    from greend import api, config
    from greend.daemon import Daemon
    from greend.monitor import Monitor

    rss0 = rss_mb()
    tmp = Path(tempfile.mkdtemp(prefix="greend-bench-"))
    try:
        cfg = config.parse({"node": "bench01", "state_dir": str(tmp),
                            "daemon": {"socket": ""}, "attribution": {"jobs_from": "procscan"}})
        d = Daemon(cfg, listen="127.0.0.1:0", socket_path=None)
        d.monitor.close()
        d.monitor = Monitor(cfg, d.ledger, jobs_source=SyntheticJobs(args.jobs, cfg.cluster),
                            energy_sources=[], resume=False)
        rss_imports = rss_mb()
        ticks = []
        for _ in range(3):
            time.sleep(0.2)
            t0 = time.perf_counter()
            d.sample()
            ticks.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        d.checkpoint()
        ckpt_first = time.perf_counter() - t0
        d.sample()
        t0 = time.perf_counter()
        d.checkpoint()
        ckpt = time.perf_counter() - t0
        a = api.Api(d)
        times = []
        out = b""
        for _ in range(args.renders):
            t0 = time.perf_counter()
            out = api.render_metrics(a.registry)
            times.append(time.perf_counter() - t0)
        rss = rss_mb()
        series = sum(1 for line in out.splitlines() if line and not line.startswith(b"#"))
        print(f"jobs active:           {len(d.monitor.accounts)}")
        print(f"/metrics size:         {len(out) / 1024:.0f} KiB, {series} series")
        print(f"/metrics render:       median {statistics.median(times) * 1e3:.1f} ms, "
              f"p95 {sorted(times)[int(0.95 * len(times)) - 1] * 1e3:.1f} ms, "
              f"min {min(times) * 1e3:.1f} ms ({args.renders} renders)")
        print(f"sampling tick:         median {statistics.median(ticks) * 1e3:.1f} ms")
        print(f"checkpoint:            first {ckpt_first * 1e3:.0f} ms (inserts), then "
              f"{ckpt * 1e3:.0f} ms (updates)")
        print(f"RSS:                   {rss:.1f} MB (Python + imports {rss_imports:.1f} MB, "
              f"interpreter before greend imports {rss0:.1f} MB)")
        if args.promtool:
            tool = shutil.which("promtool")
            if not tool:
                print("promtool:              not installed")
            else:
                r = subprocess.run([tool, "check", "metrics"], input=out, capture_output=True)
                msg = (r.stdout + r.stderr).decode().strip() or "clean"
                print(f"promtool check metrics: {msg if r.returncode == 0 else 'FAILED: ' + msg}")
        d.monitor.close()
        d.ledger.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
