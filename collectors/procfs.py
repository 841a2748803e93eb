"""Node CPU activity from /proc/stat and machine facts (CPU model, packages, memory) from procfs."""

from __future__ import annotations

import os
from pathlib import Path

from .base import CpuTimes


class ProcStat:
    """Re-reads /proc/stat's aggregate line through a kept file descriptor."""

    name = "procstat"

    def __init__(self, procfs: Path):
        self.path = Path(procfs) / "stat"
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.ncpu = sum(1 for line in self.path.read_text().splitlines() if line[:3] == "cpu"
                        and line[3:4].isdigit())

    def read(self) -> CpuTimes:
        head = os.pread(self.fd, 256, 0).split(b"\n", 1)[0].split()
        # cpu user nice system idle iowait irq softirq steal guest guest_nice: guest time is
        # already inside user/nice, so it is not added again.
        vals = [int(x) for x in head[1:9]]
        total = sum(vals)
        idle = vals[3] + vals[4]
        return CpuTimes(total_ticks=total, idle_ticks=idle, ncpu=self.ncpu)

    def close(self) -> None:
        os.close(self.fd)


def cpu_model(procfs: Path) -> str:
    try:
        for line in (Path(procfs) / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_count(procfs: Path) -> int:
    """Logical CPUs this node shows (through the configured procfs, so fixture trees count)."""
    try:
        n = sum(1 for line in (Path(procfs) / "cpuinfo").read_text().splitlines()
                if line.startswith("processor"))
    except OSError:
        n = 0
    return n or os.cpu_count() or 1


def cpu_packages(procfs: Path) -> int:
    ids = set()
    try:
        for line in (Path(procfs) / "cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                ids.add(line.split(":", 1)[1].strip())
    except OSError:
        pass
    return max(1, len(ids))


def mem_total_bytes(procfs: Path) -> int:
    for line in (Path(procfs) / "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError("MemTotal missing from meminfo")


def boot_id(procfs: Path) -> str:
    """Changes at every boot: counters stored before a reboot are meaningless after it."""
    try:
        return (Path(procfs) / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""
