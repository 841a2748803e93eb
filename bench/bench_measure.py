"""`greend measure` costs: the start-up overhead of `greend measure -- true` (wall time minus the
command's), where it goes, and what the readings at exec and exit add to the command's wall time.
The runs read the configuration's cached view (greend.config_cache) as a user's repeated runs do;
the "first run" line is a cache miss (a fresh cache each time: the validated load, then the
snapshot written).

    .venv/bin/python bench/bench_measure.py [--runs N] [--no-bytecode]

greend's modules run from a bytecode cache (a temporary PYTHONPYCACHEPREFIX), as an installed greend
has them: this development environment sets PYTHONDONTWRITEBYTECODE=1, which makes every start
compile greend's own modules again (--no-bytecode measures that). Besides the wall time, the CPU
time of the command (user + system of the child, of which `true` is ~1 ms) moves less with load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GREEND = str(Path(sys.executable).with_name("greend"))


def phases(env: dict[str, str]) -> dict[str, float]:
    code = """
import time; t0 = time.perf_counter()
import greend.cli as c; t1 = time.perf_counter()
argv = ['measure', '-q', '--', 'true']
p = c.build_parser(c.command_of(argv)); a = p.parse_args(argv); t2 = time.perf_counter()
from greend import measure, report; t3 = time.perf_counter()
cfg = c._load_config(a, fast=True); led = c._open_ledger(cfg); t4 = time.perf_counter()
from greend.monitor import Monitor, cpu_power_model; cpu_power_model(cfg); t5 = time.perf_counter()
measure.run(cfg, ['true'], led); t6 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    names = ("import greend.cli", "argument parser (the measure command's)",
             "import measure (monitor, ledger; no pydantic)", "config (cached view) + ledger open",
             "CPU TDP lookup (CodeCarbon table)", "measure.run (scan, 2 ticks, 2 checkpoints)")
    return dict(zip(names, map(float, out.stdout.split()), strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--no-bytecode", action="store_true",
                    help="compile greend's modules at every start (PYTHONDONTWRITEBYTECODE as set "
                    "here) instead of using a bytecode cache as an installed greend does")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "GREEND_STATE_DIR": state, "XDG_CACHE_HOME": str(Path(state) / "cache")}
        if not args.no_bytecode:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(Path(state) / "pycache")
        subprocess.run([GREEND, "measure", "-q", "--", "true"], env=env, check=True)
        walls, cpus, bare = [], [], []
        for _ in range(args.runs):
            before = os.times()
            t = time.perf_counter()
            subprocess.run([GREEND, "measure", "-q", "--", "true"], env=env, check=True)
            walls.append(time.perf_counter() - t)
            after = os.times()
            cpus.append(after.children_user + after.children_system
                        - before.children_user - before.children_system)
            t = time.perf_counter()
            subprocess.run(["true"], check=True)
            bare.append(time.perf_counter() - t)
        misses = []
        for i in range(max(3, args.runs // 2)):  # a fresh configuration cache each time
            t = time.perf_counter()
            subprocess.run([GREEND, "measure", "-q", "--", "true"], check=True,
                           env={**env, "XDG_CACHE_HOME": str(Path(state) / f"cold{i}")})
            misses.append(time.perf_counter() - t)
        how = "compiled at each start" if args.no_bytecode else "bytecode cached"
        print(f"greend measure -- true ({how}): "
              f"wall median {statistics.median(walls) * 1e3:.0f} ms, min {min(walls) * 1e3:.0f} ms; "
              f"CPU median {statistics.median(cpus) * 1e3:.0f} ms "
              f"(true alone: {statistics.median(bare) * 1e3:.1f} ms)")
        print(f"  first run (configuration cache miss): wall median {statistics.median(misses) * 1e3:.0f} ms")
        ph = [phases(env) for _ in range(3)]
        for k in ph[0]:
            print(f"  {k}: {statistics.median(p[k] for p in ph) * 1e3:.0f} ms")
    # What the readings at exec and exit add to the command's measured wall time: the re-read
    # before exec (counters and /proc/stat) lies inside [start, exit]; the exit reading after it.
    from greend.collectors.procscan import ProcScan

    from greend import config as config_mod
    from greend.monitor import Monitor

    cfg = config_mod.load(None)
    m = Monitor(cfg, None, jobs_source=ProcScan(cfg.paths.procfs, cfg.cluster), resume=False)
    m.tick()
    costs = []
    for _ in range(200):
        t = time.perf_counter()
        m.rebaseline()
        costs.append(time.perf_counter() - t)
    m.close()
    print(f"reading at exec (Monitor.rebaseline): median {statistics.median(costs) * 1e3:.3f} ms, "
          f"max {max(costs) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
