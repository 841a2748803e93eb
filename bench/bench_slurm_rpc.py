"""slurmctld's RPCs per node per hour, from sdiag, while N simulated node agents learn their jobs in
each discovery mode ([slurm] discovery = "squeue" or "local"; docs/slurm.md, "Discovery").

Each simulated node runs greend's real discovery code (collectors/slurm.py SlurmMetadata.refresh,
every --interval seconds, starting at a random offset) against the testbed's real slurmctld
(cluster "site"). Real short jobs (`sleep`) are submitted as greendtest every --job-every seconds
and each is placed on one simulated node the way slurmd would: its job cgroup directory (a fixture
tree under /tmp, cgroup v1 layout) and its Prolog record appear while the job runs, then the
cgroup goes and the Epilog record comes. `sdiag -r` resets the counters before each mode; `sdiag`
after it gives the RPCs by type.

Needs root (the testbed; sdiag -r). Honours GREEND_TESTBED_DIR / GREEND_TESTBED_PORT_BASE. Usage:
    .venv/bin/python bench/bench_slurm_rpc.py [--nodes 100] [--seconds 180] [--interval 30]
        [--job-every 2] [--job-seconds 10] [--modes squeue,local] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from greend.collectors.slurm import SlurmCommands, SlurmMetadata  # noqa: E402
from greend.collectors.slurmlocal import LocalJobs, write_record  # noqa: E402

CLUSTER = "site"
AGENT_RPCS = ("REQUEST_JOB_INFO", "REQUEST_JOB_INFO_SINGLE", "REQUEST_PARTITION_INFO",
              "REQUEST_NODE_INFO", "REQUEST_FED_INFO")
"""What a node agent's discovery can ask slurmctld; the rest is the bench's own submissions and
slurmd's messages about the real jobs, the same in both modes."""


def sdiag(conf: Path, reset: bool = False) -> dict[str, int]:
    """RPC counts by message type, from `sdiag`'s text ("by message type" section)."""
    return {k: v[0] for k, v in sdiag_times(conf, reset).items()}


def sdiag_times(conf: Path, reset: bool = False) -> dict[str, tuple[int, int]]:
    """(count, slurmctld's total time in microseconds) by message type."""
    env = {"SLURM_CONF": str(conf), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    if reset:
        subprocess.run(["sdiag", "-r"], env=env, check=True, capture_output=True, timeout=30)
        return {}
    out = subprocess.run(["sdiag"], env=env, check=True, capture_output=True, text=True,
                         timeout=30).stdout
    part = out.split("by message type", 1)[-1].split("by user", 1)[0]
    return {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(
        r"^\s*(\w+)\s+\(\s*\d+\)\s+count:(\d+)\s+ave_time:\d+\s+total_time:(\d+)", part, re.M)}


class SimNode:
    """One simulated node: a fixture cgroup tree and a hook spool, and greend's discovery."""

    def __init__(self, name: str, root: Path, conf: Path, mode: str, per_minute: float, burst: int):
        self.name = name
        self.cgroupfs = root / name / "cgroup"
        self.spool = root / name / "spool"
        (self.cgroupfs / "cpuacct" / f"slurm_{name}").mkdir(parents=True)
        self.spool.mkdir(mode=0o700)
        cmds = SlurmCommands(conf, timeout_s=20)
        local = None
        if mode == "local":
            local = LocalJobs(cmds, self.spool, cgroupfs=self.cgroupfs, procfs=root / "noproc",
                              per_minute=per_minute, burst=burst)
        self.meta = SlurmMetadata(name, cmds, use_pyslurm=False, local=local)
        self.errors = 0

    def job_dir(self, job_id: str) -> Path:
        return self.cgroupfs / "cpuacct" / f"slurm_{self.name}" / "uid_4242" / f"job_{job_id}"

    def start(self, job_id: str) -> None:
        env = {"SLURM_JOB_ID": job_id, "SLURM_JOB_UID": "4242", "SLURM_JOB_USER": "greendtest",
               "SLURM_JOB_PARTITION": "debug", "SLURM_CLUSTER_NAME": CLUSTER,
               "SLURMD_NODENAME": self.name, "SLURM_SCRIPT_CONTEXT": "prolog_slurmd"}
        write_record(self.spool, "prolog", env, time.time())
        self.job_dir(job_id).mkdir(parents=True, exist_ok=True)

    def end(self, job_id: str) -> None:
        self.job_dir(job_id).rmdir()
        write_record(self.spool, "epilog", {"SLURM_JOB_ID": job_id, "SLURMD_NODENAME": self.name},
                     time.time())

    def refresh(self) -> None:
        self.meta.refresh()
        if not self.meta.status.ok:
            self.errors += 1


def run_mode(mode: str, args, conf: Path, tb) -> dict:
    rng = random.Random(1)
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="greend-bench-rpc-") as tmp:
        nodes = [SimNode(f"sim{i:04d}", Path(tmp), conf, mode, args.lookups_per_minute,
                         args.lookup_burst) for i in range(args.nodes)]
        running: list[tuple[float, SimNode, str]] = []
        submitted = 0

        def agent(node: SimNode, offset: float) -> None:
            if stop.wait(offset):
                return
            while not stop.is_set():
                t0 = time.monotonic()
                node.refresh()
                stop.wait(max(0.0, args.interval - (time.monotonic() - t0)))

        sdiag(conf, reset=True)
        t_start = time.monotonic()
        threads = [threading.Thread(target=agent, args=(n, rng.uniform(0, args.interval)), daemon=True)
                   for n in nodes]
        for t in threads:
            t.start()
        next_job = t_start
        while time.monotonic() - t_start < args.seconds:
            now = time.monotonic()
            for item in [r for r in running if r[0] <= now]:
                running.remove(item)
                item[1].end(item[2])
            if now >= next_job:
                job_id = str(tb.submit(CLUSTER, f"#!/bin/sh\nsleep {args.job_seconds}\n",
                                       extra_args=["-c", "1", "-t", "5"]))
                node = nodes[submitted % len(nodes)]
                node.start(job_id)
                running.append((now + args.job_seconds + 1, node, job_id))
                submitted += 1
                next_job += args.job_every
            time.sleep(0.1)
        elapsed = time.monotonic() - t_start
        times = sdiag_times(conf)
        counts = {k: v[0] for k, v in times.items()}
        stop.set()
        for t in threads:
            t.join(timeout=args.interval + 30)
        for _, node, job_id in running:
            node.end(job_id)
    hours = elapsed / 3600.0
    per_node_hour = {k: v / args.nodes / hours for k, v in sorted(counts.items())}
    agent_total = sum(counts.get(k, 0) for k in AGENT_RPCS)
    lookups = sum(n.meta.local.lookups for n in nodes) if mode == "local" else 0
    deferred = sum(n.meta.local.deferred for n in nodes) if mode == "local" else 0
    return {
        "mode": mode, "nodes": args.nodes, "seconds": round(elapsed, 1), "interval_s": args.interval,
        "jobs_submitted": submitted, "refresh_errors": sum(n.errors for n in nodes),
        "rpcs": counts, "rpcs_per_node_hour": {k: round(v, 2) for k, v in per_node_hour.items()},
        "agent_rpcs_per_node_hour": round(agent_total / args.nodes / hours, 2),
        "full_queue_rpcs_per_node_hour": round(counts.get("REQUEST_JOB_INFO", 0) / args.nodes / hours, 2),
        "agent_rpc_ms_per_node_hour": round(sum(times.get(k, (0, 0))[1] for k in AGENT_RPCS)
                                            / 1000 / args.nodes / hours, 2),
        "ave_us": {k: round(t / c) for k, (c, t) in times.items() if c},
        "by_id_lookups": lookups, "by_id_deferred": deferred,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=100, help="simulated node agents (100)")
    p.add_argument("--seconds", type=float, default=180.0, help="run time of each mode (180)")
    p.add_argument("--interval", type=float, default=30.0, help="each agent's refresh period, s (30)")
    p.add_argument("--job-every", type=float, default=2.0, help="a real job submitted every S s (2)")
    p.add_argument("--job-seconds", type=float, default=10.0, help="how long each job runs (10)")
    p.add_argument("--modes", default="squeue,local", help="comma-separated: squeue, local")
    p.add_argument("--lookups-per-minute", type=float, default=12.0)
    p.add_argument("--lookup-burst", type=int, default=30)
    p.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("squeue", "local") for m in modes) or not modes:
        p.error(f"--modes: expected squeue and/or local, got {args.modes!r}")
    from slurmbed import ensure_testbed

    tb = ensure_testbed()
    conf = tb.conf(CLUSTER)
    results = [run_mode(m, args, conf, tb) for m in modes]
    tb.cancel_all()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    types = sorted({k for r in results for k in r["rpcs"]})
    print(f"{args.nodes} simulated nodes, refresh every {args.interval:g} s, a {args.job_seconds:g} s job "
          f"every {args.job_every:g} s; RPCs per node per hour (sdiag)")
    print(f"{'RPC type':32}" + "".join(f"{r['mode']:>12}" for r in results))
    for k in types:
        print(f"{k:32}" + "".join(f"{r['rpcs_per_node_hour'].get(k, 0):12.2f}" for r in results))
    print(f"{'all the agents can ask':32}"
          + "".join(f"{r['agent_rpcs_per_node_hour']:12.2f}" for r in results))
    print(f"{'slurmctld ms for them':32}"
          + "".join(f"{r['agent_rpc_ms_per_node_hour']:12.2f}" for r in results))
    for r in results:
        print(f"{r['mode']}: mean time per RPC (us): "
              + ", ".join(f"{k} {v}" for k, v in r["ave_us"].items() if k in AGENT_RPCS))
    for r in results:
        print(f"{r['mode']}: {r['seconds']:g} s, {r['jobs_submitted']} jobs, by-id lookups "
              f"{r['by_id_lookups']} (deferred {r['by_id_deferred']}), refresh errors {r['refresh_errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
