"""How the TUI writes figures, times and periods in narrow table cells and status lines."""

from __future__ import annotations

import time

from greend import units

# (label, seconds back from now); None: no limit.
PERIODS: list[tuple[str, float | None]] = [
    ("last 24 h", 86400.0),
    ("last 7 days", 7 * 86400.0),
    ("last 30 days", 30 * 86400.0),
    ("last 365 days", 365 * 86400.0),
    ("all time", None),
]
DEFAULT_PERIOD = 2

SORT_LABELS = {
    "recent": "most recent",
    "energy": "energy",
    "carbon": "carbon",
    "water": "water",
    "elapsed": "elapsed time",
    "job": "job id",
    "name": "name",
}


def since(period: int, now: float) -> float | None:
    secs = PERIODS[period][1]
    return None if secs is None else now - secs


def carbon_short(g: float) -> str:
    """'12.3 g' rather than '12.3 gCO2e' where the column header already says CO2e."""
    return units.carbon(g, unit=False)


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def stamp(t: float | None) -> str:
    return "—" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def mib(b: float | None) -> str:
    return units.size(b)


def percent(x: float | None) -> str:
    return units.percent(x)
