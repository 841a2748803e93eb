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
import termios
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from greend.collectors.base import JobUsage
from greend.collectors.procscan import NS_PER_TICK, PAGE, ProcScan

from . import units
from .ledger import JobRow, Ledger
from .monitor import Monitor

if TYPE_CHECKING:  # a Config or its cached view (greend.config_cache): no pydantic on this path
    from . import config as config_mod

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
    node_busy: float | None = None
    """The node's busy share (all CPUs, /proc/stat) over the run."""


# The running row is written at the start and then this often: `greend jobs` and the TUI show a
# run within seconds, named, with figures at most this old. One small transaction each time.
WRITE_EVERY_S = 2.0
# A run's series keeps at most about this many points: its sampling interval while that fits,
# then the next coarser step of STEPS (the stored series is merged when the step changes).
MAX_POINTS = 120
STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


def series_step(interval_s: float, elapsed_s: float) -> float:
    """The series step for a run of elapsed_s sampled every interval_s."""
    if elapsed_s <= interval_s * MAX_POINTS:
        return interval_s
    need = elapsed_s / MAX_POINTS
    return float(next((s for s in STEPS if s >= need and s >= interval_s), STEPS[-1]))


def _set_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _rusage_ns(ru) -> int:
    return int((ru.ru_utime + ru.ru_stime) * 1e9)


def _busy(a: tuple[int, int], b: tuple[int, int]) -> float | None:
    total = b[0] - a[0]
    return max(0.0, min(1.0, ((b[0] - b[1]) - (a[0] - a[1])) / total)) if total > 0 else None


class CommandTree:
    """The measured command's process tree, found from greend down through the kernel's
    /proc/PID/task/TID/children lists: `measure`'s only job.

    Nothing else on the node is scanned (a scan of every process costs a classification of each,
    and a descriptor each): other processes' shares of the node's energy would be unattributed in
    a run's books anyway, and the command's shares do not depend on them (its active share is
    over the node's busy CPU time from /proc/stat, its idle and memory shares over the node's
    cores and memory). The tree's CPU time is what greend reaped (exact, rusage) plus, for every
    live or zombie process in it, its own and its reaped children's time; kept monotonic, since a
    reap between two reads may count a child twice for an instant.
    """

    name = "command"

    def __init__(self, procfs, cluster: str):
        self.procfs = str(procfs)
        self.cluster = cluster
        self.root = os.getpid()
        self.key: str | None = None
        self.job_id = ""
        self.cpus: float | None = None
        self.reaped_ns = 0
        self.cpu_ns = 0
        self.pids: set[int] = set()

    @staticmethod
    def available(procfs) -> bool:
        pid = os.getpid()
        return os.path.exists(f"{procfs}/{pid}/task/{pid}/children")

    def _children(self, pid: int) -> list[int]:
        out: list[int] = []
        try:
            tasks = os.listdir(f"{self.procfs}/{pid}/task")
        except OSError:
            return out
        for tid in tasks:
            try:
                with open(f"{self.procfs}/{pid}/task/{tid}/children", "rb") as f:
                    out += [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                pass
        return out

    def read(self) -> list[JobUsage]:
        if self.key is None:
            return []
        ticks = rss = 0
        seen: set[int] = set()
        stack = self._children(self.root)
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            try:
                with open(f"{self.procfs}/{pid}/stat", "rb") as f:
                    raw = f.read()
                fields = raw[raw.rindex(b")") + 2:].split()
                ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
                rss += int(fields[21])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile: its time is in a parent's or in what greend reaped
            seen.add(pid)
            stack += self._children(pid)
        self.pids = seen
        self.cpu_ns = max(self.cpu_ns, self.reaped_ns + ticks * NS_PER_TICK)
        return [JobUsage(self.key, "command", self.job_id, os.getuid(), self.cpu_ns, rss * PAGE,
                         alloc_cpus=self.cpus, cluster=self.cluster)]

    def owner_of(self, pid: int) -> str | None:
        return self.key if pid in self.pids else None


def run(cfg: config_mod.Config, argv: list[str], ledger: Ledger | None, *,
        live: bool = False, out=sys.stderr) -> Result:
    if CommandTree.available(cfg.paths.procfs):
        tree, scan = CommandTree(cfg.paths.procfs, cfg.cluster), None
    else:  # no children lists in this kernel: scan every process
        tree, scan = None, ProcScan(cfg.paths.procfs, cfg.cluster)
    monitor = Monitor(cfg, ledger, jobs_source=tree or scan, record_kinds={"command"},
                      resume=False)
    subreaper = _set_subreaper()
    interval = cfg.sampling.measure_interval_s
    step = monitor.job_series_step_s = series_step(interval, 0)
    monitor.tick()  # the process table, then the counters again right before exec
    t_start = monitor.rebaseline()
    cpu0 = (monitor.prev.cpu_total, monitor.prev.cpu_idle)
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
    key = f"cmd/{job_id}"
    if tree is not None:
        tree.key, tree.job_id, tree.cpus = key, job_id, cpus
    else:
        scan.command_pid, scan.command_job_id, scan.command_cpus = child.pid, job_id, cpus
    # The run's record exists from exec on, named: written now, then every WRITE_EVERY_S.
    acc = monitor.account_for(JobUsage(key, "command", job_id, os.getuid(), 0, alloc_cpus=cpus,
                                        cluster=cfg.cluster), t_start)
    row = acc.row
    row.command, row.name, row.submit_time = shlex.join(argv), os.path.basename(argv[0]), int(t_start)
    row.meta = {**(row.meta or {}), "idle_rule": cfg.attribution.idle_power, "series_step_s": step}
    if ledger is not None:
        monitor.checkpoint()

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    reaped_ns = 0
    status = None
    t_exit = t_start
    next_tick = time.monotonic() + interval
    last_write = time.monotonic()
    line = LiveLine(out) if live else None
    try:
        pidfd = os.pidfd_open(child.pid)
    except (AttributeError, OSError):
        pidfd = None
    # poll, not select: the process scan keeps a descriptor per process, so the pidfd's number
    # is often above select()'s limit of 1024 on a busy node.
    poller = select.poll() if pidfd is not None else None
    if poller is not None:
        poller.register(pidfd, select.POLLIN)
    try:
        while status is None:
            timeout = max(0.0, next_tick - time.monotonic())
            if poller is not None:
                poller.poll(timeout * 1000)
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
                if tree is not None:
                    tree.reaped_ns = reaped_ns
                if pid == child.pid:
                    status, t_exit = st, time.time()
            if status is None and time.monotonic() >= next_tick:
                monitor.tick()
                next_tick += interval
                if next_tick < time.monotonic():
                    next_tick = time.monotonic() + interval
                if line is not None:
                    line.show(_live_text(time.time() - t_start, acc, interval))
                if ledger is not None and time.monotonic() - last_write >= WRITE_EVERY_S:
                    new_step = series_step(interval, time.time() - t_start)
                    if new_step != step:
                        step = _coarsen(monitor, ledger, acc, new_step)
                    monitor.checkpoint()
                    last_write = time.monotonic()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pidfd is not None:
            os.close(pidfd)
        if line is not None:
            line.close()
    # The interval ends at exit: the next reading is taken now, before anything else. The exact
    # CPU time of everything reaped in the tree beats the last partial scan (a command that
    # ended before any scan saw it gets its group here).
    if scan is not None:
        group = scan.command_group()
        group.cum_ticks = max(group.cum_ticks, reaped_ns // NS_PER_TICK)
    monitor.tick()
    child.returncode = os.waitstatus_to_exitcode(status)
    code = child.returncode
    row.exit_code = code if code >= 0 else 128 - code
    busy = _busy(cpu0, (monitor.prev.cpu_total, monitor.prev.cpu_idle))
    row.meta = {**(row.meta or {}), "idle_uj": acc.idle_uj,
                **({"node_busy": round(busy, 4)} if busy is not None else {})}
    orphans = (len(tree.pids) if tree is not None else
               sum(1 for p in scan.procs.values() if p.group == key))
    monitor._end(acc.key, t_exit, t_exit)
    row.first_seen = t_start
    if not subreaper:
        log.debug("could not become a child subreaper; orphaned descendants may escape")
    if ledger is not None:
        if series_step(interval, t_exit - t_start) != step:
            _coarsen(monitor, ledger, acc, series_step(interval, t_exit - t_start))
        monitor.checkpoint()
    monitor.close()
    return Result(list(argv), row.exit_code, t_exit - t_start, row, monitor, orphans, busy)


def _coarsen(monitor: Monitor, ledger: Ledger, acc, step: float) -> float:
    """Store the run's series at a coarser step from now on, the stored part merged to it."""
    monitor.checkpoint()
    monitor.job_series_step_s = step
    acc.row.meta = {**(acc.row.meta or {}), "series_step_s": step}
    acc.dirty = True
    if acc.row.pk is not None:
        with ledger.transaction() as db:
            ledger.merge_series(db, acc.row.pk, step)
        acc.buckets = {(r["t_start"], r["factor_set"]): [
            r["t_end"], r["cpu_uj"], r["dram_uj"], r["gpu_uj"], r["memory_uj"], r["cpu_time_ns"],
            r["carbon_g"], r["water_site_l"], r["water_offsite_l"]]
            for r in ledger.last_series_step(acc.row.pk)}
    return step


def _live_text(elapsed: float, acc, dt: float) -> str:
    r = acc.row
    e = r.cpu_uj + r.dram_uj + r.gpu_uj + r.memory_uj
    p = acc.last_interval_uj / 1e6 / dt
    return (f"greend: {units.duration(elapsed)} elapsed, {units.energy(e / 1e6)} IT energy so far, "
            f"{units.power(p)} now")


class LiveLine:
    """The live figures on the terminal's bottom row, kept out of the command's output.

    The rows above become the scrolling region, so what the command prints scrolls there and
    never meets the live line; each update saves the cursor, writes the bottom row and restores
    the cursor in one write, so a line the command is halfway through continues where it was.
    While the terminal is not in canonical (line) mode, a full-screen or interactive program owns
    it (an editor, a pager, a prompt reading keys): then nothing is drawn.
    """

    def __init__(self, out):
        self.out = out
        try:
            self.cols, self.rows = os.get_terminal_size(out.fileno())
        except (OSError, ValueError, AttributeError):
            self.cols = self.rows = 0
        self.on = self.rows >= 3 and self.cols >= 20
        if self.on:
            # A new line first, so the cursor is not on the row the live line takes.
            self._write(f"\n\033[1A\0337\033[1;{self.rows - 1}r\0338")

    def _write(self, s: str) -> None:
        try:
            self.out.write(s)
            self.out.flush()
        except OSError:
            self.on = False

    def _line_mode(self) -> bool:
        try:
            return bool(termios.tcgetattr(self.out.fileno())[3] & termios.ICANON)
        except (termios.error, OSError, ValueError, AttributeError):
            return True

    def show(self, text: str) -> None:
        if not (self.on and self._line_mode()):
            return
        try:
            cols, rows = os.get_terminal_size(self.out.fileno())
        except (OSError, ValueError):
            cols, rows = self.cols, self.rows
        region = ""
        if (cols, rows) != (self.cols, self.rows) and rows >= 3 and cols >= 20:
            # Resized: the scrolling region follows the new bottom row.
            self.cols, self.rows = cols, rows
            region = f"\0337\033[1;{rows - 1}r\0338"
        self._write(f"{region}\0337\033[{self.rows};1H\033[2K{text[:self.cols - 1]}\0338")

    def close(self) -> None:
        if self.on:
            self._write(f"\0337\033[r\0338\0337\033[{self.rows};1H\033[2K\0338")
            self.on = False
