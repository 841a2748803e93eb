"""greend tui while jobs run: a run written into a ledger by another process (as `greend measure`
writes it) shows within seconds, named, with figures that move; it ends with its outcome; a
running record nobody updates any more says when it was last seen."""

from __future__ import annotations

import getpass
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from greend.tui.app import GreendApp
from greend.tui.data import LedgerSource
from greend.tui.job import JobScreen
from greend.tui.outcome import STALE_S
from test_tui import pilot_test, press, settle, table_lines, text_of
from textual.widgets import Static

from greend import config as config_mod
from greend import units
from greend.ledger import JobRow, Ledger

# What `greend measure -- sleep 5` leaves in a ledger, written the way its monitor writes it (the
# ledger API, one transaction per checkpoint): a running row early, then every half second with
# more energy and a series point, then the ended row with the exit status. argv: ledger, seconds,
# "end" or "vanish" (stop writing without ending: a daemon that was killed).
WRITER = r"""
import os, sys, time
from greend import config as config_mod
from greend import units
from greend.ledger import JobRow, Ledger

path, seconds, how = sys.argv[1], float(sys.argv[2]), sys.argv[3]
cfg = config_mod.Config()
f = config_mod.cluster_factors(cfg, cfg.cluster).at(time.time())
ledger = Ledger(path)
t0 = time.time()
job_id = time.strftime("%Y%m%d-%H%M%S", time.localtime(t0)) + f"-{os.getpid()}"
row = JobRow(cluster=cfg.cluster, job_id=job_id, node="n1", kind="command", state="running",
             first_seen=t0, last_seen=t0, submit_time=int(t0), name="sleep", user=sys.argv[4],
             command=f"sleep {seconds:g}", provenance={"cpu": "modelled: TDP"})
with ledger.transaction() as db:  # the running row, at once
    ledger.put_factor_set(db, f.key(), f, t0)
    ledger.upsert_job(db, row)
last = t0
while True:
    time.sleep(0.5)
    t = time.time()
    done = t - t0 >= seconds
    row.cpu_uj += round(12.0 * (t - last) * 1e6)  # 12 W
    row.last_seen = t
    if done and how == "end":
        row.state, row.end_time, row.exit_code = "ended", t, 0
    with ledger.transaction() as db:
        pk = ledger.upsert_job(db, row)
        ledger.put_series(db, [(pk, last, t, f.key(), round(12.0 * (t - last) * 1e6), 0, 0, 0, 0,
                                0.0, 0.0, 0.0)])
    last = t
    if done:
        break
ledger.close()
"""


def _writer(path: Path, seconds: float, how: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(seconds), how, getpass.getuser()])


def _rows(path: Path) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM jobs").fetchone()[0]
    finally:
        db.close()


def _empty_ledger(path: Path) -> Path:
    Ledger(path).close()
    return path


async def _wait_for(app, pilot, pred, within_s: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        await pilot.pause(0.05)
        if pred():
            return time.monotonic() - t0
    return None


@pytest.mark.slow
@pilot_test
async def test_a_running_run_shows_within_3_s_and_ends_with_its_outcome(tmp_path):
    path = _empty_ledger(tmp_path / "ledger.sqlite")
    me = getpass.getuser()
    app = GreendApp(LedgerSource(path, config_mod.Config()), user=me, me=me, refresh_s=1.0,
                    clock=time.time)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert table_lines(app) == []
        proc = _writer(path, 5, "end")
        try:
            # From the moment the row is in the ledger (the writer's own start is not the TUI's)
            assert await _wait_for(app, pilot, lambda: _rows(path) > 0, 30.0) is not None
            seen = await _wait_for(
                app, pilot, lambda: any("sleep" in x and "running" in x for x in table_lines(app)), 3.0)
            assert seen is not None, f"not shown within 3 s: {table_lines(app)}"
            first = table_lines(app)[0]
            # The elapsed time moves between reads of the ledger, and so does the energy.
            assert await _wait_for(app, pilot, lambda: table_lines(app)[0] != first, 2.5) is not None
            assert "1 running" in text_of(app.screen.query_one("#status", Static))
            proc.wait(timeout=30)
        finally:
            proc.kill()
        ended = await _wait_for(app, pilot, lambda: " ok " in table_lines(app)[0], 3.0)
        assert ended is not None, table_lines(app)
        line = table_lines(app)[0]
        assert "sleep" in line and "running" not in line
        assert "0 running" in text_of(app.screen.query_one("#status", Static))
        # The totals line follows new figures too (at most every 5 s), not only a change of period.
        totals = app.screen.query_one("#totals", Static)
        assert await _wait_for(app, pilot, lambda: text_of(totals).startswith(
            "Totals of your last 30 days: 1 job ·"), 7.0) is not None, text_of(totals)


@pilot_test
async def test_a_record_nobody_updates_says_when_it_was_last_seen(tmp_path):
    path = _empty_ledger(tmp_path / "ledger.sqlite")
    proc = _writer(path, 1, "vanish")  # writes a running row, then stops as a killed daemon would
    assert proc.wait(timeout=30) == 0
    later = time.time() + STALE_S + 60
    (row,) = Ledger(path, readonly=True).jobs()
    assert row.state == "running"
    app = GreendApp(LedgerSource(path, config_mod.Config()), user=row.user, me=row.user, refresh_s=0,
                    clock=lambda: later)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        (line,) = table_lines(app)
        seen_at = time.strftime("%H:%M", time.localtime(row.last_seen))
        assert f"seen {seen_at}" in line and "running" not in line
        # The elapsed time stops at the last sighting instead of growing with the clock.
        assert " 1 s " in line or " 2 s " in line
        await press(app, pilot, "enter")
        assert isinstance(app.screen, JobScreen)
        title = text_of(app.screen.query_one("#title", Static))
        assert "last seen at" in title and time.strftime("%H:%M:%S", time.localtime(row.last_seen)) in title


def test_power_history_of_running_rows():
    from greend.tui.plot import PowerHistory, sparkline

    base = dict(cluster="c", job_id="1", node="n", kind="command", first_seen=0.0, submit_time=0)
    h = PowerHistory()
    h.update([JobRow(state="running", last_seen=10.0, cpu_uj=100_000_000, **base)])
    assert h.watts(JobRow(state="running", last_seen=0, **base)) == [pytest.approx(10.0)]  # mean so far
    h.update([JobRow(state="running", last_seen=10.0, cpu_uj=100_000_000, **base)])  # nothing new
    h.update([JobRow(state="running", last_seen=12.0, cpu_uj=160_000_000, **base)])  # 60 J in 2 s
    h.update([JobRow(state="running", last_seen=14.0, cpu_uj=160_000_000, **base)])  # idle
    row = JobRow(state="running", last_seen=14.0, cpu_uj=160_000_000, **base)
    assert h.watts(row) == [pytest.approx(10.0), pytest.approx(30.0), pytest.approx(0.0)]
    assert h.cell(row, 20.0) == f"{sparkline([10.0, 30.0, 0.0])} {units.power(0.0):>7}"  # the latest
    assert sparkline([10.0, 30.0, 0.0]) == "     ▃█▁"
    h.update([JobRow(state="ended", last_seen=16.0, end_time=16.0, cpu_uj=160_000_000, **base)])
    assert h.watts(row) == []  # forgotten once ended
    ended = JobRow(state="ended", last_seen=16.0, end_time=16.0, cpu_uj=160_000_000, **base)
    assert h.cell(ended, 20.0) == "mean 10 W"
