"""What is known about how a job ended (or whether it still runs), in words for the table and the
job's screen: ok, exit N (the signal when N > 128), Slurm's final state, or "last seen at T" when
a running record stopped being updated (its daemon, or `greend measure`, stopped)."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

from greend.ledger import JobRow

from .data import RUNNING, outcome_of, slurm_state

# A running record not updated for this long is stale: the daemon checkpoints running jobs every
# 15 s by default (sampling.checkpoint_interval_s), `greend measure` at least every 30 s.
STALE_S = 120.0


@dataclass(frozen=True, slots=True)
class Shown:
    short: str
    """For a narrow cell: 'running', 'ok', 'exit 3', 'TIMEOUT', 'seen 11:58', 'ended ?'."""
    long: str
    """For the job's screen: 'failed: exit 130 (killed by SIGINT)'."""
    style: str


def is_stale(row: JobRow, now: float) -> bool:
    return row.state == RUNNING and now - row.last_seen > STALE_S


def elapsed_shown(row: JobRow, now: float) -> float:
    """Elapsed time as far as it is known: a stale running record stops at its last sighting."""
    if row.state == RUNNING and not is_stale(row, now):
        return max(0.0, now - row.first_seen)
    return max(0.0, (row.end_time or row.last_seen) - row.first_seen)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code - 128).name
    except ValueError:
        return ""


def _hhmm(t: float, now: float) -> str:
    fmt = "%H:%M" if abs(now - t) < 86400 else "%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(t))


def shown(row: JobRow, now: float) -> Shown:
    if row.state == RUNNING:
        if is_stale(row, now):
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.last_seen))
            return Shown(f"seen {_hhmm(row.last_seen, now)}",
                         f"last seen at {at} (no update since: whatever measured it stopped)", "yellow")
        return Shown("running", "running", "bold green")
    out = outcome_of(row)
    code = row.exit_code
    st = slurm_state(row)
    if out == "failed":
        if code is not None and code != 0:
            sig = _signal_name(code) if code > 128 else ""
            return Shown(f"exit {code}", f"failed: exit {code}" + (f" (killed by {sig})" if sig else ""),
                         "bold red")
        return Shown(st, f"failed: Slurm state {st}", "bold red")
    if out == "ok":
        return Shown("ok", "ok: exit 0" if code == 0 else f"ok: Slurm state {st}", "green")
    return Shown("ended ?", "ended, outcome unknown (no exit code recorded)", "")
