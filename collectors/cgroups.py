"""Per-job CPU time and memory from Slurm's job cgroups (v1 and v2).

v1: <cgroupfs>/cpuacct/slurm[_<node>]/uid_<uid>/job_<id>/cpuacct.usage (ns), with the allocation
    read from the cpuset and memory controllers' job directories.
v2: <cgroupfs>/.../[<node>_]slurmstepd.scope/job_<id>/cpu.stat (usage_usec), memory.current,
    cpuset.cpus.effective, memory.max.
Counters are re-read through kept file descriptors; a job directory is listed once, when it appears.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .base import JobUsage, SourceUnavailable

log = logging.getLogger(__name__)


def parse_cpulist(text: str) -> int:
    """Number of CPUs in a cpuset list such as "0-3,8,10-11"."""
    n = 0
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        n += (int(hi) - int(lo) + 1) if hi else 1
    return n


@dataclass(slots=True)
class _Job:
    job_id: str
    uid: int
    cpu_fd: int
    mem_fd: int | None
    alloc_cpus: float | None
    alloc_mem_bytes: int | None
    extra_fds: list[int] = field(default_factory=list)


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


class SlurmCgroups:
    """Slurm job cgroups of one node (v1 or v2, detected)."""

    name = "cgroups"
    procfs = Path("/proc")  # where owner_of reads a process's cgroup

    def __init__(self, cgroupfs: Path, cluster: str, node: str):
        self.root = Path(cgroupfs)
        self.cluster = cluster
        self.node = node
        self.jobs: dict[str, _Job] = {}
        self.version, self.base = self._detect()

    def describe(self) -> str:
        return str(self.base)

    def _detect(self) -> tuple[int, Path]:
        # With several slurmd on one host (the testbed, multiple-slurmd builds) each node has its
        # own "slurm_<node>" tree; a normal node has plain "slurm".
        cpuacct = self.root / "cpuacct"
        if cpuacct.is_dir():
            for name in (f"slurm_{self.node}", "slurm"):
                if (cpuacct / name).is_dir():
                    return 1, cpuacct / name
        if (self.root / "cgroup.controllers").exists():
            for pattern in (f"*/{self.node}_slurmstepd.scope", "*/slurmstepd.scope",
                            f"{self.node}_slurmstepd.scope", "slurmstepd.scope"):
                hits = sorted(self.root.glob(pattern))
                if hits:
                    return 2, hits[0]
        raise SourceUnavailable(f"no Slurm job cgroups under {self.root}")

    def _job_dirs(self) -> dict[str, tuple[int | None, str]]:
        """Job id -> (uid, directory) as listed now. Runs every tick, so it builds no Path; a v2 job
        directory's owner (None here) is looked up once, when the job is attached."""
        found: dict[str, tuple[int | None, str]] = {}
        try:
            if self.version == 1:
                for udir in os.scandir(self.base):
                    if not udir.name.startswith("uid_"):
                        continue
                    uid = int(udir.name[4:])
                    for jdir in os.scandir(udir.path):
                        if jdir.name.startswith("job_"):
                            found[jdir.name[4:]] = (uid, jdir.path)
            else:
                for jdir in os.scandir(self.base):
                    if jdir.name.startswith("job_"):
                        found[jdir.name[4:]] = (None, jdir.path)
        except FileNotFoundError:
            pass
        return found

    def _attach(self, job_id: str, uid: int, path: Path) -> _Job | None:
        if self.version == 1:
            rel = path.relative_to(self.root / "cpuacct")
            cpu_fd = _open(path / "cpuacct.usage")
            mem_fd = _open(self.root / "memory" / rel / "memory.usage_in_bytes")
            cpus = _read_text(self.root / "cpuset" / rel / "cpuset.cpus")
            limit = _read_text(self.root / "memory" / rel / "memory.limit_in_bytes")
        else:
            cpu_fd = _open(path / "cpu.stat")
            mem_fd = _open(path / "memory.current")
            cpus = _read_text(path / "cpuset.cpus.effective")
            limit = _read_text(path / "memory.max")
        if cpu_fd is None:
            return None
        alloc_mem = None
        if limit and limit.strip().isdigit() and int(limit) < (1 << 60):
            alloc_mem = int(limit)
        return _Job(job_id, uid, cpu_fd, mem_fd, parse_cpulist(cpus) if cpus else None, alloc_mem)

    def _detach(self, job: _Job) -> None:
        for fd in (job.cpu_fd, job.mem_fd, *job.extra_fds):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def read(self) -> list[JobUsage]:
        dirs = self._job_dirs()
        for job_id in list(self.jobs):
            if job_id not in dirs:
                self._detach(self.jobs.pop(job_id))
        out: list[JobUsage] = []
        for job_id, (uid, path) in dirs.items():
            job = self.jobs.get(job_id)
            if job is None:
                try:
                    owner = uid if uid is not None else os.stat(path).st_uid
                except OSError:
                    continue
                job = self._attach(job_id, owner, Path(path))
                if job is None:
                    continue
                self.jobs[job_id] = job
            try:
                raw = os.pread(job.cpu_fd, 4096, 0)
                if self.version == 1:
                    cpu_ns = int(raw)
                else:
                    cpu_ns = int(raw.split(b"\n", 1)[0].split()[1]) * 1000  # usage_usec
                mem = int(os.pread(job.mem_fd, 32, 0)) if job.mem_fd is not None else 0
            except (OSError, ValueError, IndexError):
                # The job ended between listing and reading: its cgroup is being removed.
                self._detach(self.jobs.pop(job_id))
                continue
            out.append(JobUsage(
                key=f"slurm/{self.cluster}/{job_id}", kind="slurm", job_id=job_id, uid=job.uid,
                cpu_time_ns=cpu_ns, mem_bytes=mem, alloc_cpus=job.alloc_cpus,
                alloc_mem_bytes=job.alloc_mem_bytes, cluster=self.cluster,
            ))
        return out

    def owner_of(self, pid: int) -> str | None:
        """The key of the Slurm job a process runs in, from its /proc/<pid>/cgroup (None: none)."""
        try:
            text = (self.procfs / str(pid) / "cgroup").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            for part in line.split(":", 2)[-1].split("/"):
                if part.startswith("job_") and part[4:].isdigit():
                    return f"slurm/{self.cluster}/{part[4:]}"
        return None

    def close(self) -> None:
        for job in self.jobs.values():
            self._detach(job)
        self.jobs.clear()
