"""Snapshots of what a person sees in `greend tui`: each main screen at 80x24 (a login node over SSH)
and at 160x48, over the fixture ledger with "now" frozen. Update with `--snapshot-update`, then look
at the SVGs in tests/__snapshots__/test_tui_snapshots/ before committing them."""

from __future__ import annotations

import pytest
import test_tui_fixtures as fx
from greend.tui.app import GreendApp
from greend.tui.data import LedgerSource, SocketSource
from test_tui_fixtures import NOW, build_ledger, config

NARROW, WIDE = (80, 24), (160, 48)


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)  # colours are part of the picture, but one
    yield from fx.local_time_is_utc(monkeypatch)


@pytest.fixture
def app(tmp_path) -> GreendApp:
    src = LedgerSource(build_ledger(tmp_path / "ledger.sqlite"), config(),
                       label="ledger /var/lib/greend/ledger.sqlite")
    return GreendApp(src, user="alice", me="alice", clock=lambda: NOW, refresh_s=0)


def keys(*pressed: str):
    """run_before for snap_compare: wait for the data, press keys, wait again."""

    async def run(pilot) -> None:
        app = pilot.app
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        for k in pressed:
            await pilot.press(k)
            await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()

    return run


@pytest.mark.parametrize("size", [NARROW, WIDE], ids=["80x24", "160x48"])
def test_my_jobs(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=keys())


def test_everyones_jobs_by_carbon(snap_compare, app):
    assert snap_compare(app, terminal_size=NARROW, run_before=keys("u", "C"))


def test_failed_jobs_only(snap_compare, app):
    assert snap_compare(app, terminal_size=NARROW, run_before=keys("o"))


def test_my_jobs_by_energy_ascending_wide(snap_compare, app):
    assert snap_compare(app, terminal_size=WIDE, run_before=keys("E", "E"))


@pytest.mark.parametrize("size", [NARROW, WIDE], ids=["80x24", "160x48"])
def test_running_job(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=keys("enter"))


def test_ended_job_with_decision_and_advice(snap_compare, app):
    assert snap_compare(app, terminal_size=(160, 60), run_before=keys("down", "down", "enter"))


@pytest.mark.parametrize("size", [NARROW, WIDE], ids=["80x24", "160x48"])
def test_clusters(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=keys("2", "down"))


@pytest.mark.parametrize("size", [NARROW, WIDE], ids=["80x24", "160x48"])
def test_accounts(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=keys("3"))


def test_help(snap_compare, app):
    assert snap_compare(app, terminal_size=NARROW, run_before=keys("question_mark"))


def test_search(snap_compare, app):
    assert snap_compare(app, terminal_size=NARROW, run_before=keys("slash", *"unet"))


def test_no_daemon(snap_compare):
    src = SocketSource("/nonexistent/greend/api.sock")
    app = GreendApp(src, user="alice", clock=lambda: NOW, refresh_s=0)
    assert snap_compare(app, terminal_size=NARROW, run_before=keys())


def test_no_color(snap_compare, app, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    src = app.source
    app = GreendApp(src, user="alice", clock=lambda: NOW, refresh_s=0)
    assert snap_compare(app, terminal_size=NARROW, run_before=keys())
