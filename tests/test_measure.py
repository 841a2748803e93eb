"""`greend measure` end to end, through the installed command, as a user runs it."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

GREEND = str(Path(sys.executable).with_name("greend"))
BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def measure(tmp_path: Path, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    e = {**os.environ, "GREEND_STATE_DIR": str(tmp_path / "state"), **(env or {})}
    return subprocess.run([GREEND, "measure", *args], capture_output=True, text=True, env=e,
                          timeout=120, **kw)


def test_json_report_of_a_cpu_bound_command(tmp_path):
    out = tmp_path / "fp.json"
    r = measure(tmp_path, "--json", "-o", str(out), "--", sys.executable, "-c", BUSY.format(s=1.5))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    # The command's CPU time is its own (rusage of the reaped tree), not the node's.
    assert 1.4 <= d["cpu_time_s"] <= 2.5
    e = d["energy_j"]
    assert e["cpu"] > 0 and e["it"] == pytest.approx(e["cpu"] + e["dram"] + e["gpu"] + e["memory"])
    f = d["factors"][0]
    assert e["facility"] == pytest.approx(e["it"] * f["pue"])
    kwh = e["it"] / 3.6e6
    # Carbon and water carry 6 significant digits (docs/json.md).
    assert d["carbon_g"] == pytest.approx(kwh * f["pue"] * f["carbon_intensity_g_per_kwh"], rel=1e-5)
    assert d["water_l"]["site"] == pytest.approx(kwh * f["wue_site_l_per_kwh"], rel=1e-5)
    assert d["water_l"]["offsite"] == pytest.approx(kwh * f["pue"] * f["ewif_l_per_kwh"], rel=1e-5)
    # Every figure says how it was obtained and every factor where it came from.
    assert d["provenance"]["cpu"].startswith(("measured:", "modelled:"))
    for k in ("pue", "wue_site_l_per_kwh", "ewif_l_per_kwh", "carbon_intensity_g_per_kwh"):
        assert f["sources"][k]
    assert d["job"]["exit_code"] == 0 and d["job"]["state"] == "ended"


def test_text_report_goes_to_stderr_and_command_output_is_untouched(tmp_path):
    r = measure(tmp_path, "--", sys.executable, "-c", "print('hello from the job')")
    assert r.returncode == 0
    assert r.stdout == "hello from the job\n"
    for word in ("IT energy", "Facility energy", "Carbon", "Water", "PUE", "Carbon intensity", "EWIF"):
        assert word in r.stderr


@pytest.mark.parametrize(("code", "expected"), [("raise SystemExit(3)", 3),
                                                ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
                                                 128 + 15)])
def test_exit_status_is_the_commands(tmp_path, code, expected):
    r = measure(tmp_path, "-q", "--", sys.executable, "-c", code)
    assert r.returncode == expected


def test_unknown_command(tmp_path):
    r = measure(tmp_path, "--", "no-such-command-xyz")
    assert r.returncode == 127
    assert "no-such-command-xyz" in r.stderr and "not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_command_is_a_usage_error(tmp_path):
    r = measure(tmp_path)
    assert r.returncode == 2 and "no command given" in r.stderr


def test_unwritable_state_dir_fails_before_running_and_keeps_data(tmp_path):
    state = tmp_path / "state"
    r = measure(tmp_path, "-q", "--", "true")
    assert r.returncode == 0
    before = (state / "ledger.sqlite").read_bytes()
    # A state dir below a regular file can never be created, even by root.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    marker = tmp_path / "ran"
    r = measure(tmp_path, "--", "touch", str(marker), env={"GREEND_STATE_DIR": str(blocker / "s")})
    assert r.returncode == 2
    assert str(blocker) in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists(), "the command must not run when its footprint cannot be recorded"
    assert (state / "ledger.sqlite").read_bytes() == before


def test_runs_are_recorded_in_the_ledger_and_listed(tmp_path):
    for _ in range(2):
        assert measure(tmp_path, "-q", "--", sys.executable, "-c", BUSY.format(s=0.3)).returncode == 0
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    rows = db.execute("SELECT kind, state, cpu_uj, command FROM jobs").fetchall()
    assert len(rows) == 2 and all(r[0] == "command" and r[1] == "ended" and r[2] > 0 for r in rows)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    env = {**os.environ, "GREEND_STATE_DIR": str(tmp_path / "state")}
    listing = subprocess.run([GREEND, "jobs", "--json"], capture_output=True, text=True, env=env)
    jobs = json.loads(listing.stdout)
    assert len(jobs) == 2 and jobs[0]["energy_j"]["it"] > 0
    one = subprocess.run([GREEND, "jobs", jobs[0]["job"]["job_id"]], capture_output=True, text=True,
                         env=env)
    assert one.returncode == 0 and "Assumptions" in one.stdout


def test_orphaned_grandchildren_stay_in_the_command(tmp_path):
    # The shell starts a busy grandchild in the background and exits; greend, the subreaper,
    # reaps it and counts its CPU time too.
    script = f"{sys.executable} -c '{BUSY.format(s=0.8)}' & sleep 0.1; wait"
    out = tmp_path / "fp.json"
    r = measure(tmp_path, "--json", "-o", str(out), "--", "sh", "-c", script)
    assert r.returncode == 0
    assert json.loads(out.read_text())["cpu_time_s"] >= 0.75


def _run_in_pty(argv: list[str], env: dict, rows: int = 24, cols: int = 80) -> bytes:
    """Run argv on a fresh pseudo-terminal of rows x cols; everything written to it."""
    import fcntl
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.environ.update(env)
        os.execv(argv[0], argv)
    buf = b""
    deadline = time.time() + 60
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    os.waitpid(pid, 0)
    return buf


def test_live_line_stays_out_of_the_commands_output(tmp_path):
    # The command prints half a line, pauses across live updates, then ends the line: on the
    # terminal the line must read whole, and the live figures must sit on the bottom row only.
    code = ("import sys, time; print('epoch 1', end='', flush=True); time.sleep(2.6); "
            "print(' loss 0.25'); print('done')")
    buf = _run_in_pty([GREEND, "measure", "--no-ledger", "--", sys.executable, "-c", code],
                      {"GREEND_STATE_DIR": str(tmp_path / "state")})
    text = buf.decode(errors="replace")
    # The scrolling region keeps the bottom row for greend, and is given back at the end.
    assert "\x1b[1;23r" in text and "\x1b[r" in text
    updates = [u for u in re.findall(r"\x1b7\x1b\[24;1H\x1b\[2K([^\x1b]*)\x1b8", text) if u]
    assert len(updates) >= 2 and all("elapsed" in u and "IT energy so far" in u for u in updates)
    assert all(len(u) < 80 for u in updates)
    # Each update is one save-cursor ... restore-cursor write: taken out, the command's output
    # is exactly what it printed.
    rest = re.sub(r"\x1b7.*?\x1b8", "", text, flags=re.S)
    assert "epoch 1 loss 0.25\r\ndone\r\n" in rest
    assert "IT energy" in text  # the report at the end


def test_no_live_line_without_a_terminal_size(tmp_path):
    buf = _run_in_pty([GREEND, "measure", "--no-ledger", "--", "sleep", "1.5"],
                      {"GREEND_STATE_DIR": str(tmp_path / "state")}, rows=0, cols=0)
    assert b"\x1b7" not in buf and b"IT energy" in buf
