"""CPU overhead of measuring a Python workload: greend.track's self-sampling at 1 s next to
CodeCarbon's tracker, on the same workload, each in its own process. Prints figures; not a test.

    python bench/bench_track_vs_codecarbon.py [--seconds 30] [--repeat 3] [--no-codecarbon]

Needs a Python with greend and CodeCarbon (the `bench` extra, in a venv of its own so that the test
venv stays as CI has it; docs/performance.md has the commands).

Each run is a fresh process that imports its tracker, then, timed: make and start the tracker, keep one core
busy with pure Python for --seconds of wall time, stop the tracker. The overhead is the process's CPU
time (time.process_time) less what the workload's own thread used (time.thread_time): the tracker's
background threads plus its start and stop; in % of one core over the run's wall time ("whole
run"), and over the steady state alone: the background threads' CPU from 5 s into the workload to
its end ("steady": the sampling itself, without start-up and stop). A run with no
tracker gives the floor (near 0). Import costs are shown apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WARMUP_S = 5.0  # the steady state is measured from this far into the workload to its end

MODES = {
    "none": "no tracker (floor)",
    "greend": "greend.track, self-sampling every 1 s, recorded in a ledger",
    "codecarbon": "CodeCarbon OfflineEmissionsTracker, measure_power_secs=1",
    "codecarbon-15s": "CodeCarbon OfflineEmissionsTracker, its default measure_power_secs=15",
}


def busy(seconds: float, mark_s: float) -> tuple[float, float, float]:
    """One core busy in pure Python (holding the GIL, as a training loop's Python part does) for
    `seconds`; returns (wall, process CPU, this thread's CPU) as they were `mark_s` in."""
    t0 = time.monotonic()
    end, mark = t0 + seconds, t0 + mark_s
    marked = None
    n = 0
    while (now := time.monotonic()) < end:
        if marked is None and now >= mark:
            marked = (now, time.process_time(), time.thread_time())
        for i in range(2000):
            n += i * i % 7
    return marked or (time.monotonic(), time.process_time(), time.thread_time())


def make_tracker(mode: str, state_dir: str):
    if mode == "greend":
        from greend.track import track

        return track("bench", interval_s=1.0, state_dir=state_dir)
    if mode.startswith("codecarbon"):
        from codecarbon import OfflineEmissionsTracker

        # Offline: the online tracker would look the location up over the network first.
        return OfflineEmissionsTracker(
            country_iso_code="FRA", measure_power_secs=15 if mode.endswith("15s") else 1,
            save_to_file=False, log_level="error", tracking_mode="process")
    return None


def child(mode: str, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="greend-bench-") as state_dir:
        t0 = time.process_time()
        if mode == "greend":
            import greend.track  # noqa: F401
        elif mode.startswith("codecarbon"):
            import codecarbon  # noqa: F401
        import_cpu_s = time.process_time() - t0
        proc0, main0, wall0 = time.process_time(), time.thread_time(), time.monotonic()
        tracker = make_tracker(mode, state_dir)  # construction counts as starting: CodeCarbon probes there
        if tracker is not None:
            tracker.start()
        start_cpu_s = time.thread_time() - main0
        busy_main0 = time.thread_time()
        mark = busy(seconds, WARMUP_S)
        steady = (time.monotonic(), time.process_time(), time.thread_time())
        busy_main_s = time.thread_time() - busy_main0
        if tracker is not None:
            s0 = time.thread_time()
            out = tracker.stop()
            stop_cpu_s = time.thread_time() - s0
        else:
            out, stop_cpu_s = None, 0.0
        wall_s = time.monotonic() - wall0
        proc_s = time.process_time() - proc0
        extra = {}
        if mode == "greend":
            extra = {"source": out.source, "it_energy_j": out.it_energy_j, "degraded": out.degraded}
        elif out is not None:
            extra = {"emissions_kg": out}
    overhead_s = proc_s - busy_main_s  # background threads + start + stop
    # Steady state: the background threads' CPU from WARMUP_S into the workload to its end.
    steady_wall = steady[0] - mark[0]
    steady_bg = (steady[1] - mark[1]) - (steady[2] - mark[2])
    return {"mode": mode, "wall_s": wall_s, "process_cpu_s": proc_s, "workload_cpu_s": busy_main_s,
            "overhead_cpu_s": overhead_s, "overhead_pct_core": 100 * overhead_s / wall_s,
            "steady_pct_core": 100 * steady_bg / steady_wall if steady_wall > 0 else 0.0,
            "start_cpu_ms": start_cpu_s * 1e3, "stop_cpu_ms": stop_cpu_s * 1e3,
            "import_cpu_ms": import_cpu_s * 1e3, **extra}


def run_child(mode: str, seconds: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--seconds", str(seconds)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="wall time of one run's workload (30)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode, interleaved; medians shown (3)")
    ap.add_argument("--no-codecarbon", action="store_true", help="greend only")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seconds)))
        return
    modes = ["none", "greend"] + ([] if args.no_codecarbon else ["codecarbon", "codecarbon-15s"])
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for i in range(args.repeat):
        for m in modes:
            r = run_child(m, args.seconds)
            runs[m].append(r)
            print(f"  run {i + 1}/{args.repeat} {m:15} overhead {r['overhead_pct_core']:.3f} % of a core",
                  file=sys.stderr)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in
               ("overhead_pct_core", "steady_pct_core", "overhead_cpu_s", "wall_s", "start_cpu_ms",
                "stop_cpu_ms", "import_cpu_ms")} for m, rs in runs.items()}
    print(f"workload: one core busy in pure Python, {args.seconds:g} s a run, {args.repeat} runs per "
          f"tracker (medians)")
    print(f"{'tracker':15} {'whole run':>12} {'steady':>12} {'CPU s':>7} {'start ms':>9} {'stop ms':>8} "
          f"{'import ms':>10}   (% of one core)")
    for m in modes:
        f = med[m]
        print(f"{m:15} {f['overhead_pct_core']:10.3f} % {f['steady_pct_core']:10.3f} % "
              f"{f['overhead_cpu_s']:7.3f} {f['start_cpu_ms']:9.1f} {f['stop_cpu_ms']:8.1f} "
              f"{f['import_cpu_ms']:10.1f}   {MODES[m]}")
    if "greend" in runs:
        print(f"greend source: {runs['greend'][-1].get('source')}, "
              f"degraded: {runs['greend'][-1].get('degraded') or 'no'}")
    for fig in ("overhead_pct_core", "steady_pct_core"):
        g = med["greend"][fig] - med["none"][fig]
        for m in ("codecarbon", "codecarbon-15s"):
            if m in med:
                c = med[m][fig] - med["none"][fig]
                ratio = g / c if c > 0 else float("nan")
                what = "whole run" if fig == "overhead_pct_core" else "steady"
                print(f"greend / {m}, {what} (above the floor): {g:.3f} / {c:.3f} = {ratio:.2f}")


if __name__ == "__main__":
    main()
