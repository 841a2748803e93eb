"""greend.track's costs: `import greend` + `greend.track(...)`, a phase boundary through a real
`greend run` (median, p99), and the CPU cost of self-sampling at 1 s.

    .venv/bin/python bench/bench_track.py [--runs N] [--boundaries N] [--idle-s S] [--json]

- import: a fresh interpreter per run; time from before `import greend` to a Run's start()
  returning, and which heavy modules are loaded then (none should be). Bytecode cached, as an
  installed greend has it (a temporary PYTHONPYCACHEPREFIX).
- boundary: a real `greend run` (procscan, its unix socket in a temporary directory); a client
  process with SLURM_JOB_ID set times `run.phase(name)` (the POST /api/v1/phases round trip on a
  kept-alive connection, and building the Books) --boundaries times.
- self-sampling: a process that sleeps under `greend.track(interval_s=1)` (recording in a ledger
  every 2 s, as a run does) vs the same process without it: CPU seconds per wall second of the
  steady state (after the sampler's start-up, which is reported apart), as % of one core.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GREEND = str(Path(sys.executable).with_name("greend"))
HEAVY = ["pydantic", "textual", "prometheus_client", "greend.daemon", "greend.config",
         "greend.monitor", "h11", "asyncio"]


def bench_import(runs: int, env: dict) -> dict:
    code = f"""
import sys, time
t0, c0 = time.perf_counter(), time.process_time()
import greend
t1 = time.perf_counter()
run = greend.track("bench", record=False)
run.start()
t2, c2 = time.perf_counter(), time.process_time()
heavy = [m for m in {HEAVY!r} if m in sys.modules]
run.stop()
print(t1 - t0, t2 - t0, c2 - c0, ",".join(heavy) or "-")
"""
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    imp, start, cpu, heavy = [], [], [], set()
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                             text=True).stdout.split()
        imp.append(float(out[0]) * 1e3)
        start.append(float(out[1]) * 1e3)
        cpu.append(float(out[2]) * 1e3)
        if out[3] != "-":
            heavy.update(out[3].split(","))
    return {"import_greend_ms_median": round(statistics.median(imp), 2),
            "import_and_track_start_ms_median": round(statistics.median(start), 2),
            "import_and_track_start_ms_max": round(max(start), 2),
            "import_and_track_start_cpu_ms_median": round(statistics.median(cpu), 2),
            "heavy_modules_loaded_at_start": sorted(heavy)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_boundary(n: int, env: dict, tmp: Path) -> dict:
    sock = tmp / "api.sock"
    cfg = tmp / "greend.toml"
    cfg.write_text('node = "bench"\ncluster = "local"\n[sampling]\ninterval_s = 1.0\n'
                   'checkpoint_interval_s = 5.0\n[attribution]\njobs_from = "procscan"\n')
    with open(tmp / "greend.log", "wb") as log:
        d = subprocess.Popen([GREEND, "-c", str(cfg), "--state-dir", str(tmp / "state"), "run",
                              "--listen", f"127.0.0.1:{_free_port()}", "--socket", str(sock)],
                             stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if d.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"greend run did not start: {(tmp / 'greend.log').read_text()}")
            time.sleep(0.1)
        code = f"""
import json, time
import greend
run = greend.track("bench")
run.start()
assert run.source == "daemon", run.footprint.degraded
ts = []
for i in range({n}):
    t = time.perf_counter()
    run.phase(f"p{{i}}")
    ts.append(time.perf_counter() - t)
t = time.perf_counter(); run.stop(); stop_s = time.perf_counter() - t
print(json.dumps(ts))
"""
        job = str(90_000_000 + os.getpid() % 1_000_000)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**env, "SLURM_JOB_ID": job, "SLURM_CLUSTER_NAME": "local",
                                "GREEND_SOCKET": str(sock)}, check=False)
        if r.returncode:
            raise SystemExit(f"boundary client failed: {r.stderr}")
        ts = sorted(x * 1e3 for x in json.loads(r.stdout))
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(30)
    return {"boundaries": n, "boundary_ms_median": round(statistics.median(ts), 3),
            "boundary_ms_p99": round(ts[min(len(ts) - 1, int(len(ts) * 0.99))], 3),
            "boundary_ms_min": round(ts[0], 3)}


def bench_self(idle_s: float, env: dict) -> dict:
    code = f"""
import time
t0 = time.process_time()
import greend
tracked = __import__("sys").argv[1] == "1"
if tracked:
    run = greend.track("idle", interval_s=1.0)
    run.start()
    run._backend.ready.wait(30)
    time.sleep(1.5)
c0, w0 = time.process_time(), time.monotonic()
time.sleep({idle_s})
c1, w1 = time.process_time(), time.monotonic()
setup = c0 - t0
if tracked:
    run.stop()
print(c1 - c0, w1 - w0, setup)
"""
    out = {}
    for tracked in ("0", "1"):
        cpu, wall, setup = map(float, subprocess.run(
            [sys.executable, "-c", code, tracked], env=env, check=True, capture_output=True,
            text=True).stdout.split())
        out[tracked] = (cpu, wall, setup)
    base_cpu, wall, _ = out["0"]
    cpu, wall1, setup = out["1"]
    pct = (cpu - base_cpu) / wall1 * 100
    return {"self_sampling_interval_s": 1.0, "idle_s": idle_s,
            "self_sampling_cpu_pct_of_one_core": round(pct, 3),
            "self_sampling_cpu_ms_per_tick": round((cpu - base_cpu) / wall1 * 1e3, 3),
            "sampler_startup_cpu_s": round(setup, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="fresh interpreters for the import figure")
    ap.add_argument("--boundaries", type=int, default=500, help="phase boundaries through the daemon")
    ap.add_argument("--idle-s", type=float, default=30.0, help="steady state timed for self-sampling")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="greend-bench-track-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GREEND_"))}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        env["GREEND_STATE_DIR"] = str(Path(tmp) / "user-state")
        figures = {**bench_import(args.runs, env), **bench_boundary(args.boundaries, env, Path(tmp)),
                   **bench_self(args.idle_s, env)}
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for k, v in figures.items():
        print(f"{k:40s} {v}")


if __name__ == "__main__":
    main()
