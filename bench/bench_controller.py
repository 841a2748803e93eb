"""Ingest rate of the site controller: job records posted over HTTP, in batches, by several agents.

Starts real `greend controller`s (temporary state directory and token, loopback ports) on each site
database in turn (SQLite, the reference; MariaDB and PostgreSQL, private servers started here as
the tests start them: tests/sitedb_servers.py), then posts pre-encoded batches as `--agents`
concurrent agents would: first every record new (inserts), then the same records again with newer
totals (updates, the steady state of running jobs), then resends. On a server it runs again with
`--controllers 2` controllers sharing the database, agents split between them. Prints the figures
(records/s, p99 batch latency); not a test. Usage:

    .venv/bin/python bench/bench_controller.py [--records 40000] [--batch 500] [--agents 4]
        [--series 1] [--databases sqlite,mysql,postgresql] [--controllers 1,2]

Goals: more than 2,000 records/s on a 2-core machine (issue 3); at least 10,000 records/s through
MariaDB or PostgreSQL, and the gain of a second controller (issue 18).
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


def post_all(ports: list[int], per_agent: list[list[bytes]]
             ) -> tuple[float, int, list[str], list[float]]:
    """Every agent posts its batches to one controller (agents split between `ports`):
    (seconds, records stored, errors, each batch's latency in seconds)."""
    errors: list[str] = []
    accepted = [0]
    latencies: list[float] = []
    lock = threading.Lock()

    def agent(port: int, bodies: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        for body in bodies:
            t = time.perf_counter()
            conn.request("POST", "/api/v1/records", body=body, headers=headers)
            r = conn.getresponse()
            out = r.read()
            with lock:
                latencies.append(time.perf_counter() - t)
                if r.status != 200:
                    errors.append(f"HTTP {r.status}: {out[:200]!r}")
                else:
                    accepted[0] += json.loads(out)["accepted"]
        conn.close()

    threads = [threading.Thread(target=agent, args=(ports[i % len(ports)], b))
               for i, b in enumerate(per_agent)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, accepted[0], errors, latencies


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def start_controller(tmp: Path, name: str, tok: Path, database: dict) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = tmp / f"{name}.toml"
    lines = ["[controller]"] + [f'{k} = "{v}"' for k, v in database.items()]
    cfg.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREEND_")}
    proc = subprocess.Popen([GREEND, "-c", str(cfg), "--state-dir", str(tmp / name), "controller",
                             "--listen", f"127.0.0.1:{port}", "--token-file", str(tok), "--socket", ""],
                            env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{name}: {proc.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.1)


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds of a process and all its descendants (a database server and its backends;
    PostgreSQL runs under runuser as root)."""
    if pid is None:
        return 0.0
    stats: dict[int, tuple[int, float]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            f = (p / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        stats[int(p.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
    tree, total, grew = {pid}, 0.0, True
    while grew:
        grew = False
        for p, (ppid, _) in stats.items():
            if ppid in tree and p not in tree:
                tree.add(p)
                grew = True
    for p in tree:
        total += stats.get(p, (0, 0.0))[1]
    return total


def run_one(args, tmp: Path, tok: Path, label: str, database: dict, controllers: int,
            server_pid: int | None = None) -> bool:
    procs = []
    try:
        for i in range(controllers):
            procs.append(start_controller(tmp, f"{label}-{controllers}-{i}", tok, database))
        ports = [p for _, p in procs]
        n = args.records // args.agents * args.agents
        t = time.time()
        print(f"{label}, {controllers} controller(s):")
        for phase, tt in (("new records (inserts)", t), ("newer totals (updates)", t + 30),
                          ("resends (same totals)", t + 30)):
            bodies = batches(n, args.batch, args.agents, tt, args.series)
            size = sum(len(b) for bs in bodies for b in bs)
            c0 = sum(cpu_s(p.pid) for p, _ in procs)
            s0 = tree_cpu_s(server_pid)
            wall, accepted, errors, lat = post_all(ports, bodies)
            used = sum(cpu_s(p.pid) for p, _ in procs) - c0
            server = tree_cpu_s(server_pid) - s0
            if errors:
                print(f"  {phase}: {len(errors)} errors, e.g. {errors[0]}")
                return False
            lat.sort()
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            print(f"  {phase:<26} {n / wall:8.0f} records/s  ({wall:.2f} s, {accepted} stored, "
                  f"p99 batch {p99 * 1000:.0f} ms, {size / wall / 1e6:.1f} MB/s of JSON, "
                  f"controller CPU {used:.2f} s = {n / max(used, 1e-9):.0f} records per CPU-second"
                  + (f", database server CPU {server:.2f} s" if server_pid else "") + ")", flush=True)
        return True
    finally:
        for p, _ in procs:
            p.terminate()
            p.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=40000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--series", type=int, default=1, help="series buckets per record")
    ap.add_argument("--databases", default="sqlite,mysql,postgresql",
                    help="site databases to compare, in order (sqlite, mysql, postgresql)")
    ap.add_argument("--controllers", default="1,2",
                    help="numbers of controllers to run on a server database")
    args = ap.parse_args()
    counts = [int(x) for x in args.controllers.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="greend-bench-ctl-"))
    servers = []
    try:
        tok = tmp / "token"
        tok.write_text(TOKEN)
        tok.chmod(0o600)
        print(f"controller ingest: {args.records} records, batches of {args.batch}, {args.agents} "
              f"agents in parallel, {args.series} series bucket(s) a record, {os.cpu_count()} CPUs")
        for db in args.databases.split(","):
            if db == "sqlite":
                if not run_one(args, tmp, tok, "sqlite", {}, 1):
                    return 1
                continue
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            import sitedb_servers as ss

            server = ss.start_mariadb() if db == "mysql" else ss.start_postgresql()
            servers.append(server)
            pw = tmp / f"{db}.pw"
            pw.write_text(ss.PASSWORD)
            pw.chmod(0o600)
            for c in counts:
                database = {"database": server.new_database(), "database_password_file": str(pw)}
                if not run_one(args, tmp, tok, db, database, c, server.proc.pid):
                    return 1
        return 0
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
