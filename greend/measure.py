"""`greend measure -- CMD`: run a command and report its energy, carbon and water footprint.

greend becomes the command's child subreaper, so descendants that outlive their parent stay in the
command's process tree; every descendant greend reaps adds its exact CPU time (rusage) to the
command's books at the end.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from greend.collectors.procscan import NS_PER_TICK, ProcScan

from . import config as config_mod
from . import units
from .ledger import JobRow, Ledger
from .monitor import Monitor

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class MeasureError(Exception):
    """The command could not be started; carries the exit status a shell would give."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Result:
    argv: list[str]
    exit_code: int
    elapsed_s: float
    row: JobRow
    monitor: Monitor
    orphans_left: int


def _set_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _rusage_ns(ru) -> int:
    return int((ru.ru_utime + ru.ru_stime) * 1e9)


def run(cfg: config_mod.Config, argv: list[str], ledger: Ledger | None, *,
        live: bool = False, out=sys.stderr) -> Result:
    scan = ProcScan(cfg.paths.procfs, cfg.cluster)
    monitor = Monitor(cfg, ledger, jobs_source=scan, record_kinds={"command"}, resume=False)
    subreaper = _set_subreaper()
    monitor.tick()  # baseline just before the command starts
    t_start = time.time()
    job_id = time.strftime("%Y%m%d-%H%M%S", time.localtime(t_start)) + f"-{os.getpid()}"
    try:
        child = subprocess.Popen(argv, close_fds=False)
    except FileNotFoundError:
        raise MeasureError(f"cannot run {argv[0]!r}: command not found", 127) from None
    except PermissionError:
        raise MeasureError(f"cannot run {argv[0]!r}: permission denied", 126) from None
    except OSError as e:
        raise MeasureError(f"cannot run {argv[0]!r}: {e.strerror}", 126) from None
    try:
        cpus = float(len(os.sched_getaffinity(child.pid)))
    except OSError:
        cpus = float(os.cpu_count() or 1)
    scan.command_pid, scan.command_job_id, scan.command_cpus = child.pid, job_id, cpus

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    reaped_ns = 0
    status = None
    interval = cfg.sampling.measure_interval_s
    next_tick = time.monotonic() + interval
    last_checkpoint = time.monotonic()
    try:
        pidfd = os.pidfd_open(child.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while status is None:
            timeout = max(0.0, next_tick - time.monotonic())
            if pidfd is not None:
                select.select([pidfd], [], [], timeout)
            else:
                time.sleep(min(timeout, 0.05))
            while True:  # reap the command and any orphan re-parented to us
                try:
                    pid, st, ru = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                reaped_ns += _rusage_ns(ru)
                if pid == child.pid:
                    status = st
            if status is None and time.monotonic() >= next_tick:
                monitor.tick()
                next_tick += interval
                if next_tick < time.monotonic():
                    next_tick = time.monotonic() + interval
                if live:
                    _live_line(out, time.time() - t_start, monitor, scan)
                if ledger is not None and time.monotonic() - last_checkpoint > 30:
                    monitor.checkpoint()
                    last_checkpoint = time.monotonic()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pidfd is not None:
            os.close(pidfd)
    child.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.time() - t_start
    if live:
        out.write("\r\033[K")
        out.flush()
    # Exact CPU time of everything reaped in the tree beats the last partial scan.
    # (A command that ended before any scan saw it gets its group here.)
    group = scan.command_group()
    group.cum_ticks = max(group.cum_ticks, reaped_ns // NS_PER_TICK)
    monitor.tick()
    acc = monitor.accounts[f"cmd/{job_id}"]
    row = acc.row
    code = child.returncode
    row.exit_code = code if code >= 0 else 128 - code
    row.command = shlex.join(argv)
    row.name = os.path.basename(argv[0])
    row.first_seen = min(row.first_seen, t_start)
    row.submit_time = int(t_start)
    orphans = sum(1 for p in scan.procs.values() if p.group == f"cmd/{job_id}")
    monitor._end(acc.key, time.time(), time.time())
    if not subreaper:
        log.debug("could not become a child subreaper; orphaned descendants may escape")
    if ledger is not None:
        monitor.checkpoint()
    monitor.close()
    return Result(list(argv), row.exit_code, elapsed, row, monitor, orphans)


def _live_line(out, elapsed: float, monitor: Monitor, scan: ProcScan) -> None:
    acc = next((a for a in monitor.accounts.values() if a.row.kind == "command"), None)
    e = acc.row.cpu_uj + acc.row.dram_uj + acc.row.gpu_uj + acc.row.memory_uj if acc else 0
    dt = monitor.cfg.sampling.measure_interval_s
    p = (acc.last_interval_uj / 1e6 / dt) if acc else 0.0
    out.write(f"\r\033[Kgreend: {units.duration(elapsed)} elapsed, {units.energy(e / 1e6)} so far, "
              f"{units.power(p)} now")
    out.flush()
