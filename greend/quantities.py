"""Durations, memory sizes and points in time as Slurm and people write them.

Parsers raise ValueError with a message that says what was expected; callers add the file, line or
key. Only the standard library is imported: `greend route` must start fast.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

from . import units

_SUFFIX_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_WORDS_S = {
    "second": 1, "seconds": 1, "sec": 1, "s": 1,
    "minute": 60, "minutes": 60, "min": 60, "m": 60,
    "hour": 3600, "hours": 3600, "h": 3600,
    "day": 86400, "days": 86400, "d": 86400,
    "week": 604800, "weeks": 604800, "w": 604800,
}
_HUMAN = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$", re.IGNORECASE)
_UNLIMITED = ("unlimited", "infinite")

DURATION_HELP = "a Slurm time ([D-]HH:MM:SS, MM:SS, minutes, D-HH) or 30s, 15m, 2h, 1d"
MEMORY_HELP = "a size in MB or with a unit suffix (512M, 8G, 1T)"
TIME_POINT_HELP = "ISO 8601 (2026-05-04T18:00), HH:MM today, +6h or now+6hours"


def parse_duration(text: str | int | float) -> int | None:
    """Seconds of a duration; None for UNLIMITED. Bare numbers are minutes, as in Slurm's --time."""
    if isinstance(text, bool):
        raise ValueError(f"expected {DURATION_HELP}, got {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"expected a non-negative duration, got {text!r}")
        return round(text * 60)
    s = str(text).strip()
    if s.lower() in _UNLIMITED:
        return None
    m = _HUMAN.match(s)
    if m:
        return round(float(m.group(1)) * _SUFFIX_S[m.group(2).lower()])
    days = 0
    body = s
    if "-" in s:
        d, body = s.split("-", 1)
        if not d.isdigit():
            raise ValueError(f"expected {DURATION_HELP}, got {text!r}")
        days = int(d)
    parts = body.split(":")
    if not body or not all(p.isdigit() for p in parts) or len(parts) > 3:
        raise ValueError(f"expected {DURATION_HELP}, got {text!r}")
    nums = [int(p) for p in parts]
    if "-" in s:
        # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, se = [*nums, 0, 0][:3]
    elif len(nums) == 1:
        h, mi, se = 0, nums[0], 0  # minutes
    elif len(nums) == 2:
        h, mi, se = 0, nums[0], nums[1]  # MM:SS
    else:
        h, mi, se = nums
    return days * 86400 + h * 3600 + mi * 60 + se


def format_duration(seconds: float | None) -> str:
    """Slurm's own form, [D-]HH:MM:SS; "UNLIMITED" for None."""
    if seconds is None:
        return "UNLIMITED"
    s = round(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}-{h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"


def human_duration(seconds: float) -> str:
    """A short reading for explanations: 45 s, 12 min, 3.5 h, 2.0 d (greend.units)."""
    return units.duration_words(seconds)


_MEM = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$", re.IGNORECASE)
_MEM_MB = {"": 1.0, "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0 * 1024}


def parse_memory_mb(text: str | int | float) -> float:
    """Megabytes (MiB, as Slurm counts them) of a size; a bare number is MB, as in --mem."""
    if isinstance(text, bool):
        raise ValueError(f"expected {MEMORY_HELP}, got {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"expected a non-negative size, got {text!r}")
        return float(text)
    m = _MEM.match(str(text).strip())
    if not m:
        raise ValueError(f"expected {MEMORY_HELP}, got {text!r}")
    return float(m.group(1)) * _MEM_MB[m.group(2).lower()]


def format_memory(mb: float) -> str:
    return units.size_mb(mb)


_RELATIVE = re.compile(r"^(?:now)?\s*\+\s*(\d+(?:\.\d+)?)\s*([a-z]*)$", re.IGNORECASE)


def parse_time_point(text: str, now: float) -> float:
    """Epoch seconds of a point in time. Naive ISO times are local time, as for sbatch --begin."""
    s = str(text).strip()
    if s.lower() == "now":
        return now
    m = _RELATIVE.match(s)
    if m:
        unit = m.group(2).lower() or "s"
        if unit not in _WORDS_S:
            raise ValueError(f"unknown time unit {m.group(2)!r} in {text!r}: expected {TIME_POINT_HELP}")
        return now + float(m.group(1)) * _WORDS_S[unit]
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", s):
        parts = [int(p) for p in s.split(":")] + [0]
        lt = time.localtime(now)
        t = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, parts[0], parts[1], parts[2], 0, 0, -1))
        return t if t > now else t + 86400  # HH:MM already past today: tomorrow, as Slurm does
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"expected {TIME_POINT_HELP}, got {text!r}") from None
    if dt.tzinfo is None:
        return time.mktime(dt.timetuple()) + dt.microsecond / 1e6
    return dt.timestamp()


def slurm_time_point(t: float) -> str:
    """A point in time as sbatch --begin reads it (local time, whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
