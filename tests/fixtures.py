"""Builders of fake procfs, powercap and cgroup trees that greend's collectors read through their roots.

Counter files are rewritten in place (same inode), as the kernel does: collectors keep file
descriptors open and re-read them with pread, which a replaced file would defeat.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from greend.collectors.base import JobUsage

XEON_6248 = "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz"
RAPL_RANGE_UJ = 262_143_328_850  # max_energy_range_uj seen on a real package


def write_in_place(path: Path, text: str) -> None:
    """Rewrite a file keeping its inode, so kept descriptors see the new content."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    with open(path, "r+") as f:
        f.write(text)
        f.truncate()


# -- procfs ---------------------------------------------------------------------------------------
@dataclass
class FakeProc:
    """A fake /proc with stat, cpuinfo, meminfo and boot_id; per-pid entries for the process scan."""

    root: Path
    ncpu: int = 8
    user: int = 0
    idle: int = 0

    def write_stat(self) -> None:
        per = [f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in range(self.ncpu)]
        write_in_place(
            self.root / "stat",
            f"cpu  {self.user} 0 0 {self.idle} 0 0 0 0 0 0\n" + "\n".join(per) + "\nintr 0\n",
        )

    def advance(self, active_ticks: int, idle_ticks: int = 0) -> None:
        self.user += active_ticks
        self.idle += idle_ticks
        self.write_stat()

    def set_boot_id(self, boot: str) -> None:
        write_in_place(self.root / "sys" / "kernel" / "random" / "boot_id", boot + "\n")

    # per-process entries (pid directories) for ProcScan
    def add_process(self, pid: int, *, ppid: int = 1, comm: str = "proc", utime: int = 0,
                    stime: int = 0, cutime: int = 0, cstime: int = 0, start: int = 1000,
                    rss_pages: int = 10, env: dict[str, str] | None = None,
                    cmdline: str | None = None, uid: int | None = None) -> Path:
        d = self.root / str(pid)
        d.mkdir(parents=True, exist_ok=True)
        self.set_process(pid, ppid=ppid, comm=comm, utime=utime, stime=stime, cutime=cutime,
                         cstime=cstime, start=start, rss_pages=rss_pages)
        environ = b"".join(f"{k}={v}".encode() + b"\0" for k, v in (env or {}).items())
        (d / "environ").write_bytes(environ)
        (d / "cmdline").write_bytes((cmdline or comm).encode() + b"\0")
        if uid is not None:
            os.chown(d, uid, uid)
        return d

    def set_process(self, pid: int, *, ppid: int = 1, comm: str = "proc", utime: int = 0,
                    stime: int = 0, cutime: int = 0, cstime: int = 0, start: int = 1000,
                    rss_pages: int = 10) -> None:
        # Fields after "(comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt
        # cmajflt utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss
        rest = (f"S {ppid} {pid} {pid} 0 -1 4194304 0 0 0 0 {utime} {stime} {cutime} {cstime} "
                f"20 0 1 0 {start} 1000000 {rss_pages} 0 0 0 0")
        write_in_place(self.root / str(pid) / "stat", f"{pid} ({comm}) {rest}\n")

    def remove_process(self, pid: int) -> None:
        d = self.root / str(pid)
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def make_procfs(root: Path, *, ncpu: int = 8, packages: int = 2, model: str = XEON_6248,
                mem_kb: int = 64 * 1024 * 1024, boot: str = "boot-1") -> FakeProc:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cpuinfo = []
    for i in range(ncpu):
        cpuinfo.append(f"processor\t: {i}\nmodel name\t: {model}\n"
                       f"physical id\t: {i * packages // ncpu}\n")
    (root / "cpuinfo").write_text("\n".join(cpuinfo))
    (root / "meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree:        1000 kB\n")
    proc = FakeProc(root, ncpu=ncpu)
    proc.write_stat()
    proc.set_boot_id(boot)
    return proc


# -- powercap (RAPL) ------------------------------------------------------------------------------
@dataclass
class FakeRapl:
    """A powercap tree; `advance` moves a domain's counter on, wrapping at its range."""

    root: Path  # <sysfs>/class/powercap
    files: dict[str, Path] = field(default_factory=dict)  # domain -> energy_uj
    values: dict[str, int] = field(default_factory=dict)
    ranges: dict[str, int] = field(default_factory=dict)

    def set(self, domain: str, value_uj: int) -> None:
        self.values[domain] = value_uj
        write_in_place(self.files[domain], f"{value_uj}\n")

    def advance(self, domain: str, energy_uj: int) -> None:
        v = self.values[domain] + energy_uj
        if v >= self.ranges[domain]:  # the counter wraps: delta = (range - prev) + cur
            v -= self.ranges[domain]
        self.set(domain, v)


def _zone(path: Path, name: str, value: int, max_range: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{value}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range}\n")
    return path / "energy_uj"


def make_rapl(sysfs: Path, *, packages: int = 2, dram: bool = True, mmio: bool = True,
              psys: bool = True, max_range: int = RAPL_RANGE_UJ, start_uj: int = 1_000_000) -> FakeRapl:
    """Packages intel-rapl:N with core, uncore and (optionally) dram subzones; an intel-rapl-mmio
    duplicate of package-0; a psys zone. Subzones appear both nested and at the class level, as
    in the real sysfs."""
    root = Path(sysfs) / "class" / "powercap"
    root.mkdir(parents=True, exist_ok=True)
    rapl = FakeRapl(root)

    def add(domain: str, energy_file: Path) -> None:
        rapl.files[domain], rapl.values[domain], rapl.ranges[domain] = energy_file, start_uj, max_range

    for p in range(packages):
        top = root / f"intel-rapl:{p}"
        add(f"package-{p}", _zone(top, f"package-{p}", start_uj, max_range))
        subs = ["core", "uncore"] + (["dram"] if dram else [])
        for i, name in enumerate(subs):
            sub = top / f"intel-rapl:{p}:{i}"
            f = _zone(sub, name, start_uj, max_range)
            os.symlink(sub, root / sub.name)
            if name == "dram":
                add(f"dram-{p}", f)
            else:
                add(f"{name}-{p}", f)
    if psys:
        add("psys", _zone(root / f"intel-rapl:{packages}", "psys", start_uj, max_range))
    if mmio:
        add("mmio-package-0", _zone(root / "intel-rapl-mmio:0", "package-0", start_uj, max_range))
    return rapl


# -- Slurm job cgroups ----------------------------------------------------------------------------
@dataclass
class FakeCgroups:
    root: Path
    version: int
    node: str
    jobs: dict[str, Path] = field(default_factory=dict)  # job id -> cpu accounting directory

    def add_job(self, job_id: str, *, uid: int = 1000, cpus: str = "0-3,8",
                mem_limit: int | None = 4 << 30, cpu_ns: int = 0, mem_bytes: int = 1 << 20) -> None:
        if self.version == 1:
            rel = Path(f"slurm_{self.node}") / f"uid_{uid}" / f"job_{job_id}"
            cpu = self.root / "cpuacct" / rel
            mem = self.root / "memory" / rel
            cpuset = self.root / "cpuset" / rel
            for d in (cpu, mem, cpuset):
                d.mkdir(parents=True, exist_ok=True)
            (mem / "memory.usage_in_bytes").write_text(f"{mem_bytes}\n")
            limit = mem_limit if mem_limit is not None else 9223372036854771712
            (mem / "memory.limit_in_bytes").write_text(f"{limit}\n")
            (cpuset / "cpuset.cpus").write_text(cpus + "\n")
        else:
            cpu = self.root / "system.slice" / "slurmstepd.scope" / f"job_{job_id}"
            cpu.mkdir(parents=True, exist_ok=True)
            (cpu / "memory.current").write_text(f"{mem_bytes}\n")
            (cpu / "memory.max").write_text(f"{mem_limit}\n" if mem_limit is not None else "max\n")
            (cpu / "cpuset.cpus.effective").write_text(cpus + "\n")
            os.chown(cpu, uid, uid)
        self.jobs[job_id] = cpu
        self.set_cpu(job_id, cpu_ns)

    def set_cpu(self, job_id: str, cpu_ns: int) -> None:
        d = self.jobs[job_id]
        if self.version == 1:
            write_in_place(d / "cpuacct.usage", f"{cpu_ns}\n")
        else:
            usec = cpu_ns // 1000
            write_in_place(d / "cpu.stat", f"usage_usec {usec}\nuser_usec {usec}\nsystem_usec 0\n")

    def set_mem(self, job_id: str, mem_bytes: int) -> None:
        d = self.jobs[job_id]
        if self.version == 1:
            rel = d.relative_to(self.root / "cpuacct")
            write_in_place(self.root / "memory" / rel / "memory.usage_in_bytes", f"{mem_bytes}\n")
        else:
            write_in_place(d / "memory.current", f"{mem_bytes}\n")

    def remove_job(self, job_id: str) -> None:
        import shutil

        d = self.jobs.pop(job_id)
        if self.version == 1:
            rel = d.relative_to(self.root / "cpuacct")
            for ctl in ("cpuacct", "memory", "cpuset"):
                shutil.rmtree(self.root / ctl / rel, ignore_errors=True)
        else:
            shutil.rmtree(d)


def make_cgroups(root: Path, version: int, node: str = "n1") -> FakeCgroups:
    root = Path(root)
    if version == 1:
        for ctl in ("cpuacct", "memory", "cpuset"):
            (root / ctl / f"slurm_{node}").mkdir(parents=True, exist_ok=True)
    else:
        (root / "system.slice" / "slurmstepd.scope").mkdir(parents=True, exist_ok=True)
        (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    return FakeCgroups(root, version, node)


# -- a jobs source for the monitor ----------------------------------------------------------------
class FakeJobs:
    """Stands in for SlurmCgroups/ProcScan: jobs with cumulative CPU time that tests move on."""

    name = "fakejobs"

    def __init__(self) -> None:
        self.jobs: dict[str, JobUsage] = {}
        self.fail: Exception | None = None
        self.reads = 0

    def add(self, job_id: str, *, cluster: str = "c1", cpu_ns: int = 0, alloc_cpus: float | None = None,
            uid: int = 0, mem_bytes: int = 0) -> str:
        key = f"slurm/{cluster}/{job_id}"
        self.jobs[key] = JobUsage(key=key, kind="slurm", job_id=job_id, uid=uid, cpu_time_ns=cpu_ns,
                                  mem_bytes=mem_bytes, alloc_cpus=alloc_cpus, cluster=cluster)
        return key

    def run(self, key: str, cpu_ns: int) -> None:
        self.jobs[key].cpu_time_ns += cpu_ns

    def end(self, key: str) -> None:
        del self.jobs[key]

    def read(self) -> list[JobUsage]:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        return [JobUsage(u.key, u.kind, u.job_id, u.uid, u.cpu_time_ns, u.mem_bytes, u.alloc_cpus,
                         u.alloc_mem_bytes, u.cluster, dict(u.meta)) for u in self.jobs.values()]


class Clock:
    """A settable clock for Monitor(clock=...)."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> float:
        self.t += s
        return self.t
