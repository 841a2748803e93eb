"""CPU package and DRAM energy from RAPL through the Linux powercap sysfs.

Top-level zones (intel-rapl:N, and intel-rapl-mmio:N only when no MSR zone covers that package) are
read; their subzones (core, uncore) are already inside the package and are never summed. DRAM is a
sibling subzone (intel-rapl:N:M named "dram") and counts separately. Files are kept open and re-read
with pread: a re-read costs a few microseconds instead of an open().
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .base import EnergyCounter, SourceUnavailable

log = logging.getLogger(__name__)

PERMISSION_HINT = (
    "RAPL energy counters are readable by root only since CVE-2020-8694. Run greend as root, or "
    "let its group read them: `chgrp greend /sys/class/powercap/intel-rapl:*/energy_uj && chmod g+r "
    "...` (a udev rule makes it permanent; see docs/admin.md). Falling back to the TDP model."
)


@dataclass(slots=True)
class _Zone:
    domain: str
    source: str
    path: Path
    max_range_uj: int
    fd: int


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


class RaplCollector:
    name = "rapl"

    def __init__(self, sysfs: Path):
        self.root = Path(sysfs) / "class" / "powercap"
        self.zones: list[_Zone] = []
        self._open()

    def describe(self) -> str:
        return ", ".join(z.domain for z in self.zones)

    def _open(self) -> None:
        if not self.root.is_dir():
            raise SourceUnavailable(f"no powercap directory at {self.root}")
        tops: dict[str, Path] = {}
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            prefix, _, rest = name.partition(":")
            if prefix not in ("intel-rapl", "intel-rapl-mmio") or ":" in rest or not rest:
                continue
            try:
                zname = (entry / "name").read_text().strip()
            except OSError:
                continue
            # The MMIO interface exposes the same package counters on recent Intel parts: count a
            # package once, preferring the MSR-based zone.
            key = zname
            if key in tops and prefix == "intel-rapl-mmio":
                continue
            tops[key] = entry
        denied = False
        for zname, top in sorted(tops.items()):
            candidates = [(zname, top)]
            for sub in sorted(top.iterdir()):
                if sub.name.startswith(top.name + ":"):
                    try:
                        sname = (sub / "name").read_text().strip()
                    except OSError:
                        continue
                    if sname == "dram":
                        candidates.append((f"dram-{zname.rsplit('-', 1)[-1]}", sub))
            if zname == "psys":
                # psys (platform) includes packages and more: counting it too would double count.
                continue
            for domain, path in candidates:
                source = "dram" if domain.startswith("dram") else "cpu"
                try:
                    max_range = _read_int(path / "max_energy_range_uj")
                    fd = os.open(path / "energy_uj", os.O_RDONLY | os.O_CLOEXEC)
                    os.pread(fd, 32, 0)
                except PermissionError:
                    denied = True
                    continue
                except (OSError, ValueError) as e:
                    log.debug("rapl: skipping %s: %s", path, e)
                    continue
                self.zones.append(_Zone(domain, source, path, max_range, fd))
        if not self.zones:
            if denied:
                log.warning("%s", PERMISSION_HINT)
                raise SourceUnavailable("RAPL counters exist but are not readable (permission denied)")
            raise SourceUnavailable(f"no readable RAPL zone under {self.root}")

    def read(self) -> list[EnergyCounter]:
        out = []
        for z in self.zones:
            raw = os.pread(z.fd, 32, 0)
            out.append(
                EnergyCounter(z.domain, z.source, int(raw), z.max_range_uj, "measured: RAPL powercap")
            )
        return out

    def close(self) -> None:
        for z in self.zones:
            try:
                os.close(z.fd)
            except OSError:
                pass
        self.zones = []
