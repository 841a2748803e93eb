"""Routing decisions per second in-process with cached cluster state, the latency of the
`greend route` command including interpreter start-up, and (--sbatch, as root on the Slurm
testbed) what examples/cli_filter.lua asking a running daemon adds to a real `sbatch`. Prints the
figures; not a test. Usage:

    .venv/bin/python bench/bench_route.py [--seconds 5] [--runs 20] [--live] [--json]
    sudo .venv/bin/python bench/bench_route.py --sbatch 200 [--json]

The site is examples/testbed.toml (3 clusters, 6 partitions, default rules, budgets) with a ledger
of 20,000 ended jobs (history and budget queries are real SQLite queries, cached as in a daemon).
Cluster state is synthetic (one busy site) unless --live, which asks the Slurm testbed once and then
refreshes it in the background thread, as a long-running router would.

Goals (issue 6): > 5,000 decisions/s in-process; `greend route` < 300 ms including start-up.
Goal (issue 14): the cli_filter adds under 50 ms at p99 to a real sbatch. --sbatch N submits N held
jobs (cancelled afterwards, by id) to the testbed's site cluster as greendtest, alternating a
slurm.conf without the cli_filter and one with it (a root `greend run` with daemon.route_warm
answering on its socket), and times the filter's request alone (curl on the socket, as greendtest).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "testbed.toml"
GREEND = Path(sys.executable).with_name("greend")


def seed_ledger(path: Path, n: int, now: float) -> None:
    from greend.ledger import JobRow, Ledger

    rnd = random.Random(1)
    led = Ledger(path)
    with led.transaction() as db:
        for i in range(n):
            start = now - rnd.uniform(3600, 60 * 86400)
            el = rnd.uniform(60, 8 * 3600)
            cpus = rnd.choice([1, 2, 4, 8])
            led.upsert_job(db, JobRow(
                cluster=rnd.choice(["local", "site", "national"]), job_id=str(i), node="n1", kind="slurm",
                state="ended", first_seen=start, last_seen=start + el, end_time=start + el,
                user=f"user{i % 50}", name=f"job{i % 20}", account=f"proj-{i % 10}",
                alloc_cpus=cpus, alloc_mem_bytes=cpus * 2**31, cpu_time_ns=int(el * cpus * 0.6e9),
                cpu_uj=int(el * cpus * 8e6), max_mem_bytes=cpus * 2**29, facility_j=el * cpus * 10.0,
                carbon_g=el * cpus * 1e-4, water_site_l=el * 1e-6,
            ))
    led.close()


def synthetic_states(site, now: float) -> dict:
    from greend.policies.state import ClusterState, JobState, NodeState

    out = {}
    for c in site.clusters:
        n = {"local": 1, "site": 2, "national": 1}.get(c.name, 1)
        cpus = {"local": 2, "site": 4, "national": 8}.get(c.name, 4)
        busy = c.name == "site"
        nodes = [NodeState(f"{c.name}-n{i}", "mixed", cpus, cpus - 1 if busy else 0, 4000.0, 1024.0,
                           ("debug", "batch"), True) for i in range(1, n + 1)]
        running = [JobState(str(i), "RUNNING", cpus - 1, "batch", 7200.0, now + 1800 * i, (f"{c.name}-n{i}",))
                   for i in range(1, n + 1)] if busy else []
        pending = [JobState("99", "PENDING", 2, "batch", 3600.0, now + 3600, ())] if busy else []
        out[c.name] = ClusterState(c.name, True, now, nodes=nodes, running=running, pending=pending)
    return out


def requests(now: float, n: int = 200):
    from greend.policies.request import build_request

    rnd = random.Random(2)
    out = []
    for i in range(n):
        opts = [("cpus-per-task", str(rnd.choice([1, 2, 4, 8]))),
                ("time", rnd.choice(["10", "30", "2:00:00", "1-00:00:00"])),
                ("mem", rnd.choice(["500M", "2G", "3G"])),
                ("account", rnd.choice(["proj-green", "proj-hds", "proj-budget", "proj-3", "proj-7"])),
                ("job-name", f"job{i % 20}")]
        if rnd.random() < 0.2:
            opts.append(("data-class", "hds"))
        if rnd.random() < 0.2:
            opts += [("deferrable", None), ("deadline", "+20h")]
        out.append(build_request(None, opts, user=f"user{i % 50}", now=now))
    return out


def bench_in_process(seconds: float, live: bool) -> dict:
    from greend.policies.engine import Engine
    from greend.policies.history import LedgerView
    from greend.policies.site import compile_site
    from greend.policies.state import StateCache

    from greend import config as config_mod

    now = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-route-"))
    seed_ledger(tmp / "ledger.sqlite", 20000, now)
    cfg = config_mod.load(CONFIG)
    site = compile_site(cfg, CONFIG)
    ledger = LedgerView(tmp / "ledger.sqlite", site)
    cache = None
    if live:
        cache = StateCache(site.clusters, max_age_s=3600)
        cache.refresh()
        cache.start(interval_s=10)  # background refresh; decisions read memory only
        engine = Engine(site, ledger=ledger, states=cache)
        states = None
    else:
        engine = Engine(site, ledger=ledger)
        states = synthetic_states(site, now)
    reqs = requests(now)
    outcomes: dict[str, int] = {}
    for r in reqs:  # warm the ledger caches, count outcomes
        d = engine.decide(r, states=states)
        key = d.cluster or d.outcome
        outcomes[key] = outcomes.get(key, 0) + 1
    lat = []
    n = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    while time.perf_counter() - t0 < seconds:
        for r in reqs:
            s = time.perf_counter()
            engine.decide(r, states=states)
            lat.append(time.perf_counter() - s)
        n += len(reqs)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    # one full explanation, as `greend route --json` renders it
    s = time.perf_counter()
    json.dumps(engine.decide(reqs[0], states=states).to_dict())
    explain_ms = (time.perf_counter() - s) * 1e3
    if cache is not None:
        cache.stop()
    lat.sort()
    return {
        "decisions": n, "wall_s": round(wall, 3), "decisions_per_s": round(n / wall),
        "decisions_per_cpu_s": round(n / cpu), "p50_us": round(lat[len(lat) // 2] * 1e6, 1),
        "p99_us": round(lat[int(len(lat) * 0.99)] * 1e6, 1), "explain_json_ms": round(explain_ms, 2),
        "state": "live testbed, background refresh" if live else "synthetic", "outcomes": outcomes,
    }


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _time_cmd(argv: list[str], runs: int, env: dict, cwd: Path) -> dict:
    """Wall time (what a user waits) and CPU time (user + system: what the command costs, less
    sensitive to other load on the host) of a command, over `runs` runs."""
    times, cpus = [], []
    for _ in range(runs):
        c = _children_cpu()
        s = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
        times.append(time.perf_counter() - s)
        cpus.append(_children_cpu() - c)
        if p.returncode not in (0, 1):
            raise SystemExit(f"{' '.join(argv)} failed: {p.stderr}")
    times.sort()
    return {"median_ms": round(statistics.median(times) * 1e3, 1),
            "p90_ms": round(times[int(len(times) * 0.9) - 1] * 1e3, 1), "min_ms": round(times[0] * 1e3, 1),
            "cpu_median_ms": round(statistics.median(cpus) * 1e3, 1)}


def bench_command(runs: int, live: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-route-cmd-"))
    script = tmp / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH -c 2\n#SBATCH -t 1:00:00\n#SBATCH -A proj-green\nsrun true\n")
    # As installed: greend's modules from a bytecode cache (this environment sets
    # PYTHONDONTWRITEBYTECODE, which would compile them at every start), and the configuration's
    # cached view (greend.config_cache) after the first run; "first run" has a fresh cache each time.
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp), "GREEND_STATE_DIR": str(tmp),
           "PYTHONPYCACHEPREFIX": str(tmp / "pycache")}
    env.pop("GREEND_CONFIG", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    route = [str(GREEND), "-c", str(CONFIG), "route", "--no-live", str(script)]
    subprocess.run(route, capture_output=True, env=env, cwd=tmp)  # bytecode and configuration cached
    misses, miss_cpus = [], []
    for i in range(max(3, runs // 2)):
        c, s = _children_cpu(), time.perf_counter()
        subprocess.run(route, capture_output=True, env={**env, "XDG_CACHE_HOME": str(tmp / f"cold{i}")},
                       cwd=tmp)
        misses.append(time.perf_counter() - s)
        miss_cpus.append(_children_cpu() - c)
    out = {
        "python -c pass": _time_cmd([sys.executable, "-c", "pass"], runs, env, tmp),
        "greend --version": _time_cmd([str(GREEND), "--version"], runs, env, tmp),
        "greend route --no-live": _time_cmd(route, runs, env, tmp),
        "greend route --no-live, first run (no config cache)": {
            "median_ms": round(statistics.median(misses) * 1e3, 1),
            "p90_ms": round(sorted(misses)[int(len(misses) * 0.9) - 1] * 1e3, 1),
            "min_ms": round(min(misses) * 1e3, 1),
            "cpu_median_ms": round(statistics.median(miss_cpus) * 1e3, 1)},
    }
    if live:
        # The state file is fresh after the first run (policy.state_max_age_s = 10 in the example).
        out["greend route (cached live state)"] = _time_cmd(
            [str(GREEND), "-c", str(CONFIG), "route", str(script)], runs, env, tmp)
        out["greend route --refresh (asks 3 controllers)"] = _time_cmd(
            [str(GREEND), "-c", str(CONFIG), "route", "--refresh", str(script)], max(runs // 2, 3), env, tmp)
    return out


def _pct(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_ms": round(xs[len(xs) // 2] * 1e3, 1),
            "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e3, 1),
            "max_ms": round(xs[-1] * 1e3, 1)}


def bench_sbatch(n: int, user: str = "greendtest") -> dict:
    """Real sbatch with and without the cli_filter (see the module's docstring)."""
    import shutil
    import tomllib

    sys.path.insert(0, str(REPO / "tests"))
    from test_policies import _toml  # the tests' small TOML writer

    if os.geteuid() != 0:
        raise SystemExit("--sbatch needs root (a root daemon, sbatch as the test user)")
    site_conf = Path("/tmp/greend-testbed/site/etc/slurm.conf")
    if not site_conf.exists():
        raise SystemExit(f"{site_conf}: no Slurm testbed (testbed/slurm-testbed start)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-route-sbatch-", dir="/tmp"))
    tmp.chmod(0o755)
    data = tomllib.loads(CONFIG.read_text())
    data.update({"node": "bench", "sampling": {"interval_s": 5.0, "checkpoint_interval_s": 30.0},
                 "attribution": {"jobs_from": "procscan"}, "power": {"rapl": False},
                 "daemon": {"route_warm": True, "route_per_minute": 100000}})
    (tmp / "greend.toml").write_text(_toml(data))
    sock = tmp / "api.sock"
    clif = tmp / "clif"
    clif.mkdir()
    (clif / "slurm.conf").write_text(site_conf.read_text() + "\nCliFilterPlugins=cli_filter/lua\n")
    shutil.copy(REPO / "examples" / "cli_filter.lua", clif / "cli_filter.lua")
    script = tmp / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH -c 1\n#SBATCH -t 10\n#SBATCH -A proj-green\n"
                      "#SBATCH --output=/dev/null\n#SBATCH --hold\ntrue\n")
    script.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREEND_", "SLURM_"))}
    with open(tmp / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([str(GREEND), "-c", str(tmp / "greend.toml"), "--state-dir",
                                   str(tmp / "state"), "run", "--listen", "127.0.0.1:0", "--socket",
                                   str(sock)], env=env, stdout=subprocess.DEVNULL, stderr=log)
    sbatch = shutil.which("sbatch") or "/usr/bin/sbatch"
    body = json.dumps({"sbatch": {"cpus-per-task": 1, "time": "10", "account": "proj-green",
                                  "argv": [str(script)]}, "cli_filter": "site"})
    (tmp / "body.json").write_text(body)
    (tmp / "body.json").chmod(0o644)
    curl = ["runuser", "-u", user, "--", "curl", "-sS", "--max-time", "1", "--unix-socket", str(sock),
            "-H", "Content-Type: application/json", "--data-binary", f"@{tmp / 'body.json'}",
            "-o", "/dev/null", "-w", "%{http_code}", "http://greend/api/v1/route"]
    ids: list[str] = []
    times: dict[str, list[float]] = {"sbatch": [], "sbatch + cli_filter": [], "filter request (curl)": []}
    notes = set()
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(curl, capture_output=True, text=True).stdout != "200":
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"the daemon does not answer: {(tmp / 'daemon.log').read_text()}")
            time.sleep(0.5)
        for _ in range(n):
            for name, conf in (("sbatch", site_conf), ("sbatch + cli_filter", clif / "slurm.conf")):
                argv = ["runuser", "-u", user, "--", "env", f"SLURM_CONF={conf}", "GREEND_CLUSTER=site",
                        f"GREEND_SOCKET={sock}", sbatch, "--parsable", str(script)]
                t0 = time.perf_counter()
                p = subprocess.run(argv, capture_output=True, text=True, cwd=tmp)
                times[name].append(time.perf_counter() - t0)
                if p.returncode != 0:
                    raise SystemExit(f"sbatch failed: {p.stderr}")
                ids.append(p.stdout.strip().split(";")[0])
                notes.update(ln for ln in p.stderr.splitlines() if "did not answer" in ln
                             or "could not route" in ln)
            t0 = time.perf_counter()
            code = subprocess.run(curl, capture_output=True, text=True).stdout
            times["filter request (curl)"].append(time.perf_counter() - t0)
            if code != "200":
                notes.add(f"filter request: HTTP {code}")
    finally:
        for k in range(0, len(ids), 100):
            subprocess.run(["scancel", *ids[k:k + 100]], env={**env, "SLURM_CONF": str(site_conf)},
                           capture_output=True)
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    out = {name: _pct(xs) for name, xs in times.items()}
    a, b = out["sbatch"], out["sbatch + cli_filter"]
    out["added by greend"] = {k: round(b[k] - a[k], 1) for k in ("p50_ms", "p99_ms")}
    out["submissions"] = n
    out["fail_open_notes"] = sorted(notes)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="in-process run length")
    ap.add_argument("--runs", type=int, default=20, help="command runs per variant")
    ap.add_argument("--live", action="store_true", help="use the Slurm testbed's real state")
    ap.add_argument("--sbatch", type=int, metavar="N", help="only: N real sbatch with and without "
                    "the cli_filter on the testbed (root)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.sbatch:
        res = {"host": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
               "sbatch": bench_sbatch(args.sbatch)}
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        print(f"host: {res['host']['cpus']} CPUs, load average {res['host']['load_avg_1m']:.2f}; "
              f"{args.sbatch} submissions each")
        for name, t in res["sbatch"].items():
            print(f"{name:<25} {t}")
        return 0
    res = {"host": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
           "in_process": bench_in_process(args.seconds, args.live),
           "command": bench_command(args.runs, args.live)}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    ip = res["in_process"]
    print(f"host: {res['host']['cpus']} CPUs, load average {res['host']['load_avg_1m']:.2f}")
    print(f"in-process ({ip['state']} state, 20,000-job ledger): {ip['decisions_per_s']:,} decisions/s wall, "
          f"{ip['decisions_per_cpu_s']:,} per CPU-second; p50 {ip['p50_us']} us, p99 {ip['p99_us']} us; "
          f"full JSON explanation {ip['explain_json_ms']} ms")
    print(f"  outcomes of the 200 requests: {ip['outcomes']}")
    for name, t in res["command"].items():
        print(f"{name:<45} wall median {t['median_ms']:7.1f} ms  p90 {t['p90_ms']:7.1f} ms  "
              f"min {t['min_ms']:7.1f} ms;  CPU median {t['cpu_median_ms']:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
