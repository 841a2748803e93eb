"""CPU cost of one greend sampling tick on a busy node, next to CodeCarbon's and to the raw counters'.

Two node layouts, each with JOBS jobs of PROCS processes:
  cgroup mode    a Slurm cgroup v1 fixture tree under /tmp (counters rewritten between ticks)
  procscan mode  JOBS x PROCS real sleeping processes with SLURM_JOB_ID in their environment
and, in the same run, CodeCarbon's per-measurement cost for one process and the cost of reading the
counters alone (pread through a kept descriptor, and open+read each time). Prints figures; not a test.

    .venv/bin/python bench/bench_tick.py [--jobs 100] [--procs 20] [--ticks 200] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures import make_cgroups, make_procfs, make_rapl
from greend.collectors.cgroups import SlurmCgroups
from greend.collectors.procscan import ProcScan, raise_fd_limit
from greend.collectors.rapl import RaplCollector

from greend import config as config_mod
from greend.monitor import Monitor

CLUSTER = "greend-bench"
JOB0 = 7_000_000  # job ids of the sleepers: unlikely to collide with a real job on this machine


def cpu_us_per_call(fn, n: int, clock=time.process_time, between=None) -> float:
    """Mean CPU time of fn() in µs over n calls; `between` runs untimed before each call."""
    spent = 0.0
    for _ in range(n):
        if between is not None:
            between()
        t0 = clock()
        fn()
        spent += clock() - t0
    return spent / n * 1e6


def profile(fn, n: int, between=None, top: int = 15) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    for _ in range(n):
        if between is not None:
            between()
        prof.enable()
        fn()
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def node_config(base: Path, procfs: Path) -> config_mod.Config:
    return config_mod.parse({
        "cluster": CLUSTER, "node": "n1",
        "paths": {"procfs": str(procfs), "sysfs": str(base / "sys"), "cgroupfs": str(base / "cgroup")},
        "clusters": {CLUSTER: {"pue": 1.2, "carbon_intensity_g_per_kwh": 56.0}},
    })


def counters_only_us(fds: list[int], n: int, between=None) -> float:
    """One tick's worth of raw counter reads: pread each kept descriptor once."""
    pread = os.pread

    def read_all():
        for fd in fds:
            pread(fd, 4096, 0)

    return cpu_us_per_call(read_all, n, between=between)


def per_counter_us(paths: list[str], n: int) -> tuple[float, float]:
    """µs per counter: pread through a kept descriptor vs open+read+close each time."""
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]
    try:
        kept = counters_only_us(fds, n) / len(fds)
    finally:
        for fd in fds:
            os.close(fd)

    def reopen():
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                f.read()

    return kept, cpu_us_per_call(reopen, n) / len(paths)


# -- cgroup mode ----------------------------------------------------------------------------------
def bench_cgroup(args, base: Path) -> dict:
    proc = make_procfs(base / "proc", ncpu=64, packages=2)
    rapl = make_rapl(base / "sys", packages=2, dram=True)
    tree = make_cgroups(base / "cgroup", 1, node="n1")
    for j in range(args.jobs):
        tree.add_job(str(1000 + j), uid=1000 + j % 10, cpus=f"{j % 64}", cpu_ns=0)
    cfg = node_config(base, base / "proc")
    src = SlurmCgroups(base / "cgroup", CLUSTER, "n1")
    mon = Monitor(cfg, None, jobs_source=src, energy_sources=[RaplCollector(base / "sys")])
    usage = dict.fromkeys(tree.jobs, 0)

    def move_counters():
        for job_id in usage:
            usage[job_id] += 10_000_000
            tree.set_cpu(job_id, usage[job_id])
        proc.advance(args.jobs, 64 * 5 - args.jobs)
        for dom in ("package-0", "package-1", "dram-0", "dram-1"):
            rapl.advance(dom, 1_000_000)

    mon.tick()
    tick_us = cpu_us_per_call(mon.tick, args.ticks, between=move_counters)
    fds = [mon.procstat.fd, *(z.fd for z in mon.energy_sources[0].zones)]
    for j in src.jobs.values():
        fds += [fd for fd in (j.cpu_fd, j.mem_fd) if fd is not None]
    # The same files under the same conditions as the ticks (just rewritten), and unchanged.
    raw_us = counters_only_us(fds, args.ticks, between=move_counters)
    steady_us = counters_only_us(fds, args.ticks)
    kept, reopen = per_counter_us(
        [str(d / "cpuacct.usage") for d in list(tree.jobs.values())[:50]], args.ticks)
    if args.profile:
        print("\n== cProfile, cgroup mode ==")
        profile(mon.tick, args.ticks, between=move_counters)
    njobs = len(src.jobs)
    mon.close()
    return {"tick_us": tick_us, "counters_us": raw_us, "steady_us": steady_us, "ncounters": len(fds),
            "kept_us": kept, "reopen_us": reopen, "jobs": njobs}


# -- procscan mode --------------------------------------------------------------------------------
def spawn_sleepers(jobs: int, procs: int) -> list[subprocess.Popen]:
    """JOBS x PROCS `sleep 600` processes, PROCS per job with SLURM_JOB_ID in their environment.

    One shell per job forks the sleepers (much faster than forking this process 2,000 times) and
    then becomes the last of them, so a job is exactly PROCS processes. Each runs under
    `setpriv --pdeathsig KILL` where available: if the benchmark is killed, its sleepers die too.
    """
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    guard = "setpriv --pdeathsig KILL " if shutil.which("setpriv") else ""
    script = (f"i=1; while [ $i -lt {procs} ]; do {guard}sleep 600 & i=$((i+1)); done; "
              f"exec {guard}sleep 600")
    out = []
    for j in range(jobs):
        env = {**base_env, "SLURM_JOB_ID": str(JOB0 + j), "SLURM_CLUSTER_NAME": CLUSTER,
               "SLURM_CPUS_ON_NODE": "2"}
        out.append(subprocess.Popen(["/bin/sh", "-c", script], env=env, stdin=subprocess.DEVNULL,
                                    start_new_session=True))
    deadline = time.monotonic() + 120
    for p in out:  # wait until every job has all its processes
        while time.monotonic() < deadline:
            try:
                kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            except OSError:
                break
            if len(kids) >= procs - 1 and Path(f"/proc/{p.pid}/comm").read_text().strip() == "sleep":
                break
            time.sleep(0.01)
    return out


def kill_sleepers(sleepers: list[subprocess.Popen]) -> None:
    for p in sleepers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    for p in sleepers:
        p.wait()


def bench_procscan(args, base: Path) -> dict:
    raise_fd_limit()
    t0 = time.monotonic()
    sleepers = spawn_sleepers(args.jobs, args.procs)
    spawn_s = time.monotonic() - t0
    try:
        cfg = node_config(base, Path("/proc"))
        scan = ProcScan(Path("/proc"), CLUSTER)
        mon = Monitor(cfg, None, jobs_source=scan, energy_sources=[RaplCollector(base / "sys")])
        first = cpu_us_per_call(mon.tick, 1)  # classifies every process (environment reads)
        full_reads = scan.full_reads
        tick_us = cpu_us_per_call(mon.tick, args.ticks)
        assert scan.full_reads - full_reads <= args.ticks * 5, "steady ticks should classify ~nothing"
        ours = {f"slurm/{CLUSTER}/{JOB0 + j}" for j in range(args.jobs)}
        in_jobs = sum(1 for p in scan.procs.values() if p.group in ours)
        groups = sum(1 for k in scan.groups if k in ours)
        fds = [mon.procstat.fd, *(z.fd for z in mon.energy_sources[0].zones)]
        fds += [p.fd for p in scan.procs.values() if p.fd is not None]

        def listdir_and_pread():
            os.listdir("/proc")
            for fd in fds:
                try:
                    os.pread(fd, 1024, 0)
                except OSError:  # another process on the machine exited meanwhile
                    pass

        raw_us = cpu_us_per_call(listdir_and_pread, args.ticks)
        kept, reopen = per_counter_us([f"/proc/{p.pid}/stat" for p in sleepers[:200]], args.ticks)
        if args.profile:
            print("\n== cProfile, procscan mode ==")
            profile(mon.tick, args.ticks)
        nprocs = len(scan.procs)
        mon.close()
    finally:
        kill_sleepers(sleepers)
    return {"tick_us": tick_us, "first_us": first, "counters_us": raw_us, "ncounters": len(fds),
            "kept_us": kept, "reopen_us": reopen, "groups": groups, "procs": nprocs,
            "spawn_s": spawn_s, "full_reads": full_reads, "in_jobs": in_jobs}


# -- CodeCarbon ------------------------------------------------------------------------------------
def bench_codecarbon(args) -> dict:
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    from codecarbon import OfflineEmissionsTracker

    tracker = OfflineEmissionsTracker(tracking_mode="process", country_iso_code="FRA",
                                      save_to_file=False, log_level="error")
    tracker.start()
    try:
        # One measurement = what CodeCarbon's scheduler runs every measure_power_secs. Timed on
        # this thread only, so its background power-sampling thread is not charged to it.
        us = cpu_us_per_call(tracker._measure_power_and_energy, args.cc_calls, clock=time.thread_time)
        modes = [f"{type(h).__name__}({getattr(h, '_mode', '') or ''})" for h in tracker._hardware]
    finally:
        tracker.stop()
    return {"measure_us": us, "hardware": ", ".join(modes)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(args, cg: dict, ps: dict | None, cc: dict | None, rss_greend: float) -> None:
    print(f"\ngreend tick, {args.jobs} jobs: CPU time per tick, mean of {args.ticks} (process_time)")
    print(f"  cgroup mode     {cg['tick_us']:9.1f} µs  ({cg['jobs']} job cgroups, v1 fixture tree)")
    if ps:
        print(f"  procscan mode   {ps['tick_us']:9.1f} µs  ({ps['procs']} processes scanned, "
              f"{ps['in_jobs']} in {ps['groups']} jobs)")
        print(f"    first scan    {ps['first_us']:9.1f} µs  (classifies every process: "
              f"{ps['full_reads']} environment reads; sleepers spawned in {ps['spawn_s']:.1f} s)")
    print("counters only: the same files, pread through the kept descriptors, nothing parsed")
    print(f"  cgroup mode     {cg['counters_us']:9.1f} µs  ({cg['ncounters']} counters, just rewritten as "
          f"for the ticks; unchanged: {cg['steady_us']:.1f} µs)")
    if ps:
        print(f"  procscan mode   {ps['counters_us']:9.1f} µs  (listdir /proc + {ps['ncounters']} preads)")
    print("one counter: pread through a kept descriptor / open+read+close each time")
    print(f"  cgroup file     {cg['kept_us']:6.2f} µs / {cg['reopen_us']:6.2f} µs")
    if ps:
        print(f"  /proc/PID/stat  {ps['kept_us']:6.2f} µs / {ps['reopen_us']:6.2f} µs")
    if cc:
        print(f"CodeCarbon {config_mod.refdata.codecarbon_version()}, one measurement of one process "
              f"(tracking_mode=process; {cc['hardware']}), mean of {args.cc_calls} (thread_time)")
        print(f"                  {cc['measure_us']:9.1f} µs")
    print("ratios")
    for name, m in [("cgroup", cg)] + ([("procscan", ps)] if ps else []):
        line = f"  {name:<9} tick / counters-only {m['tick_us'] / m['counters_us']:6.2f} (goal <= 5)"
        if cc:
            line += f"   tick / CodeCarbon {m['tick_us'] / cc['measure_us']:6.3f} (goal < 1)"
        print(line)
    print(f"peak RSS: {rss_greend:.1f} MiB after greend's runs"
          + (f", {peak_rss_mib():.1f} MiB with CodeCarbon loaded" if cc else ""))


def _interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=100, help="jobs on the node (default 100)")
    ap.add_argument("--procs", type=int, default=20, help="processes per job in procscan mode (20)")
    ap.add_argument("--ticks", type=int, default=200, help="ticks timed per mode (200)")
    ap.add_argument("--cc-calls", type=int, default=100, help="CodeCarbon measurements timed (100)")
    ap.add_argument("--no-procscan", action="store_true", help="skip the real-process mode")
    ap.add_argument("--no-codecarbon", action="store_true", help="skip CodeCarbon")
    ap.add_argument("--profile", action="store_true", help="cProfile the ticks of each mode")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupted)

    with tempfile.TemporaryDirectory(prefix="greend-bench-", dir="/tmp") as tmp:
        base = Path(tmp)
        cg = bench_cgroup(args, base / "cg")
        ps = None
        if not args.no_procscan:
            (base / "ps").mkdir()
            make_rapl(base / "ps" / "sys", packages=2, dram=True)
            ps = bench_procscan(args, base / "ps")
    rss_greend = peak_rss_mib()
    cc = None if args.no_codecarbon else bench_codecarbon(args)
    report(args, cg, ps, cc, rss_greend)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
