"""Per-job CPU time from a scan of /proc, for nodes without Slurm job cgroups and for `greend measure`.

A process is classified once, when first seen (keyed by pid and start time): the measured command's
tree, a Slurm job (SLURM_JOB_ID in its environment, or a slurmstepd parent), or else its user.
Children inherit their parent's group, so most new processes cost no environment read. Known
processes are re-read through a kept descriptor on /proc/<pid>/stat.

CPU time of processes that exit between two scans is recovered through their parent's cutime/cstime
when the parent is in the same group and reaps them (shells, make, launchers): the unseen rest of a
reaped child is credited, what was already counted is not counted twice.
"""

from __future__ import annotations

import logging
import os
import pwd
import resource
from dataclasses import dataclass
from pathlib import Path

from .base import JobUsage

log = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK")
NS_PER_TICK = 1_000_000_000 // CLK_TCK
PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_fd_limit() -> int:
    """Lift the soft open-file limit to the hard one; returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


@dataclass(slots=True)
class _Proc:
    start: int
    group: str
    fd: int | None
    total: int  # utime + stime, ticks
    ctime: int  # cutime + cstime, ticks
    rss: int
    stepd: bool = False  # slurmstepd: its children belong to the job on its command line
    raw: bytes = b""  # the stat line last parsed: an unchanged line (a sleeping process) is not re-parsed


@dataclass(slots=True)
class _Group:
    key: str
    kind: str
    job_id: str
    uid: int
    cluster: str | None
    cum_ticks: int = 0
    pending_ticks: int = 0  # last-seen CPU time of exited members, not yet matched by a reap
    rss_pages: int = 0
    alloc_cpus: float | None = None
    alloc_mem_bytes: int | None = None
    seen: bool = False


def _parse_stat(raw: bytes) -> tuple[int, bytes, int, int, int, int] | None:
    """(ppid, comm, utime+stime, cutime+cstime, starttime, rss) from a /proc/<pid>/stat line."""
    try:
        lpar = raw.index(b"(")
        rpar = raw.rindex(b")")
        f = raw[rpar + 2:].split()
        return (int(f[1]), raw[lpar + 1:rpar], int(f[11]) + int(f[12]), int(f[13]) + int(f[14]),
                int(f[19]), int(f[21]))
    except (ValueError, IndexError):
        return None


class ProcScan:
    name = "procscan"

    def __init__(self, procfs: Path, cluster: str, command_pid: int | None = None,
                 command_job_id: str | None = None, command_cpus: float | None = None,
                 fd_budget: int | None = None):
        self.procfs = Path(procfs)
        self.cluster = cluster
        self.command_pid = command_pid
        self.command_job_id = command_job_id
        self.command_cpus = command_cpus
        self.procs: dict[int, _Proc] = {}
        self.groups: dict[str, _Group] = {}
        self.fd_budget = fd_budget if fd_budget is not None else max(0, raise_fd_limit() - 512)
        self.fds_open = 0
        self.full_reads = 0  # classification reads, for the benchmark and tests
        self._self_pid = os.getpid()

    # -- classification (once per process) ------------------------------------------------------
    def _group_for(self, pid: int, ppid: int, comm: bytes, new: dict[int, tuple]) -> _Group:
        if self.command_pid is not None and (pid == self.command_pid or ppid == self._self_pid):
            # The measured command, and orphans re-parented to greend as their subreaper.
            return self.command_group()
        parent = self.procs.get(ppid)
        if parent is None and ppid in new:
            try:
                parent_group = self._classify(ppid, new)
            except _Vanished:  # the parent exited mid-scan: judge the child on its own
                parent_group = None
        else:
            parent_group = self.groups.get(parent.group) if parent else None
        if parent_group is not None and parent_group.kind != "user":
            return parent_group
        env = self._slurm_env(pid)
        if env is None and (new[ppid][1] == b"slurmstepd" if ppid in new else
                            parent is not None and parent.stepd):
            env = self._stepd_job(ppid)
        uid = self._uid(pid)
        if uid < 0:
            raise _Vanished(pid)
        if env is not None:
            job_id, cluster, cpus, mem = env
            cluster = cluster or self.cluster
            return self._group(f"slurm/{cluster}/{job_id}", "slurm", job_id, uid, cluster, cpus, mem)
        return self._group(f"user/{uid}", "user", f"user:{_user_name(uid)}", uid, self.cluster,
                           None, None)

    def command_group(self) -> _Group:
        """The measured command's group (created if no scan has seen the command yet)."""
        return self._group(f"cmd/{self.command_job_id}", "command", self.command_job_id or "",
                           os.getuid(), self.cluster, self.command_cpus, None)

    def _classify(self, pid: int, new: dict[int, tuple]) -> _Group:
        entry = new[pid]
        if entry[6] is not None:
            return entry[6]
        group = self._group_for(pid, entry[0], entry[1], new)
        new[pid] = (*entry[:6], group, entry[7])
        return group

    def _group(self, key, kind, job_id, uid, cluster, cpus, mem) -> _Group:
        g = self.groups.get(key)
        if g is None:
            g = _Group(key, kind, job_id, uid, cluster, alloc_cpus=cpus, alloc_mem_bytes=mem)
            self.groups[key] = g
        return g

    def _uid(self, pid: int) -> int:
        try:
            return os.stat(self.procfs / str(pid)).st_uid
        except OSError:
            return -1

    def _slurm_env(self, pid: int) -> tuple[str, str | None, float | None, int | None] | None:
        self.full_reads += 1
        try:
            raw = (self.procfs / str(pid) / "environ").read_bytes()
        except OSError:
            return None
        if b"SLURM_JOB_ID=" not in raw:
            return None
        env = dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)
        job = env.get(b"SLURM_JOB_ID", b"").decode(errors="replace")
        if not job.isdigit():
            return None
        cluster = env.get(b"SLURM_CLUSTER_NAME", b"").decode(errors="replace") or None
        cpus = env.get(b"SLURM_CPUS_ON_NODE")
        mem = env.get(b"SLURM_MEM_PER_NODE")  # MiB
        return (job, cluster, float(cpus) if cpus and cpus.isdigit() else None,
                int(mem) * 1024 * 1024 if mem and mem.isdigit() else None)

    def _stepd_job(self, pid: int) -> tuple[str, None, None, None] | None:
        # slurmstepd's command line reads "slurmstepd: [1234.batch]".
        try:
            cmd = (self.procfs / str(pid) / "cmdline").read_bytes()
        except OSError:
            return None
        if b"[" in cmd:
            job = cmd.split(b"[", 1)[1].split(b".", 1)[0].split(b"]", 1)[0].decode(errors="replace")
            if job.isdigit():
                return job, None, None, None
        return None

    # -- scanning -------------------------------------------------------------------------------
    def _read_stat(self, pid: int, proc: _Proc | None) -> tuple[bytes | None, int | None]:
        if proc is not None and proc.fd is None and self.fds_open < self.fd_budget:
            try:  # restored from a checkpoint: take a kept descriptor now
                proc.fd = os.open(f"{self.procfs}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
                self.fds_open += 1
            except OSError:
                return None, None
        if proc is not None and proc.fd is not None:
            try:
                return os.pread(proc.fd, 1024, 0), proc.fd
            except OSError:
                return None, proc.fd
        path = f"{self.procfs}/{pid}/stat"
        if proc is None and self.fds_open < self.fd_budget:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None, None
            self.fds_open += 1
            try:
                return os.pread(fd, 1024, 0), fd
            except OSError:
                return None, fd
        try:
            with open(path, "rb") as f:
                return f.read(), None
        except OSError:
            return None, None

    def _close(self, fd: int | None) -> None:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
            self.fds_open -= 1

    def read(self) -> list[JobUsage]:
        procfs = str(self.procfs)
        try:
            pids = [int(n) for n in os.listdir(procfs) if n.isdigit()]
        except OSError:
            pids = []
        gone = set(self.procs)
        new: dict[int, tuple] = {}
        dctime: dict[str, int] = {}
        for g in self.groups.values():
            g.rss_pages = 0
            g.seen = False
        pread = os.pread
        for pid in pids:
            if pid == self._self_pid:
                continue
            proc = self.procs.get(pid)
            if proc is not None and proc.fd is not None:  # the common case, kept inline
                fd = proc.fd
                try:
                    raw = pread(fd, 1024, 0)
                except OSError:
                    raw = None
                if raw and raw == proc.raw:
                    gone.discard(pid)
                    g = self.groups[proc.group]
                    g.rss_pages += proc.rss
                    g.seen = True
                    continue
            else:
                raw, fd = self._read_stat(pid, proc)
            parsed = _parse_stat(raw) if raw else None
            if parsed is None:
                if proc is None:
                    self._close(fd)
                continue
            ppid, comm, total, ctime, start, rss = parsed
            if proc is not None and proc.start != start:
                # pid reused by a new process: the old one is gone.
                self._close(proc.fd)
                self.groups[proc.group].pending_ticks += proc.total + proc.ctime
                del self.procs[pid]
                proc = None
                gone.discard(pid)
                raw, fd = self._read_stat(pid, None)
                parsed = _parse_stat(raw) if raw else None
                if parsed is None:
                    self._close(fd)
                    continue
                ppid, comm, total, ctime, start, rss = parsed
            gone.discard(pid)
            if proc is None:
                new[pid] = (ppid, comm, total, ctime, start, rss, None, fd)
                continue
            g = self.groups[proc.group]
            g.cum_ticks += max(0, total - proc.total)
            if ctime > proc.ctime:
                dctime[proc.group] = dctime.get(proc.group, 0) + ctime - proc.ctime
            proc.total, proc.ctime, proc.rss, proc.raw = total, ctime, rss, raw
            g.rss_pages += rss
            g.seen = True
        for pid, entry in list(new.items()):
            try:
                group = entry[6] or self._classify(pid, new)
            except _Vanished:
                self._close(entry[7])
                continue
            _, comm, total, ctime, start, rss, _, fd = new[pid]
            self.procs[pid] = _Proc(start, group.key, fd, total, ctime, rss, comm == b"slurmstepd")
            group.cum_ticks += total  # all of a new process's CPU time is new
            group.rss_pages += rss
            group.seen = True
        for pid in gone:
            proc = self.procs.pop(pid, None)
            if proc is not None:
                self._close(proc.fd)
                self.groups[proc.group].pending_ticks += proc.total + proc.ctime
        for key, dc in dctime.items():
            g = self.groups[key]
            credit = max(0, dc - g.pending_ticks)
            g.pending_ticks = max(0, g.pending_ticks - dc)
            g.cum_ticks += credit
        out = []
        for key, g in list(self.groups.items()):
            if not g.seen and g.kind != "command":
                # A group with no live process has ended; its cumulative time was already reported.
                del self.groups[key]
                continue
            out.append(JobUsage(
                key=key, kind=g.kind, job_id=g.job_id, uid=g.uid,
                cpu_time_ns=g.cum_ticks * NS_PER_TICK, mem_bytes=g.rss_pages * PAGE,
                alloc_cpus=g.alloc_cpus, alloc_mem_bytes=g.alloc_mem_bytes, cluster=g.cluster,
            ))
        return out

    def owner_of(self, pid: int) -> str | None:
        """The key of the job a process belongs to, as of the last scan (None: not seen)."""
        proc = self.procs.get(pid)
        return proc.group if proc is not None else None

    def export_state(self) -> dict:
        """What a restarted greend needs to carry each group's CPU time on (see Monitor)."""
        return {
            "procs": {str(pid): [p.start, p.group, p.total, p.ctime] for pid, p in self.procs.items()},
            "groups": {k: [g.kind, g.job_id, g.uid, g.cluster, g.cum_ticks, g.pending_ticks,
                           g.alloc_cpus, g.alloc_mem_bytes] for k, g in self.groups.items()},
        }

    def import_state(self, state: dict) -> None:
        for key, (kind, job_id, uid, cluster, cum, pending, cpus, mem) in state["groups"].items():
            if kind == "command":
                continue  # a measured command does not outlive its greend
            self.groups[key] = _Group(key, kind, job_id, uid, cluster, cum, pending,
                                      alloc_cpus=cpus, alloc_mem_bytes=mem)
        for pid, (start, group, total, ctime) in state["procs"].items():
            if group in self.groups:
                self.procs[int(pid)] = _Proc(start, group, None, total, ctime, 0)

    def close(self) -> None:
        for proc in self.procs.values():
            self._close(proc.fd)
        self.procs.clear()



class _Vanished(Exception):
    """The process exited while it was being classified."""


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)
