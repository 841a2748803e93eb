"""`greend tui`'s start (issue 17): the first page is read while Textual is imported, and the jobs
screen shows that page without asking the ledger again; what the start imports stays light."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from greend.tui import cli as tui_cli
from greend.tui.app import GreendApp
from greend.tui.data import LedgerSource, first_query
from greend.tui.jobs import JobsScreen
from test_tui_fixtures import NOW, build_ledger, config

from greend import config_cache, queries


@pytest.fixture
def ledger_path(tmp_path) -> Path:
    return build_ledger(tmp_path / "ledger.sqlite")


def test_the_prefetched_page_is_the_jobs_screens_first_page(ledger_path, monkeypatch):
    calls = []
    real = queries.job_page

    def job_page(db, q, now):  # counts the ledger queries, and runs them
        calls.append(q)
        return real(db, q, now)

    monkeypatch.setattr(queries, "job_page", job_page)
    src = LedgerSource(ledger_path, config())
    src.prefetch(first_query("alice", NOW - 3, 100), NOW - 3).join(10)
    assert len(calls) == 1
    prefetched = src._last[2]
    assert prefetched.total == 21

    async def run() -> JobsScreen:
        app = GreendApp(src, user="alice", me="alice", clock=lambda: NOW, refresh_s=0, page_size=100)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, JobsScreen)
            # The screen's own first query is the one prefetched (a few seconds later).
            q = screen.query_now()
            assert q == first_query("alice", NOW, 100)
            await pilot.press("q")
            return screen

    screen = asyncio.run(run())
    assert screen.page is prefetched  # shown as read in the background...
    assert len(calls) == 1  # ... and the ledger was not queried again


def test_a_failed_prefetch_is_left_to_the_screen(tmp_path):
    src = LedgerSource(tmp_path / "absent.sqlite")
    src.prefetch(first_query("alice", NOW, 100), NOW).join(10)  # no exception escapes
    assert src._last is None


def test_the_tui_start_imports_no_http_client_nor_pydantic(ledger_path, tmp_path):
    # Up to the first page: the ledger source and its prefetch, then Textual. http.client (for the
    # API sources) and the validated configuration's models are not needed for it.
    code = ("import sys\n"
            "from greend.tui import data\n"
            f"s = data.LedgerSource({str(ledger_path)!r})\n"
            "import time\n"
            "s.prefetch(data.first_query('alice', time.time(), 100), time.time()).join(10)\n"
            "print(sorted(m for m in ('http.client', 'pydantic', 'greend.config') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_default_source_reads_the_cached_configuration(tmp_path, monkeypatch):
    # `greend tui` with no --ledger reads the configuration to find the socket or the ledger: the
    # cached view once the validated one has been stored (greend.config_cache).
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = tmp_path / "greend.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    args = argparse.Namespace(url=None, socket=None, ledger=None, config=str(cfg), state_dir=None)
    first = tui_cli.make_source(args)
    second = tui_cli.make_source(args)
    assert not isinstance(first.cfg, config_cache.View)  # validated, then stored
    assert isinstance(second.cfg, config_cache.ConfigView)
    assert first.path == second.path == tmp_path / "state" / "ledger.sqlite"


async def until(pilot, condition, timeout_s: float = 20.0) -> None:
    """Waits for the app until condition() holds; a loaded CI machine may take a while."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await pilot.pause(0.05)


def test_the_start_up_ends_once_the_first_page_is_shown(ledger_path, monkeypatch):
    # `greend tui` resumes the garbage collector and stores the parsed stylesheets then
    # (tui/cli.py): once, after the page is on screen, not before.
    from greend.tui import app as app_mod

    monkeypatch.setattr(app_mod, "STARTED_AFTER_S", 60.0)  # the page ends it, not the fallback
    calls = []

    async def run() -> None:
        app = GreendApp(LedgerSource(ledger_path, config()), user="alice", me="alice",
                        clock=lambda: NOW, refresh_s=0,
                        on_started=lambda: calls.append(app.screen.page is not None))
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: calls)
            assert calls == [True]
            await pilot.press("r")
            await app.workers.wait_for_complete()
            await pilot.pause(0.3)
            assert calls == [True]

    asyncio.run(run())


def test_the_start_up_also_ends_when_the_first_page_cannot_be_read(tmp_path, monkeypatch):
    from greend.tui import app as app_mod

    monkeypatch.setattr(app_mod, "STARTED_AFTER_S", 0.2)
    calls = []

    async def run() -> None:
        app = GreendApp(LedgerSource(tmp_path / "absent.sqlite"), user="alice", me="alice",
                        clock=lambda: NOW, refresh_s=0, on_started=lambda: calls.append(1))
        async with app.run_test(size=(80, 24)) as pilot:
            status = lambda: str(app.screen.query_one("#status").render())  # noqa: E731
            await until(pilot, lambda: calls and "Press r to retry" in status())
            await pilot.pause(0.3)
            assert calls == [1]

    asyncio.run(run())
