"""Ingest rate of the site controller: job records posted over HTTP, in batches, by several agents.

Starts a real `greend controller` (temporary state directory and token, loopback port), then posts
pre-encoded batches as `--agents` concurrent agents would: first every record new (inserts), then
the same records again with newer totals (updates, the steady state of running jobs). Prints the
figures; not a test. Usage:

    .venv/bin/python bench/bench_controller.py [--records 40000] [--batch 500] [--agents 4]
        [--series 1]

Goal (issue 3): more than 2,000 records/s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GREEND = str(Path(sys.executable).with_name("greend"))
TOKEN = "bench-token-0123456789"
FACTORS = {"id": "benchfactors0001", "pue": 1.4, "wue_site_l_per_kwh": 1.8, "ewif_l_per_kwh": 3.1,
           "carbon_intensity_g_per_kwh": 52.0, "sources": {"pue": "bench"}, "first_used": 1.7e9}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(node: str, i: int, t: float, series: int) -> dict:
    cpu = int((t - 1.7e9) * 1e6) + i
    return {
        "cluster": "bench", "job_id": str(1_000_000 + i), "node": node, "kind": "slurm",
        "state": "running", "first_seen": 1.7e9, "last_seen": t, "user": f"user{i % 97}",
        "uid": 10000 + i % 97, "account": f"proj{i % 31}", "partition": "cpu", "tier": "site",
        "alloc_cpus": 4.0, "alloc_mem_bytes": 8 << 30, "cpu_time_ns": cpu * 1000, "cpu_uj": cpu,
        "dram_uj": cpu // 10, "memory_uj": cpu // 20, "facility_j": cpu * 1.4e-6,
        "carbon_g": cpu * 2e-8, "water_site_l": cpu * 5e-10, "water_offsite_l": cpu * 9e-10,
        "max_mem_bytes": 3 << 30, "provenance": {"cpu": "measured: RAPL powercap"},
        "meta": {"key": f"slurm/bench/{1_000_000 + i}"},
        "series": [{"t_start": t - 60 * (k + 1), "t_end": t - 60 * k, "factor_set": FACTORS["id"],
                    "cpu_uj": cpu // 100, "dram_uj": 0, "gpu_uj": 0, "memory_uj": 0,
                    "cpu_time_ns": cpu * 10, "carbon_g": 1e-6, "water_site_l": 0.0,
                    "water_offsite_l": 0.0} for k in range(series)],
    }


def batches(n_records: int, batch: int, agents: int, t: float, series: int) -> list[list[bytes]]:
    """Pre-encoded request bodies, per agent (one agent = one node)."""
    per_agent = [[] for _ in range(agents)]
    per_node = n_records // agents
    for a in range(agents):
        node = f"node{a:04d}"
        for start in range(0, per_node, batch):
            recs = [record(node, a * per_node + i, t, series)
                    for i in range(start, min(per_node, start + batch))]
            body = {"agent": {"cluster": "bench", "node": node, "version": "bench"},
                    "factor_sets": [FACTORS], "records": recs}
            per_agent[a].append(json.dumps(body, separators=(",", ":")).encode())
    return per_agent


def post_all(port: int, per_agent: list[list[bytes]]) -> tuple[float, int, list[str]]:
    errors: list[str] = []
    accepted = [0]
    lock = threading.Lock()

    def agent(bodies: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        for body in bodies:
            conn.request("POST", "/api/v1/records", body=body, headers=headers)
            r = conn.getresponse()
            out = r.read()
            with lock:
                if r.status != 200:
                    errors.append(f"HTTP {r.status}: {out[:200]!r}")
                else:
                    accepted[0] += json.loads(out)["accepted"]
        conn.close()

    threads = [threading.Thread(target=agent, args=(b,)) for b in per_agent]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, accepted[0], errors


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=40000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--series", type=int, default=1, help="series buckets per record")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="greend-bench-ctl-"))
    proc = None
    try:
        tok = tmp / "token"
        tok.write_text(TOKEN)
        tok.chmod(0o600)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GREEND_")}
        proc = subprocess.Popen([GREEND, "--state-dir", str(tmp / "ctl"), "controller", "--listen",
                                 f"127.0.0.1:{port}", "--token-file", str(tok), "--socket", ""],
                                env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(proc.stderr.read().decode(), file=sys.stderr)
                    return 1
                time.sleep(0.1)
        n = args.records // args.agents * args.agents
        t = time.time()
        print(f"controller ingest: {n} records, batches of {args.batch}, {args.agents} agents "
              f"in parallel, {args.series} series bucket(s) a record, {os.cpu_count()} CPUs")
        for phase, tt in (("new records (inserts)", t), ("newer totals (updates)", t + 30),
                          ("resends (same totals)", t + 30)):
            bodies = batches(n, args.batch, args.agents, tt, args.series)
            size = sum(len(b) for bs in bodies for b in bs)
            c0 = cpu_s(proc.pid)
            wall, accepted, errors = post_all(port, bodies)
            used = cpu_s(proc.pid) - c0
            if errors:
                print(f"  {phase}: {len(errors)} errors, e.g. {errors[0]}")
                return 1
            print(f"  {phase:<26} {n / wall:8.0f} records/s  ({wall:.2f} s, {accepted} stored, "
                  f"{size / wall / 1e6:.1f} MB/s of JSON, controller CPU {used:.2f} s = "
                  f"{n / max(used, 1e-9):.0f} records per CPU-second)")
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
