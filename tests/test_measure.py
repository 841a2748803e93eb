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


MODEL_CONFIG = "[power]\nrapl = false\n"  # the TDP model: a node idle power that is known exactly


def _footprint(tmp_path: Path, *cmd: str, extra: tuple = (), env: dict | None = None) -> dict:
    out = tmp_path / f"fp-{time.monotonic_ns()}.json"
    r = measure(tmp_path, "--json", "-o", str(out), *extra, "--", *cmd, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_idle_share_of_identical_runs_is_the_node_idle_power_times_their_length(tmp_path):
    cfg = tmp_path / "model.toml"
    cfg.write_text(MODEL_CONFIG)
    runs = [_footprint(tmp_path, "sleep", "1", env={"GREEND_CONFIG": str(cfg)}) for _ in range(5)]
    ncpu = os.cpu_count()
    idle = []
    for d in runs:
        # Node idle power under the model: its floor, 0.1 x TDP; the command is allocated the
        # CPUs it may run on, so its share is alloc / ncpu of it, for the run's length.
        expected = 0.1 * d["cpu_power_model"]["tdp_w"] * d["job"]["alloc_cpus"] / ncpu * d["elapsed_s"]
        assert d["idle_power"]["rule"] == "allocated"
        assert d["idle_power"]["energy_j"] == pytest.approx(expected, rel=0.10)
        assert 0 <= d["idle_power"]["node_busy"] <= 1
        idle.append(d["idle_power"]["energy_j"])
    assert max(idle) <= 1.1 * min(idle), idle


def test_idle_rule_unattributed_charges_no_idle_power(tmp_path):
    cfg = tmp_path / "model.toml"
    cfg.write_text(MODEL_CONFIG)
    d = _footprint(tmp_path, "sleep", "0.5", extra=("--idle", "unattributed"),
                   env={"GREEND_CONFIG": str(cfg)})
    assert d["idle_power"]["rule"] == "unattributed" and d["idle_power"]["energy_j"] == 0


def test_concurrent_runs_leave_node_books_that_balance_to_the_microjoule(tmp_path):
    env = {**os.environ, "GREEND_STATE_DIR": str(tmp_path / "state")}
    assert measure(tmp_path, "-q", "--", "true").returncode == 0  # the ledger exists
    procs = [subprocess.Popen([GREEND, "measure", "-q", "--", sys.executable, "-c", BUSY.format(s=s)],
                              env=env) for s in (0.4, 0.8, 1.2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    jobs_uj = db.execute("SELECT sum(cpu_uj + dram_uj + gpu_uj + memory_uj) FROM jobs").fetchone()[0]
    series = db.execute("SELECT sum(cpu_uj + dram_uj + gpu_uj + memory_uj) FROM job_series").fetchone()[0]
    node_e, node_u = db.execute("SELECT sum(energy_uj), sum(unattributed_uj) FROM node_series").fetchone()
    tot_e, tot_u = db.execute("SELECT sum(energy_uj), sum(unattributed_uj) FROM node_totals").fetchone()
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 4
    assert jobs_uj > 0 and series == jobs_uj
    assert node_e == jobs_uj + node_u
    assert tot_e == jobs_uj + tot_u == node_e


def test_running_run_shows_early_named_and_stored_elapsed_is_the_printed_one(tmp_path):
    state = tmp_path / "state"
    assert measure(tmp_path, "-q", "--", "true").returncode == 0
    env = {**os.environ, "GREEND_STATE_DIR": str(state)}
    out = tmp_path / "fp.json"
    p = subprocess.Popen([GREEND, "measure", "--json", "-o", str(out), "--", "sleep", "4.5"], env=env)
    seen = []
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 30:
        listing = subprocess.run([GREEND, "jobs", "--state", "running", "--json"], env=env,
                                 capture_output=True, text=True)
        seen += [(time.time() - t0, d) for d in json.loads(listing.stdout)]
        time.sleep(0.5)
    assert p.wait() == 0
    assert seen and seen[0][0] < 3.5, "a running run shows within seconds"
    assert all(d["job"]["name"] == "sleep" and d["job"]["command"] == "sleep 4.5" for _, d in seen)
    first, last = seen[0][1], seen[-1][1]
    assert last["job"]["last_seen"] > first["job"]["last_seen"]  # live figures, not frozen
    assert last["energy_uj"]["it"] > first["energy_uj"]["it"]
    printed = json.loads(out.read_text())
    (stored,) = json.loads(subprocess.run([GREEND, "jobs", printed["job"]["job_id"], "--json"],
                                          env=env, capture_output=True, text=True).stdout),
    assert stored["elapsed_s"] == pytest.approx(printed["elapsed_s"], abs=0.002)
    assert stored["job"]["first_seen"] == pytest.approx(printed["job"]["first_seen"], abs=0.002)
    assert stored["job"]["state"] == "ended" and stored["job"]["outcome"] == "ok"


def test_every_json_output_validates_against_the_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from greend import report

    schema = json.loads(report.schema_path().read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    env = {**os.environ, "GREEND_STATE_DIR": str(tmp_path / "state")}
    docs = [_footprint(tmp_path, sys.executable, "-c", BUSY.format(s=0.2))]
    r = measure(tmp_path, "-q", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert r.returncode == 3
    listing = json.loads(subprocess.run([GREEND, "jobs", "--json"], env=env, capture_output=True,
                                        text=True).stdout)
    assert len(listing) == 2
    one = json.loads(subprocess.run([GREEND, "jobs", listing[0]["job"]["job_id"], "--json"], env=env,
                                    capture_output=True, text=True).stdout)
    for d in [*docs, *listing, one]:
        errors = [f"{list(e.path)}: {e.message}" for e in v.iter_errors(d)]
        assert not errors, errors
        assert d["schema_version"] == report.SCHEMA_VERSION
    assert {d["job"]["outcome"] for d in listing} == {"ok", "failed"}


def test_jobs_shows_the_outcome_and_filters_on_it(tmp_path):
    env = {**os.environ, "GREEND_STATE_DIR": str(tmp_path / "state")}
    for code in ("pass", "raise SystemExit(3)", "import os, signal; os.kill(os.getpid(), signal.SIGINT)"):
        measure(tmp_path, "-q", "--", sys.executable, "-c", code)

    def jobs(*a):
        return subprocess.run([GREEND, "jobs", *a], env=env, capture_output=True, text=True)

    table = jobs().stdout.splitlines()
    assert "EXIT" in table[0] and len(table) == 4
    assert all(len(line) <= 80 for line in table)
    assert sorted(line.split()[2] for line in table[1:]) == ["0", "130", "3"]
    failed = json.loads(jobs("--outcome", "failed", "--json").stdout)
    assert sorted(d["job"]["exit_code"] for d in failed) == [3, 130]
    ok = json.loads(jobs("--outcome", "ok", "--json").stdout)
    assert [d["job"]["exit_code"] for d in ok] == [0]


@pytest.mark.parametrize(("args", "message"), [
    (["measure", "--interval", "inf", "--", "true"], "--interval"),
    (["measure", "--interval", "nan", "--", "true"], "--interval"),
    (["measure", "--interval", "0", "--", "true"], "--interval"),
    (["jobs", "--limit", str(10**30)], "--limit"),
    (["jobs", "--limit", "-5"], "--limit"),
    (["jobs", "--since-hours", "-1"], "--since-hours"),
])
def test_numeric_options_are_range_checked(tmp_path, args, message):
    env = {**os.environ, "GREEND_STATE_DIR": str(tmp_path / "state")}
    r = subprocess.run([GREEND, *args], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "expected" in r.stderr
    assert "Traceback" not in r.stderr


def test_state_dir_flag_beats_the_environment(tmp_path):
    env = {**os.environ, "GREEND_STATE_DIR": str(tmp_path / "from-env")}
    flag = tmp_path / "from-flag"
    r = subprocess.run([GREEND, "--state-dir", str(flag), "measure", "-q", "--", "true"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (flag / "ledger.sqlite").exists() and not (tmp_path / "from-env").exists()


def test_text_report_fits_80_columns(tmp_path):
    r = measure(tmp_path, "--", sys.executable, "-c", "pass")
    assert r.returncode == 0
    lines = r.stderr.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert any("of which idle" in line and "idle rule `allocated`" in line for line in lines)


def _series(tmp_path: Path, job_id: str) -> list[tuple]:
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    return db.execute(
        "SELECT s.t_start, s.t_end, s.cpu_uj + s.dram_uj + s.gpu_uj + s.memory_uj, "
        "j.cpu_uj + j.dram_uj + j.gpu_uj + j.memory_uj FROM job_series s JOIN jobs j "
        "ON j.pk = s.job_pk WHERE j.job_id = ? ORDER BY s.t_start", (job_id,)).fetchall()


def test_a_short_runs_series_has_its_sampling_step(tmp_path):
    d = _footprint(tmp_path, "sleep", "1.6", extra=("--interval", "0.25"))
    rows = _series(tmp_path, d["job"]["job_id"])
    assert len(rows) >= 5, rows  # not "1 point of 9.1 s"
    assert d["series_step_s"] == 0.25
    assert all(r[0] == pytest.approx(round(r[0] / 0.25) * 0.25) for r in rows)
    assert sum(r[2] for r in rows) == rows[0][3]


@pytest.mark.slow
def test_a_long_runs_series_is_coarsened_to_a_bounded_number_of_points(tmp_path):
    from greend.measure import MAX_POINTS

    # 0.05 s sampling: past 120 points (6 s) the step becomes 1 s and what was stored is merged.
    d = _footprint(tmp_path, "sleep", "7.5", extra=("--interval", "0.05"))
    rows = _series(tmp_path, d["job"]["job_id"])
    assert len(rows) <= MAX_POINTS and len(rows) >= 7
    assert all(r[0] == int(r[0]) for r in rows)  # 1 s buckets
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    meta = db.execute("SELECT meta FROM jobs WHERE job_id = ?", (d["job"]["job_id"],)).fetchone()[0]
    assert json.loads(meta)["series_step_s"] == 1
    assert sum(r[2] for r in rows) == rows[0][3]  # nothing lost in the merge


def test_no_live_line_over_a_full_screen_program(tmp_path):
    # A program that puts the terminal in raw mode owns the screen: greend draws nothing on it.
    code = "import sys, time, tty; tty.setraw(0); time.sleep(2.6)"
    buf = _run_in_pty([GREEND, "measure", "--no-ledger", "--", sys.executable, "-c", code],
                      {"GREEND_STATE_DIR": str(tmp_path / "state")})
    text = buf.decode(errors="replace")
    assert not [u for u in re.findall(r"\x1b\[24;1H\x1b\[2K([^\x1b]*)\x1b8", text) if u]
    assert "IT energy" in text


def test_a_run_that_died_shows_when_it_was_last_seen(tmp_path):
    env = {**os.environ, "GREEND_STATE_DIR": str(tmp_path / "state")}
    p = subprocess.Popen([GREEND, "measure", "-q", "--", "sleep", "30"], env=env)
    db_path = tmp_path / "state" / "ledger.sqlite"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:  # the file can exist a moment before measure's first transaction creates the tables
            if db_path.exists() and sqlite3.connect(db_path).execute(
                    "SELECT count(*) FROM jobs WHERE state = 'running'").fetchone()[0]:
                break
        except sqlite3.OperationalError:
            pass
        time.sleep(0.2)
    children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
    p.kill()  # greend dies without closing the record
    p.wait()
    for pid in children:  # its command, orphaned: ended here by its pid
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    db = sqlite3.connect(db_path)
    (last,) = db.execute("SELECT last_seen FROM jobs").fetchone()
    with db:  # as if this happened ten minutes ago
        db.execute("UPDATE jobs SET last_seen = last_seen - 600, first_seen = first_seen - 600")
    table = subprocess.run([GREEND, "jobs"], env=env, capture_output=True, text=True).stdout
    seen = time.strftime("%H:%M", time.localtime(last - 600))
    assert f"seen {seen}" in table and "running" not in table
