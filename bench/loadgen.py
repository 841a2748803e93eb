"""A bounded load generator: N simulated agents (default 10,000) sending job records to one or more
`greend controller` URLs, as node agents do (docs/site-mode.md), with time compressed.

Each simulated agent is a node running --jobs-per-node jobs. Every --send-interval-s seconds of
simulated time (the agents' default cadence, controller.send_interval_s = 30 s) it posts one batch:
the records of its running jobs with their absolute totals and current series bucket
(sampling.series_step_s = 60 s), its node totals, and the final record of any job that ended
(jobs last --job-s, then the next one starts). --speedup K runs simulated time K times faster than
the wall clock, so a 60 s run covers K minutes of a site's traffic.

Memory and descriptors are bounded whatever N is: the agents are entries in one schedule (a heap of
due times), served by --connections kept-alive HTTP/1.1 connections (asyncio streams; default 64,
well under the controller's 4,096 connections), spread over the URLs (agent i uses URL i mod the
number of URLs). The generator knows nothing of the controller's storage: it takes URLs and a token.

    .venv/bin/python bench/loadgen.py --url http://127.0.0.1:9472 --token-file site.token
    .venv/bin/python bench/loadgen.py --start-controller --agents 1000 --duration 60 --speedup 10

--start-controller runs a real `greend controller` (SQLite, temporary state, loopback) for the run.
Prints: offered and stored records/s, batch latency p50/p99 (request to answer on a connection),
schedule lag p99 (how late batches left: the controller or the generator not keeping up), errors
by kind; --json for scripts. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

FACTORS = {"id": "loadgenfactors01", "pue": 1.4, "wue_site_l_per_kwh": 1.8, "ewif_l_per_kwh": 3.1,
           "carbon_intensity_g_per_kwh": 52.0, "sources": {"pue": "loadgen"}, "first_used": 1.7e9}
T0 = 1.77e9  # simulated time starts here (2026)


@dataclass
class Agent:
    index: int
    node: str
    url: int
    jobs: list[int]  # job numbers, one per slot
    started: list[float]  # simulated start of each slot's job
    last_sent: float = 0.0


@dataclass
class Stats:
    batches: int = 0
    records: int = 0
    accepted: int = 0
    stale: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_s: list[float] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)
    cpu_s: float = 0.0  # the generator's own CPU time (it shares the machine with the controller)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def record(cluster: str, agent: Agent, slot: int, now: float, state: str) -> dict:
    """One job's record at simulated time `now`: totals grow with its age, like a busy job's."""
    job = agent.jobs[slot]
    age = max(1.0, now - agent.started[slot])
    cpu_uj = int(age * 40e6)  # 40 W of CPU
    step = 60.0
    bucket = now - now % step
    return {
        "cluster": cluster, "job_id": str(job), "node": agent.node, "kind": "slurm", "state": state,
        "first_seen": agent.started[slot], "last_seen": now, "submit_time": int(agent.started[slot]) - 30,
        "user": f"user{job % 97}", "uid": 10000 + job % 97, "account": f"proj{job % 31}",
        "partition": "cpu", "tier": "site", "alloc_cpus": 8.0, "alloc_mem_bytes": 16 << 30,
        "end_time": now if state == "ended" else None,
        "cpu_time_ns": int(age * 7.5e9), "cpu_uj": cpu_uj, "dram_uj": cpu_uj // 10,
        "memory_uj": cpu_uj // 20, "facility_j": cpu_uj * 1.4e-6, "carbon_g": cpu_uj * 2e-8,
        "water_site_l": cpu_uj * 5e-10, "water_offsite_l": cpu_uj * 9e-10,
        "max_mem_bytes": 3 << 30, "provenance": {"cpu": "measured: RAPL powercap"},
        "meta": {"key": f"slurm/{cluster}/{job}"},
        "series": [{"t_start": bucket, "t_end": now, "factor_set": FACTORS["id"],
                    "cpu_uj": int((now - bucket) * 40e6), "dram_uj": 0, "gpu_uj": 0,
                    "memory_uj": 0, "cpu_time_ns": int((now - bucket) * 7.5e9),
                    "carbon_g": (now - bucket) * 0.8, "water_site_l": 0.0,
                    "water_offsite_l": 0.0}],
    }


def batch(args, agent: Agent, now: float) -> tuple[bytes, int]:
    records = []
    for slot in range(len(agent.jobs)):
        if now - agent.started[slot] >= args.job_s:  # the job ended: its final record, then the next
            records.append(record(args.cluster, agent, slot, agent.started[slot] + args.job_s, "ended"))
            agent.jobs[slot] += args.agents * args.jobs_per_node
            agent.started[slot] = now
        records.append(record(args.cluster, agent, slot, now, "running"))
    energy = int((now - T0 + 86400) * 300e6)
    body = {"agent": {"cluster": args.cluster, "node": agent.node, "version": "loadgen"},
            "factor_sets": [FACTORS], "records": records,
            "nodes": [{"node": agent.node,
                       "totals": [{"domain": "package-0", "source": "cpu",
                                   "provenance": "measured: RAPL powercap", "energy_uj": energy,
                                   "unattributed_uj": energy // 8, "idle_uj": energy // 4}],
                       "series": [{"t_start": now - now % 60, "t_end": now,
                                   "energy_uj": int((now % 60) * 300e6),
                                   "unattributed_uj": int((now % 60) * 30e6)}]}]}
    return json.dumps(body, separators=(",", ":")).encode(), len(records)


class Connection:
    """One kept-alive HTTP/1.1 connection (reopened after an error or a close)."""

    def __init__(self, url: str, token: str, timeout_s: float):
        u = urlsplit(url)
        if u.scheme != "http":
            raise SystemExit(f"--url {url}: only http:// (the generator runs on loopback)")
        self.host, self.port = u.hostname, u.port or 80
        self.path = u.path.rstrip("/") + "/api/v1/records"
        self.head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                     f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                     "User-Agent: greend-loadgen\r\n")
        self.timeout_s = timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            k, _, v = line.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "connection" and "close" in v.lower():
                close = True
        payload = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, payload


async def run(args, urls: list[str], token: str) -> tuple[Stats, float]:
    agents = [Agent(i, f"lg{i:05d}", i % len(urls),
                    [i * args.jobs_per_node + j for j in range(args.jobs_per_node)],
                    # jobs started at staggered times so that they do not all end together
                    [T0 - (i * 7919 + j * 104729) % args.job_s for j in range(args.jobs_per_node)])
              for i in range(args.agents)]
    # First sends spread over one interval, as agents started at different times would be.
    heap = [((i * 0.618034) % 1.0 * args.send_interval_s / args.speedup, i) for i in range(args.agents)]
    heapq.heapify(heap)
    queues = [[] for _ in urls]  # each URL's share of the schedule
    for due, i in heap:
        queues[agents[i].url].append((due, i))
    for q in queues:
        heapq.heapify(q)
    stats = Stats()
    cpu0 = time.process_time()
    start = time.monotonic()
    end = start + args.duration

    async def worker(url_index: int) -> None:
        conn = Connection(urls[url_index], token, args.timeout_s)
        q = queues[url_index]
        try:
            while q:
                due, i = heapq.heappop(q)
                wall_due = start + due
                if wall_due >= end or time.monotonic() >= end:  # what is late is left unsent
                    heapq.heappush(q, (due, i))
                    return
                wait = wall_due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                sent_at = time.monotonic()
                stats.lag_s.append(max(0.0, sent_at - wall_due))
                agent = agents[i]
                now = T0 + (sent_at - start) * args.speedup
                body, n = batch(args, agent, now)
                t = time.monotonic()
                try:
                    status, payload = await asyncio.wait_for(conn.post(body), args.timeout_s)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                    stats.error(type(e).__name__)
                    await conn.close()
                    status = 0
                stats.latency_s.append(time.monotonic() - t)
                stats.batches += 1
                if status == 200:
                    out = json.loads(payload)
                    stats.records += n
                    stats.accepted += out.get("accepted", 0)
                    stats.stale += out.get("stale", 0)
                elif status:
                    stats.error(f"HTTP {status}")
                # The next send: one interval after this one was due (a late agent catches up).
                heapq.heappush(q, (due + args.send_interval_s / args.speedup, i))
        finally:
            await conn.close()

    per_url = max(1, args.connections // len(urls))
    await asyncio.gather(*(worker(u) for u in range(len(urls)) for _ in range(per_url)))
    stats.cpu_s = time.process_time() - cpu0
    return stats, time.monotonic() - start


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


# -- an optional controller for the run ------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_controller(workdir: Path, token: str, name: str = "controller",
                     database: dict | None = None) -> tuple[subprocess.Popen, str]:
    """A real `greend controller` on loopback; database: extra [controller] keys (a server's URL and
    password file), none for SQLite."""
    tok = workdir / "token"
    tok.write_text(token)
    tok.chmod(0o600)
    lines = ["[controller]", "max_batch_records = 10000"]
    lines += [f'{k} = "{v}"' for k, v in (database or {}).items()]
    (workdir / f"{name}.toml").write_text("\n".join(lines) + "\n")
    port = free_port()
    greend = shutil.which("greend", path=str(Path(sys.executable).parent)) or "greend"
    log = (workdir / f"{name}.log").open("ab")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREEND_")}
    proc = subprocess.Popen([greend, "-c", str(workdir / f"{name}.toml"), "--state-dir",
                             str(workdir / name), "controller", "--listen", f"127.0.0.1:{port}",
                             "--token-file", str(tok), "--socket", ""],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"greend controller exited; log: {workdir / (name + '.log')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("greend controller did not listen within 30 s")


def stop_controller(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def ledger_size(workdir: Path) -> dict | None:
    """The stopped controller's SQLite ledger: bytes, job records, series buckets."""
    import sqlite3

    paths = sorted(workdir.rglob("ledger.sqlite"))
    if not paths:
        return None
    db = sqlite3.connect(paths[0])
    try:
        jobs = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        series = db.execute("SELECT COUNT(*) FROM job_series").fetchone()[0]
    finally:
        db.close()
    size = sum(p.stat().st_size for p in paths[0].parent.glob("ledger.sqlite*"))
    return {"bytes": size, "jobs": jobs, "series": series,
            "bytes_per_job": round(size / jobs) if jobs else None}


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n")
    ap = argparse.ArgumentParser(prog="bench/loadgen.py", description=doc[0],
                                 epilog="\n\n".join(doc[1:4]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", action="append", default=[], help="a controller's base URL "
                    "(repeat for several controllers; agents are spread over them)")
    ap.add_argument("--token-file", type=Path, help="the site token file the controllers read")
    ap.add_argument("--start-controller", action="store_true",
                    help="run greend controller(s) (temporary state) for the run")
    ap.add_argument("--database", choices=("sqlite", "mysql", "postgresql"), default="sqlite",
                    help="with --start-controller: the site database; mysql and postgresql start "
                    "a private MariaDB/PostgreSQL server (tests/sitedb_servers.py) (sqlite)")
    ap.add_argument("--controllers", type=int, default=1,
                    help="with --start-controller and a server database: controllers sharing it (1)")
    ap.add_argument("--agents", type=int, default=10000, help="simulated agents (nodes; default 10000)")
    ap.add_argument("--jobs-per-node", type=int, default=4, help="jobs each node runs at once (4)")
    ap.add_argument("--job-s", type=float, default=3600.0,
                    help="simulated length of a job, seconds (3600); then the next one starts")
    ap.add_argument("--send-interval-s", type=float, default=30.0,
                    help="simulated seconds between an agent's sends (30, controller.send_interval_s)")
    ap.add_argument("--speedup", type=float, default=10.0,
                    help="simulated seconds per wall-clock second (10)")
    ap.add_argument("--duration", type=float, default=60.0, help="wall-clock seconds to run (60)")
    ap.add_argument("--connections", type=int, default=64, help="HTTP connections in all (64)")
    ap.add_argument("--timeout-s", type=float, default=30.0, help="timeout of one request (30)")
    ap.add_argument("--cluster", default="loadgen", help="cluster name of the records (loadgen)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    for name in ("agents", "jobs_per_node", "connections", "controllers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected at least 1")
    for name in ("job_s", "send_interval_s", "speedup", "duration", "timeout_s"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')}: expected a positive number")
    if args.start_controller == bool(args.url):
        ap.error("give --url (one or more) or --start-controller")
    if args.database == "sqlite" and args.controllers > 1:
        ap.error("--controllers: several controllers share a server database (--database mysql "
                 "or postgresql), not one SQLite file")
    if not args.start_controller and (args.database != "sqlite" or args.controllers > 1):
        ap.error("--database and --controllers go with --start-controller")
    procs: list[subprocess.Popen] = []
    tmp = server = None
    if args.start_controller:
        token = "loadgen-token-0123456789abcdef"
        tmp = Path(tempfile.mkdtemp(prefix="greend-loadgen-"))
        database = None
        if args.database != "sqlite":
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            import sitedb_servers as ss

            server = ss.start_mariadb() if args.database == "mysql" else ss.start_postgresql()
            pw = tmp / "db.pw"
            pw.write_text(ss.PASSWORD)
            pw.chmod(0o600)
            database = {"database": server.new_database(), "database_password_file": str(pw)}
        urls = []
        try:
            for i in range(args.controllers):
                p, url = start_controller(tmp, token, f"controller{i}", database)
                procs.append(p)
                urls.append(url)
        except BaseException:
            for p in procs:
                stop_controller(p)
            if server is not None:
                server.stop()
            raise
    else:
        if args.token_file is None:
            ap.error("--url needs --token-file (the site token)")
        try:
            token = args.token_file.read_text().strip()
        except OSError as e:
            ap.error(f"--token-file {args.token_file}: {e.strerror}")
        urls = [u.rstrip("/") for u in args.url]
    try:
        stats, elapsed = asyncio.run(run(args, urls, token))
        ledger = None
        while procs:
            stop_controller(procs.pop())
        if tmp is not None and args.database == "sqlite":
            ledger = ledger_size(tmp)
    finally:
        for p in procs:
            stop_controller(p)
        if server is not None:
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    offered = args.agents * args.jobs_per_node / args.send_interval_s * args.speedup
    out = {
        "agents": args.agents, "urls": urls, "connections": args.connections,
        "database": args.database if args.start_controller else None,
        "speedup": args.speedup, "duration_s": round(elapsed, 2),
        "offered_records_per_s": round(offered, 1),
        "batches": stats.batches, "records_stored": stats.records,
        "records_per_s": round(stats.records / elapsed, 1),
        "accepted": stats.accepted, "stale": stats.stale,
        "latency_p50_s": round(percentile(stats.latency_s, 50), 4),
        "latency_p99_s": round(percentile(stats.latency_s, 99), 4),
        "lag_p99_s": round(percentile(stats.lag_s, 99), 4),
        "errors": stats.errors,
        "generator_cpu_s": round(stats.cpu_s, 1),
    }
    if ledger is not None:
        out["ledger"] = ledger
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['agents']} agents -> {', '.join(urls)} over {args.connections} connections, "
              f"x{args.speedup:g} time, {elapsed:.1f} s")
        print(f"  offered  {offered:10.1f} records/s ({args.jobs_per_node} jobs a node, a batch "
              f"every {args.send_interval_s:g} simulated s)")
        print(f"  stored   {out['records_per_s']:10.1f} records/s ({stats.records} records in "
              f"{stats.batches} batches; {stats.stale} stale)")
        print(f"  latency  p50 {out['latency_p50_s'] * 1000:.1f} ms, p99 "
              f"{out['latency_p99_s'] * 1000:.1f} ms; schedule lag p99 {out['lag_p99_s']:.2f} s")
        print(f"  errors   {stats.errors or 'none'}; the generator used {stats.cpu_s:.1f} s of CPU")
        if ledger is not None:
            print(f"  ledger   {ledger['bytes']} bytes: {ledger['jobs']} job records, "
                  f"{ledger['series']} series buckets; {ledger['bytes_per_job']} bytes a job record "
                  "with its buckets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
