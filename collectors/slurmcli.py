"""The one way greend talks to Slurm's client commands and reads their JSON: a command runner with a
timeout that kills the command's whole process group, and the parsing of Slurm-JSON numbers.

Used by the node's job metadata (collectors/slurm.py), the policies' live cluster state
(policies/state.py) and `greend submit` (policies/submit.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

_ERR_PREFIX = re.compile(r"^\w+: (?:error|fatal): ", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Completed:
    """How a command ended: exit status (127: not found, 126: not executable), stdout, stderr."""

    returncode: int
    stdout: str
    stderr: str


def run(cmd: list[str], *, env: Mapping[str, str] | None, timeout_s: float) -> Completed:
    """Run one Slurm command without a shell; raises TimeoutError after timeout_s seconds, with the
    command and anything it started killed (its own session, so its own process group: a
    wrapper's children would otherwise keep the pipes open)."""
    import subprocess  # here: parsing Slurm's JSON (and deciding without live state) never needs it

    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=None if env is None else dict(env),
                                text=True, errors="replace", start_new_session=True)
    except FileNotFoundError:
        return Completed(127, "", f"{cmd[0]}: command not found")
    except PermissionError:
        return Completed(126, "", f"{cmd[0]}: permission denied")
    except OSError as e:
        return Completed(126, "", f"{cmd[0]}: cannot run: {e.strerror}")
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise TimeoutError(f"{os.path.basename(cmd[0])} did not answer within {timeout_s:g} s") from None
    except BaseException:
        _kill_group(proc)
        raise
    return Completed(proc.returncode, out, err)


def _kill_group(proc) -> None:
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    try:
        proc.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        pass  # a child in uninterruptible sleep: the pipes are left to the garbage collector


def first_error(err: str) -> str:
    """The first error line of a Slurm command's stderr, without its "sbatch: error: " prefix."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    for ln in lines:
        m = _ERR_PREFIX.match(ln)
        if m:
            return ln[m.end():]
    return lines[-1] if lines else "no output"


def json_failure(data, key: str) -> str | None:
    """Why a Slurm command's --json answer cannot be used, or None when it can.

    22.05's `squeue --json` and `sinfo --json` exit 0 when they cannot reach the controller: the
    answer is an `errors` list and an empty `key` list ("jobs", "nodes"), which must not be read as
    an empty queue or cluster. Errors beside a non-empty list are Slurm's warnings: usable."""
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        return f"no '{key}' list in the answer"
    errors = [e for e in data.get("errors") or [] if e]
    if not errors or data[key]:
        return None
    first = errors[0]
    if not isinstance(first, dict):
        return str(first)
    what = str(first.get("description") or "").strip()
    why = ": ".join(str(first[k]) for k in ("source", "error") if first.get(k))
    return f"{what} ({why})" if what and why else what or why or "an error without a message"


def number(v, default=None):
    """A number of Slurm's JSON: plain (22.05) or {"set": true, "infinite": false, "number": N}
    (23.02+); `default` when unset, infinite, missing or not a number."""
    if isinstance(v, dict):
        if not v.get("set", True) or v.get("infinite"):
            return default
        v = v.get("number")
    if v is None or isinstance(v, bool):
        return default
    if isinstance(v, int | float):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return default
