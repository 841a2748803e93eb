"""greend tui: the data layer against a fixture ledger and a fake of the API, and the app driven by
Textual's Pilot (navigation, filters, opening a job, refresh, a lost connection, NO_COLOR)."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_tui_fixtures as fx
from greend.tui import cli as tui_cli
from greend.tui.advice import right_sizing
from greend.tui.app import GreendApp, HelpScreen
from greend.tui.clusters import ClustersScreen
from greend.tui.data import (
    JobDetail,
    JobQuery,
    LedgerSource,
    SeriesPoint,
    SocketSource,
    SourceError,
    UrlSource,
    how_obtained,
    merge_rows,
    outcome_of,
    power_w,
)
from greend.tui.equivalents import equivalents
from greend.tui.job import JobScreen, decision_lines
from greend.tui.jobs import JobsScreen, short_duration
from greend.tui.plot import PowerPlot, resample
from rich.console import Console
from test_tui_fixtures import GIB, NOW, ApiServer, build_ledger, config
from textual.widgets import DataTable, Static

from greend.ledger import JobRow, Ledger

REPO = Path(__file__).resolve().parent.parent
D30 = 30 * 86400


@pytest.fixture
def ledger_path(tmp_path) -> Path:
    return build_ledger(tmp_path / "ledger.sqlite")


@pytest.fixture
def utc(monkeypatch):
    yield from fx.local_time_is_utc(monkeypatch)


def source(path: Path) -> LedgerSource:
    return LedgerSource(path, config(), label="ledger fixture.sqlite")


def text_of(widget: Static, width: int = 200) -> str:
    """What a Static shows, as plain text."""
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(widget.content)
    return console.export_text()


# -- the data layer -----------------------------------------------------------------------------
def test_ledger_source_merges_nodes_and_counts(ledger_path):
    src = source(ledger_path)
    page = src.jobs(JobQuery(user="alice", since=NOW - D30), NOW)
    assert page.total == 21 and page.running == 1
    top = page.jobs[0]
    assert (top.cluster, top.job_id, top.node) == ("site", "812345", "site-n1,site-n2")
    rows = Ledger(ledger_path, readonly=True).get_job("site", "812345")
    assert top.it_energy_uj == sum(r.it_energy_uj for r in rows)
    assert top.carbon_g == pytest.approx(sum(r.carbon_g for r in rows))
    assert top.alloc_gpus == 4 and top.state == "running" and top.end_time is None
    assert how_obtained(top) == "measured"


def test_filters_sort_search_and_period(ledger_path):
    src = source(ledger_path)
    q = JobQuery(user="alice", since=NOW - D30)
    assert [j.job_id for j in src.jobs(JobQuery(user="alice", state="running"), NOW).jobs] == ["812345"]
    assert {j.cluster for j in src.jobs(JobQuery(user="alice", cluster="oldlab"), NOW).jobs} == {"oldlab"}
    by_energy = src.jobs(JobQuery(user="alice", sort="energy"), NOW).jobs
    assert by_energy[0].job_id == "4410021"
    energies = [j.it_energy_uj for j in by_energy]
    assert energies == sorted(energies, reverse=True)
    asc = src.jobs(JobQuery(user="alice", sort="energy", descending=False), NOW).jobs
    assert [j.job_id for j in asc] == [j.job_id for j in reversed(by_energy)]
    assert [j.job_id for j in src.jobs(JobQuery(search="UNET"), NOW).jobs] == ["812345"]
    assert [j.job_id for j in src.jobs(JobQuery(search="analyse.py"), NOW).jobs] == [
        "20260310-093000-4242"]
    assert src.jobs(JobQuery(search="100%_"), NOW).total == 0  # LIKE wildcards are escaped
    day = src.jobs(JobQuery(user="alice", since=NOW - 86400), NOW)
    assert {j.job_id for j in day.jobs} == {"812345", "20260310-093000-4242"}
    assert src.jobs(JobQuery(user="alice"), NOW).total == 24  # all time
    names = [j.name for j in src.jobs(JobQuery(user="alice", sort="name", descending=False), NOW).jobs]
    assert names == sorted(names, key=str.lower)
    el = src.jobs(JobQuery(sort="elapsed"), NOW).jobs
    assert el[0].job_id == "4410021"
    assert src.jobs(q, NOW).total == 21


def test_paging(ledger_path):
    src = source(ledger_path)
    a = src.jobs(JobQuery(user="alice", limit=10), NOW)
    b = src.jobs(JobQuery(user="alice", limit=10, offset=10), NOW)
    c = src.jobs(JobQuery(user="alice", limit=10, offset=20), NOW)
    ids = [j.job_id for p in (a, b, c) for j in p.jobs]
    assert len(ids) == len(set(ids)) == 24 and a.total == 24


def test_job_detail_series_factors_decision(ledger_path):
    src = source(ledger_path)
    d = src.job("site", "812345")
    assert len(d.nodes) == 2 and d.job.node == "site-n1,site-n2"
    assert len(d.series) == 30  # two nodes' buckets merged
    assert sum(p.energy_uj for p in d.series) == d.job.it_energy_uj
    w = power_w(d.series, d.job.first_seen)
    assert min(w) == pytest.approx((615 + 615 * 0.8), rel=1e-3)  # constant base power of both nodes
    assert max(w) == pytest.approx(min(w) + 150 * 2 * 2 - 0, rel=0.2)
    assert d.factors[0]["pue"] == 1.25 and d.factors[0]["sources"]["pue"] == "site energy audit 2025"
    assert d.decision is None
    d = src.job("site", "812300")
    assert d.decision["cluster"] == "site" and d.decision["decision"]["outcome"] == "submitted"
    lines = decision_lines(d.decision)
    assert lines[0].strip() == "submitted: site (site tier)"
    assert any("lab: rejected by hds" in x for x in lines)
    assert any("site: eligible, score 0.82" in x and "210 gCO2e" in x for x in lines)
    assert any("HDS-certified" in x for x in lines)
    assert src.job("site", "nope") is None


def test_unchanged_ledger_is_not_queried_again(ledger_path):
    src = source(ledger_path)
    q = JobQuery(user="alice", since=NOW - D30)
    first = src.jobs(q, NOW)
    assert src.jobs(JobQuery(user="alice", since=NOW - D30 + 5), NOW + 5) is first  # a live refresh
    assert src.jobs(JobQuery(user="alice", since=NOW - D30, sort="energy"), NOW) is not first
    again = src.jobs(q, NOW)
    _bump(ledger_path, "812345", 3_600_000_000)  # a checkpoint by the daemon
    after = src.jobs(q, NOW)
    assert after is not again and after.jobs[0].it_energy_uj == again.jobs[0].it_energy_uj + 3_600_000_000


def test_no_decisions_table_is_no_decision(tmp_path):
    path = build_ledger(tmp_path / "l.sqlite")
    db = sqlite3.connect(path)
    db.execute("DROP TABLE decisions")
    db.commit()
    db.close()
    assert source(path).job("site", "812300").decision is None


def test_missing_ledger_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="no ledger here"):
        source(tmp_path / "none.sqlite").jobs(JobQuery(), NOW)


def test_summary_and_clusters(ledger_path):
    src = source(ledger_path)
    s = src.summary(NOW - D30, None, "account")
    assert s.rows[0].key == "imaging"
    carbons = [r.carbon_g for r in s.rows]
    assert carbons == sorted(carbons, reverse=True)
    assert s.unattributed_share == pytest.approx((30 * .06 + 26 * .08 + 12 * .21 + 9 * .35) / 77)
    users = src.summary(None, None, "user")
    assert {r.key for r in users.rows} == {"alice", "bob", "carol"}
    cl = {c.name: c for c in src.clusters(NOW)}
    assert cl["site"].hds and cl["site"].running == 2 and not cl["oldlab"].open
    assert cl["site"].factors["sources"]["wue_site_l_per_kwh"] == "cooling tower meters 2025"


def test_power_of_a_short_first_bucket():
    # A bucket is stamped with the start of its step: a 3 s job in a 60 s step is not at 1/20 power.
    pts = [SeriesPoint(60.0, 95.0, cpu_uj=10_000_000)]
    assert power_w(pts, first_seen=85.0) == [pytest.approx(1.0)]
    pts = [SeriesPoint(0.0, 60.0, cpu_uj=60_000_000), SeriesPoint(60.0, 120.0, cpu_uj=120_000_000)]
    assert power_w(pts, first_seen=0.0) == [pytest.approx(1.0), pytest.approx(2.0)]


def test_merge_rows_provenance_and_state():
    base = dict(cluster="c", job_id="1", kind="slurm", first_seen=0.0, last_seen=10.0)
    a = JobRow(node="a", state="ended", end_time=10.0, cpu_uj=10, provenance={"cpu": "measured: RAPL"},
               **base)
    b = JobRow(node="b", state="running", cpu_uj=30, provenance={"cpu": "modelled: TDP"}, **base)
    m = merge_rows([a, b])
    assert m.state == "running" and m.end_time is None and m.cpu_uj == 40
    assert m.provenance["cpu"] == "measured: RAPL | modelled: TDP"
    assert how_obtained(m) == "mixed"


def test_equivalents_and_advice():
    eq = {e.quantity: e for e in equivalents(1081.0, 0.25, 4186 * 80 * 3)}
    assert eq["carbon"].text == "driving 10 km in an average new car" and "EEA" in eq["carbon"].source
    assert eq["water"].text == "0.5 bottles of 0.5 L"
    assert eq["energy"].text == "boiling 3 L of water in a kettle"
    assert "showers" in {e.quantity: e for e in equivalents(0, 120.0, 0)}["water"].text
    # A short run: every figure in a unit where its number means something, never "< 0.01".
    small = {e.quantity: e.text for e in equivalents(0.001, 0.000928, 1380.0)}
    assert small == {"carbon": "driving 9.3 mm in an average new car", "water": "928 µL: 19 drops",
                     "energy": "boiling 4.12 mL of water in a kettle"}
    tiny = {e.quantity: e.text for e in equivalents(1e-7, 1e-8, 0.5)}
    assert tiny["carbon"] == "driving 0.93 µm in an average new car"
    assert tiny["water"] == "10 nL: less than a drop"
    assert tiny["energy"] == "boiling 1.49 µL of water in a kettle"
    assert {e.quantity: e.text for e in equivalents(5, 0.02, 0)}["water"] == "20 mL: 4 teaspoons"
    assert {e.quantity: e.text for e in equivalents(0, 0.5, 0)}["water"] == "1 bottle of 0.5 L"
    assert all("< 0.01" not in e.text for x in (1e-9, 1e-5, 0.003)
               for e in equivalents(x, x, x * 1000))
    row = JobRow(cluster="c", job_id="1", node="n", kind="slurm", state="ended", first_seen=0.0,
                 last_seen=3600.0, end_time=3600.0, alloc_cpus=16, cpu_time_ns=int(2 * 3600e9),
                 alloc_mem_bytes=64 * GIB, max_mem_bytes=4 * GIB,
                 provenance={"memory": "modelled: 0.3725 W/GB"})
    cpu, mem = right_sizing(row, 3600.0)
    assert "2.0 of the 16 allocated CPUs" in cpu and "Asking for 3" in cpu
    assert "peak 4.0 GiB of 64 GiB" in mem and "about 5.0 GiB" in mem and "amount requested" in mem
    row.alloc_cpus, row.alloc_mem_bytes = 2, 5 * GIB
    assert right_sizing(row, 3600.0) == []
    row.kind = "command"  # a `greend measure` run asked for nothing
    row.alloc_cpus = 16
    assert right_sizing(row, 3600.0) == []


def test_outcome_of_a_job():
    from greend.tui.outcome import STALE_S, shown

    base = dict(cluster="c", job_id="1", node="n", kind="command", first_seen=0.0, last_seen=10.0)

    def ended(**kw) -> JobRow:
        return JobRow(state="ended", end_time=10.0, **base, **kw)

    assert (outcome_of(ended(exit_code=0)), shown(ended(exit_code=0), 20).short) == ("ok", "ok")
    assert (outcome_of(ended(exit_code=3)), shown(ended(exit_code=3), 20).short) == ("failed", "exit 3")
    assert shown(ended(exit_code=130), 20).long == "failed: exit 130 (killed by SIGINT)"
    assert shown(ended(exit_code=137), 20).long == "failed: exit 137 (killed by SIGKILL)"
    assert outcome_of(ended()) is None and shown(ended(), 20).short == "ended ?"
    for st, out in (("FAILED", "failed"), ("TIMEOUT", "failed"), ("CANCELLED by 1000", "failed"),
                    ("OUT_OF_MEMORY", "failed"), ("COMPLETED", "ok"), ("RUNNING", None)):
        assert outcome_of(ended(meta={"slurm_state": st})) == out, st
    assert shown(ended(meta={"slurm_state": "TIMEOUT"}), 20).short == "TIMEOUT"
    running = JobRow(state="running", exit_code=None, **base)
    assert outcome_of(running) is None and shown(running, 20).short == "running"
    assert shown(running, 10 + STALE_S + 1).short.startswith("seen ")


def test_outcome_filter_in_sql_and_in_memory(api, ledger_path):
    led, http = source(ledger_path), SocketSource(api.socket_path)
    for src in (led, http):
        failed = src.jobs(JobQuery(outcome="failed"), NOW)
        assert sorted(j.job_id for j in failed.jobs) == ["811021", "811070", "811119", "812401"]
        assert all(outcome_of(j) == "failed" for j in failed.jobs)
        ok = src.jobs(JobQuery(outcome="ok", limit=1000), NOW)
        assert ok.total == 21 and all(outcome_of(j) == "ok" for j in ok.jobs)
        assert "812402" in {j.job_id for j in ok.jobs}  # Slurm said COMPLETED
        assert src.jobs(JobQuery(), NOW).total == 28 == failed.total + ok.total + 3  # 2 running, 1 unknown
        assert src.jobs(JobQuery(user="alice", outcome="failed", since=NOW - D30), NOW).total == 2


def test_plural():
    from greend.tui.words import plural

    assert (plural(1, "cluster"), plural(0, "cluster"), plural(1204, "job")) == (
        "1 cluster", "0 clusters", "1,204 jobs")


def test_power_chart_of_short_and_uneven_series(utc):
    from greend.tui.job import power_caption
    from greend.tui.plot import by_time, power_spans

    # A 1.6 s run stored at a 0.5 s step: four points, the last one short.
    pts = [SeriesPoint(100.0 + 0.5 * i, min(101.6, 100.5 + 0.5 * i), cpu_uj=5_000_000) for i in range(4)]
    d = JobDetail(JobRow(cluster="c", job_id="1", node="n", kind="command", state="ended",
                         first_seen=100.0, last_seen=101.6, end_time=101.6), [], pts, [])
    watts, spans = power_w(pts, 100.0), power_spans(pts, 100.0)
    assert spans[-1] == (pytest.approx(101.5), pytest.approx(101.6)) and watts[-1] == pytest.approx(50.0)
    cap = power_caption(d, watts, spans).plain
    assert "4 points, step 0.5 s, over 1.6 s" in cap and "peak 50 W" in cap
    assert "mean 12.5 W" in cap  # 20 J over 1.6 s, not the mean of the four points
    lines = PowerPlot(watts, spans[0][0], spans[-1][1], height=2, spans=spans).lines(26)
    assert lines[-1].strip().endswith("+1.6 s")  # a span of seconds is labelled in seconds
    # The short last point keeps its width: 1/16 of the chart, not a quarter.
    top = lines[0].split("┤")[1]
    assert len(top) == 20 and top.strip() == "█" and top.endswith("█") and top[-3] == " "
    # One point: said in words, no chart.
    one = JobDetail(d.job, [], pts[:1], [])
    assert "one point, too few for a chart" in power_caption(one, watts[:1], spans[:1]).plain
    # Uneven steps: a 1 s point at 100 W then a 60 s one at 10 W, placed by time; a gap stays empty.
    cols = by_time([(0.0, 1.0, 100.0), (1.0, 61.0, 10.0)], 0.0, 61.0, 61)
    assert cols[0] == pytest.approx(100.0) and cols[1:] == [pytest.approx(10.0)] * 60
    assert by_time([(0.0, 1.0, 5.0), (3.0, 4.0, 5.0)], 0.0, 4.0, 4) == [5.0, None, None, 5.0]


def test_power_plot_starts_at_zero():
    lines = PowerPlot([100.0, 100.0, 200.0, 200.0], 0.0, 3600.0, height=2).lines(20)
    assert lines[0].startswith("200 W ┤") and lines[1].startswith("  0 W ┤")
    bars = [line.split("┤")[1] for line in lines[:2]]
    assert bars[1].strip() and set(bars[1]) == {"█"}  # 100 W fills the lower half: not drawn as zero
    assert resample([1.0, 3.0, 5.0, 7.0], 2) == [2.0, 6.0]
    assert resample([1.0, 2.0], 4) == [1.0, 1.0, 2.0, 2.0]
    assert short_duration(86400 * 3 + 7200) == "3d 02h" and short_duration(5) == "5 s"


# -- the HTTP sources, against a fake of the specified API ---------------------------------------
@pytest.fixture
def api(ledger_path, tmp_path):
    server = ApiServer(ledger_path, tmp_path / "api.sock").start()
    yield server
    server.stop()


def test_socket_source_matches_ledger_source(api, ledger_path):
    http, led = SocketSource(api.socket_path), source(ledger_path)
    for q in (JobQuery(user="alice", since=NOW - D30), JobQuery(sort="carbon"), JobQuery(search="unet"),
              JobQuery(user="alice", state="ended", limit=5, offset=5)):
        a, b = http.jobs(q, NOW), led.jobs(q, NOW)
        assert (a.total, a.running) == (b.total, b.running)
        assert [(j.job_id, j.it_energy_uj) for j in a.jobs] == [(j.job_id, j.it_energy_uj) for j in b.jobs]
    a, b = http.job("site", "812345"), led.job("site", "812345")
    assert a.job.it_energy_uj == b.job.it_energy_uj and a.job.node == b.job.node
    assert [p.energy_uj for p in a.series] == [p.energy_uj for p in b.series]
    assert a.factors[0]["sources"] == b.factors[0]["sources"]
    assert http.job("site", "nope") is None
    assert {c.name for c in http.clusters(NOW)} == {"oldlab", "site", "national"}
    s = http.summary(NOW - D30, None, "account")
    assert s.rows[0].key == "imaging" and s.unattributed_share == pytest.approx(0.1240, abs=1e-3)


def test_http_paging_is_followed(api):
    src = SocketSource(api.socket_path)
    src.page_rows = 7  # the source must follow next_offset until the end
    assert src.jobs(JobQuery(user="alice"), NOW).total == 24


def test_url_source(ledger_path):
    server = ApiServer(ledger_path).start()
    try:
        src = UrlSource(f"http://127.0.0.1:{server.port}/")
        assert src.jobs(JobQuery(user="alice", state="running"), NOW).jobs[0].job_id == "812345"
        with pytest.raises(SourceError, match="HTTP 404"):
            UrlSource(f"http://127.0.0.1:{server.port}/elsewhere").clusters(NOW)
    finally:
        server.stop()
    with pytest.raises(SourceError, match="connection refused"):
        src.jobs(JobQuery(), NOW)
    with pytest.raises(SourceError, match="expected an http"):
        UrlSource("ftp://host/")


def test_against_greends_own_api(ledger_path, tmp_path):
    """The client against the API server the daemon and the controller run (greend.http)."""
    from greend.api import Api
    from greend.http import serve

    class Host:
        cfg = config()
        ledger_path = None
        socket_path = None
        node = "site-n1"
        token = None
        max_body = 1 << 20
        routes: dict = {}  # noqa: RUF012

        def health(self) -> dict:
            return {"ok": True}

        def metric_collectors(self) -> list:
            return []

    host = Host()
    host.ledger_path, host.socket_path = ledger_path, tmp_path / "api.sock"
    server = serve(Api(host), ("127.0.0.1", 0), host.socket_path)
    try:
        port = server.port
        led = source(ledger_path)
        for src in (SocketSource(host.socket_path), UrlSource(f"http://127.0.0.1:{port}")):
            for q in (JobQuery(user="alice", since=NOW - D30), JobQuery(sort="water", limit=5)):
                a, b = src.jobs(q, NOW), led.jobs(q, NOW)
                assert [(j.job_id, j.it_energy_uj) for j in a.jobs] == [
                    (j.job_id, j.it_energy_uj) for j in b.jobs]
            d = src.job("site", "812345")
            assert d.job.it_energy_uj == led.job("site", "812345").job.it_energy_uj
            assert len(d.series) == 30 and d.factors
            assert src.job("site", "nope") is None
            assert {c.name for c in src.clusters(NOW)} == {"oldlab", "site", "national"}
            s = src.summary(NOW - D30, None, "account")
            assert s.rows[0].key == "imaging" and s.unattributed_share == pytest.approx(0.124, abs=1e-3)
    finally:
        server.close()


def test_socket_errors_are_phrased(tmp_path):
    with pytest.raises(SourceError, match="no such socket"):
        SocketSource(tmp_path / "missing.sock").jobs(JobQuery(), NOW)


# -- the app, driven by Pilot -----------------------------------------------------------------
def pilot_test(fn):
    """Run an async Pilot scenario as a plain test (no asyncio plugin needed)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return run


def make_app(src, user: str | None = "alice", **kw) -> GreendApp:
    return GreendApp(src, user=user, me="alice", clock=lambda: NOW, refresh_s=kw.pop("refresh_s", 0), **kw)


async def settle(app, pilot) -> None:
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


async def press(app, pilot, *keys: str) -> None:
    for k in keys:
        await pilot.press(k)
        await settle(app, pilot)


def table_lines(app) -> list[str]:
    t = app.screen.query_one(DataTable)
    return [str(t.get_row_at(i)[0]) for i in range(t.row_count)]


def status(app) -> str:
    return text_of(app.screen.query_one("#status", Static))


@pilot_test
async def test_navigation_between_screens(ledger_path, utc):
    app = make_app(source(ledger_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, JobsScreen)
        assert "train-u…" in table_lines(app)[0] and "Jobs 1–21 of 21" in status(app)
        await press(app, pilot, "2")
        assert isinstance(app.screen, ClustersScreen)
        assert [str(r[0]).strip() for r in map(app.screen.query_one(DataTable).get_row_at, range(3))] == [
            "oldlab", "site", "national"]
        await press(app, pilot, "down")
        assert "cooling tower meters 2025" in text_of(app.screen.query_one("#sources", Static))
        await press(app, pilot, "3")
        assert "imaging" in str(app.screen.query_one(DataTable).get_row_at(0)[1])
        await press(app, pilot, "b")
        users = {str(app.screen.query_one(DataTable).get_row_at(i)[1]) for i in range(3)}
        assert users == {"alice", "bob", "carol"}
        await press(app, pilot, "question_mark")
        assert isinstance(app.screen, HelpScreen)
        await press(app, pilot, "escape")
        await press(app, pilot, "1")
        assert isinstance(app.screen, JobsScreen)
        await press(app, pilot, "question_mark")
        assert isinstance(app.screen, HelpScreen)
        await press(app, pilot, "question_mark")
        assert isinstance(app.screen, JobsScreen)
        await pilot.press("q")
    assert app.return_code == 0


@pilot_test
async def test_sort_filter_search_period_keys(ledger_path, utc):
    app = make_app(source(ledger_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "f")  # running only
        assert len(table_lines(app)) == 1 and "running only" in text_of(app.screen.query_one("#filters"))
        await press(app, pilot, "f", "f")  # ended, then all again
        await press(app, pilot, "s")  # by energy, biggest first
        assert "4410021" in table_lines(app)[0]
        assert "by energy ↓" in text_of(app.screen.query_one("#filters"))
        await press(app, pilot, "S")
        assert "4410021" in table_lines(app)[-1]
        await press(app, pilot, "slash")
        await pilot.press(*"preprocess", "enter")
        await settle(app, pilot)
        assert len(table_lines(app)) == 1 and "preproc" in table_lines(app)[0]
        assert app.screen.search == "preprocess"
        await press(app, pilot, "escape")
        assert app.screen.search == "" and len(table_lines(app)) == 21
        await press(app, pilot, "t", "t", "t")  # 30 days -> 365 days -> all time -> 24 h
        assert "last 24 h" in text_of(app.screen.query_one("#filters"))
        assert len(table_lines(app)) == 2
        await press(app, pilot, "c")  # first cluster
        assert "national" in text_of(app.screen.query_one("#filters"))
        await press(app, pilot, "c", "c", "c")  # national -> oldlab -> site -> all
        assert "all clusters" in text_of(app.screen.query_one("#filters"))
        await press(app, pilot, "u")  # everyone's jobs
        assert "Everyone's jobs" in text_of(app.screen.query_one("#filters"))
        assert any("bob" in line for line in table_lines(app))


def header(app) -> str:
    return text_of(app.screen.query_one("#header", Static))


@pilot_test
async def test_a_key_per_sort_column_and_the_arrow_in_the_header(ledger_path, utc):
    app = make_app(source(ledger_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert "↓" not in header(app) and "↑" not in header(app)  # most recent: no column at 80
        await press(app, pilot, "E")
        assert "Energy↓" in header(app) and "4410021" in table_lines(app)[0]
        await press(app, pilot, "E")  # the same key again: smallest first
        assert "Energy↑" in header(app) and "4410021" in table_lines(app)[-1]
        assert "by energy ↑" in text_of(app.screen.query_one("#filters"))
        await press(app, pilot, "N")
        assert "Name↑" in header(app) and "Energy" in header(app) and "Energy↑" not in header(app)
        names = [app.screen.page.jobs[i].name for i in range(len(table_lines(app)))]
        assert names == sorted(names, key=str.lower)
        await press(app, pilot, "N")
        assert "Name↓" in header(app)
        await press(app, pilot, "D")
        assert "Elapsed↓" in header(app) and "4410021" in table_lines(app)[0]
        for key, label in (("C", "CO2e↓"), ("W", "Water↓"), ("J", "Job↑")):
            await press(app, pilot, key)
            assert label in header(app), (key, header(app))
        await press(app, pilot, "R")
        assert "↓" not in header(app) and "by most recent ↓" in text_of(app.screen.query_one("#filters"))
        # The header's columns sit over the rows' columns.
        assert "3.26 kWh" in table_lines(app)[0]  # right-aligned under its label
        assert header(app).index("Energy") + 6 == table_lines(app)[0].index("3.26 kWh") + 8
    async with make_app(source(ledger_path)).run_test(size=(160, 48)) as pilot:
        app = pilot.app
        await settle(app, pilot)
        assert "Last seen↓" in header(app)  # wide: most recent has its column
        await press(app, pilot, "C")
        assert "Carbon↓" in header(app)


@pilot_test
async def test_outcome_column_and_filter(ledger_path, utc):
    app = make_app(source(ledger_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        lines = table_lines(app)
        assert "running" in lines[0] and sum("exit 1" in x for x in lines) == 2
        await press(app, pilot, "o")  # failed only
        assert "failed only" in text_of(app.screen.query_one("#filters"))
        lines = table_lines(app)
        assert len(lines) == 2 and all("exit 1" in x for x in lines)
        cell = app.screen.query_one(DataTable).get_row_at(0)[0]  # said in words, and in red
        assert [(str(sp.style), cell.plain[sp.start:sp.end].strip()) for sp in cell.spans] == [
            ("bold red", "exit 1")]
        await press(app, pilot, "o")  # ok only
        lines = table_lines(app)
        assert len(lines) == 18 and all(" ok " in x for x in lines)
        await press(app, pilot, "o", "u")  # any outcome, everyone's jobs
        lines = table_lines(app)
        assert any("TIMEOUT" in x for x in lines) and any("ended ?" in x for x in lines)
        await press(app, pilot, "o")
        assert {x.split()[1] for x in table_lines(app)} == {"alice", "carol"}
    async with make_app(source(ledger_path)).run_test(size=(120, 40)) as pilot:
        app = pilot.app
        await settle(app, pilot)
        for _ in range(3):
            await press(app, pilot, "down")
        await press(app, pilot, "enter")  # an ended job: its outcome in its title
        assert "ok: exit 0" in text_of(app.screen.query_one("#title", Static))


@pilot_test
async def test_totals_line_of_the_period(ledger_path, utc):
    from greend import units

    app = make_app(source(ledger_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        mine = source(ledger_path).jobs(JobQuery(user="alice", since=NOW - D30, limit=1000), NOW).jobs
        energy = units.energy(sum(j.it_energy_uj for j in mine) / 1e6)
        carbon = units.carbon(sum(j.carbon_g for j in mine))
        totals = text_of(app.screen.query_one("#totals", Static))
        water = units.water(sum(j.water_site_l + j.water_offsite_l for j in mine))
        assert totals.strip() == f"Totals of your last 30 days: 21 jobs · {energy} · {carbon} · {water}"
        await press(app, pilot, "o")  # the table filtered: the totals stay those of the period
        assert text_of(app.screen.query_one("#totals", Static)) == totals
        await press(app, pilot, "t", "t", "t")  # 24 h
        totals = text_of(app.screen.query_one("#totals", Static))
        assert totals.startswith("Totals of your last 24 h: 2 jobs")
        await press(app, pilot, "u")
        totals = text_of(app.screen.query_one("#totals", Static))
        assert totals.startswith("Totals of everyone's last 24 h: 4 jobs")
    app = make_app(source(ledger_path), user="bob")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        totals = text_of(app.screen.query_one("#totals", Static))
        assert totals.startswith("Totals of bob's last 30 days: 2 jobs")


@pilot_test
async def test_one_cluster_is_not_clusters(tmp_path, utc):
    from greend import config as config_mod

    data = {"cluster": "site", "clusters": {"site": fx.CONFIG["clusters"]["site"]}}
    src = LedgerSource(tmp_path / "none.sqlite", config_mod.parse(data), label="ledger")
    app = make_app(src)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "2")
        assert status(app).startswith("1 cluster, 1 open")


@pilot_test
async def test_title_and_key_lines_follow_the_screen(ledger_path, utc):
    from greend.tui.keybar import KeyBar, TitleBar

    app = make_app(source(ledger_path))
    async with app.run_test(size=(120, 30)) as pilot:
        await settle(app, pilot)

        def bars() -> tuple[str, str]:
            return (text_of(app.screen.query_one(TitleBar)).strip(),
                    text_of(app.screen.query_one(KeyBar)).strip())

        title, keys = bars()
        assert title == "greend — My jobs · ledger fixture.sqlite"
        assert keys.startswith("/ Search  s Sort  f State  o Outcome") and "q Quit" in keys
        await press(app, pilot, "2")
        assert bars() == ("greend — Clusters · ledger fixture.sqlite",
                          "r Refresh  1 Jobs  3 Accounts  q Quit  ? Help")
        await press(app, pilot, "question_mark")  # q and ? close the help: they are not "Quit"
        assert text_of(app.screen.query_one(KeyBar)).strip() == "esc Close"


@pilot_test
async def test_paging_keys(ledger_path, utc):
    app = make_app(source(ledger_path), page_size=10)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        first = table_lines(app)
        assert "Jobs 1–10 of 21" in status(app) and "n/p: pages" in status(app)
        await press(app, pilot, "n")
        assert "Jobs 11–20 of 21" in status(app) and table_lines(app) != first
        await press(app, pilot, "n", "n")  # no page after the last
        assert "Jobs 21–21 of 21" in status(app)
        await press(app, pilot, "p", "p", "p", "p")
        assert table_lines(app) == first


@pilot_test
async def test_open_a_job_and_come_back(ledger_path, utc):
    app = make_app(source(ledger_path))
    async with app.run_test(size=(120, 50)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "down", "down", "enter")
        assert isinstance(app.screen, JobScreen) and app.screen.job_id == "812300"
        text = {w: text_of(app.screen.query_one(f"#{w}", Static)) for w in
                ("title", "energy", "footprint", "everyday", "decision", "advice", "power")}
        assert "preprocess-cohort" in text["title"]
        assert "modelled: 0.3725 W/GB" in text["energy"] and "67% measured" in text["energy"]
        assert "site energy audit 2025" in text["footprint"]
        assert "average new car" in text["everyday"]
        assert "HDS-certified" in text["decision"]
        assert "Right-sizing" in text["advice"] and "32 allocated CPUs" in text["advice"]
        assert "143 W ┤" in text["power"]
        await press(app, pilot, "escape")
        assert isinstance(app.screen, JobsScreen)
        await press(app, pilot, "up", "up", "enter")
        assert app.screen.job_id == "812345"
        assert not app.screen.query_one("#advice").display  # running: no advice yet
        assert not app.screen.query_one("#decision").display  # no decision recorded
        await press(app, pilot, "1")  # the jobs key also leaves a job
        assert isinstance(app.screen, JobsScreen)


def _bump(path: Path, job_id: str, energy_uj: int) -> None:
    ledger = Ledger(path)
    with ledger.transaction() as db:
        db.execute("UPDATE jobs SET gpu_uj = gpu_uj + ?, last_seen = last_seen + 60 "
                   "WHERE job_id = ? AND node = 'site-n1'",
                   (energy_uj, job_id))
    ledger.close()


@pilot_test
async def test_refresh_shows_new_figures(ledger_path, utc):
    app = make_app(source(ledger_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert "3.26 kWh" in table_lines(app)[0]
        _bump(ledger_path, "812345", 10 * 3_600_000_000_000)
        await press(app, pilot, "r")
        assert "13.3 kWh" in table_lines(app)[0]
        await press(app, pilot, "enter")
        _bump(ledger_path, "812345", 10 * 3_600_000_000_000)
        await press(app, pilot, "r")
        assert "23.3 kWh" in text_of(app.screen.query_one("#energy", Static))


@pilot_test
async def test_live_refresh_without_a_key(ledger_path, utc):
    app = make_app(source(ledger_path), refresh_s=0.2)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        _bump(ledger_path, "812345", 10 * 3_600_000_000_000)
        for _ in range(200):  # a 0.2 s refresh; up to 10 s on a loaded machine
            await pilot.pause(0.05)
            if "13.3 kWh" in table_lines(app)[0]:
                break
        assert "13.3 kWh" in table_lines(app)[0]


@pilot_test
async def test_lost_connection_then_retry(api, utc):
    app = make_app(SocketSource(api.socket_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert len(table_lines(app)) == 21
        api.stop()
        await press(app, pilot, "r")
        msg = status(app)
        assert "no such socket" in msg and "Press r to retry" in msg and "showing data from 12:00:00" in msg
        assert len(table_lines(app)) == 21  # what was there stays
        await press(app, pilot, "enter")
        assert "Press r to retry" in status(app)
        await press(app, pilot, "escape", "2")
        assert "Press r to retry" in status(app)
        await press(app, pilot, "3")
        assert "Press r to retry" in status(app)
        api.start()
        await press(app, pilot, "r")
        assert "accounts" in status(app) and "Press r" not in status(app)
        await press(app, pilot, "1", "r")
        assert "Jobs 1–21 of 21" in status(app)


@pilot_test
async def test_missing_ledger_is_shown_not_raised(tmp_path, utc):
    app = make_app(source(tmp_path / "none.sqlite"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert "no ledger here" in status(app) and "Press r to retry" in status(app)
        build_ledger(tmp_path / "none.sqlite")
        await press(app, pilot, "r")
        assert "Jobs 1–21 of 21" in status(app)


@pilot_test
async def test_no_color(ledger_path, monkeypatch, utc):
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app(source(ledger_path))
    assert app.no_color  # Textual reads NO_COLOR when the app is made
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert any(type(f).__name__ in ("Monochrome", "NoColor") for f in app._filters)
        # Nothing is said by colour alone: states, provenance and errors are words.
        assert "run" in table_lines(app)[0] and "meas" in table_lines(app)[0]
        assert colourful(app.export_screenshot()) == set()


def colourful(svg: str) -> set[str]:
    """The colours of a screenshot that are not greys (the window's three buttons left out)."""
    out = set()
    for c in set(re.findall(r"#([0-9a-f]{6})", svg)) - {"ff5f57", "febc2e", "28c840"}:
        rgb = [int(c[i:i + 2], 16) for i in (0, 2, 4)]
        if max(rgb) - min(rgb) > 8:
            out.add(c)
    return out


@pilot_test
async def test_colour_without_no_color(ledger_path, monkeypatch, utc):
    monkeypatch.delenv("NO_COLOR", raising=False)
    app = make_app(source(ledger_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert colourful(app.export_screenshot())  # so the test above can fail


# -- the command line ---------------------------------------------------------------------------
def test_cli_registers_tui_and_picks_a_source(tmp_path, monkeypatch):
    from greend.cli import _load_config, build_parser

    monkeypatch.setenv("GREEND_STATE_DIR", str(tmp_path))
    from greend import httpclient

    monkeypatch.setattr(httpclient, "RUN_DIR", tmp_path / "nothing-here")
    args = build_parser().parse_args(["tui"])
    assert args.func is tui_cli.cmd_tui and args.refresh is None  # 2 s, 5 s with --url (cmd_tui)
    cfg = _load_config(args)
    src = tui_cli.make_source(args, cfg)
    assert isinstance(src, LedgerSource) and src.path == tmp_path / "ledger.sqlite"
    server = ApiServer(build_ledger(tmp_path / "x.sqlite"), tmp_path / "api.sock").start()
    try:
        assert isinstance(tui_cli.make_source(args, cfg), SocketSource)  # the daemon's, when present
    finally:
        server.stop()
    for argv, cls in ((["tui", "--url", "http://h:1"], UrlSource), (["tui", "--socket", "/s"], SocketSource),
                      (["tui", "--ledger", "/l"], LedgerSource)):
        assert isinstance(tui_cli.make_source(build_parser().parse_args(argv), cfg), cls)
    lazy = tui_cli.make_source(build_parser().parse_args(["tui", "--ledger", "/l"]))
    assert lazy.cfg is None and {c.name for c in lazy.clusters(NOW)} == {"local"}  # loaded when asked
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tui", "--ledger", "a", "--url", "b"])
    out = subprocess.run([sys.executable, "-m", "greend.cli", "tui", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--all-users" in out and "--ledger FILE" in out


# -- a ledger written by a real `greend measure` run --------------------------------------------
@pytest.mark.slow
@pilot_test
async def test_a_real_measure_run_appears(tmp_path, utc):
    greend = REPO / ".venv" / "bin" / "greend"
    exe = str(greend) if greend.exists() else None
    cmd = [exe] if exe else [sys.executable, "-m", "greend.cli"]
    work = "import time\nt = time.time()\nwhile time.time() - t < 2.5: sum(range(10000))\n"
    env = {**os.environ, "GREEND_STATE_DIR": str(tmp_path)}
    subprocess.run([*cmd, "--state-dir", str(tmp_path), "measure", "--interval", "0.5", "-q", "--",
                    sys.executable, "-c", work], check=True, env=env, timeout=120)
    ledger = Ledger(tmp_path / "ledger.sqlite", readonly=True)
    (row,) = ledger.jobs()
    ledger.close()
    assert row.it_energy_uj > 0
    import time

    app = GreendApp(LedgerSource(tmp_path / "ledger.sqlite"), user=row.user, refresh_s=0, clock=time.time)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        (line,) = table_lines(app)
        assert row.job_id in line and sys.executable.rsplit("/", 1)[-1][:8] in line
        from greend import units

        assert units.energy(row.it_energy_uj / 1e6) in line
        await press(app, pilot, "enter")
        energy = text_of(app.screen.query_one("#energy", Static))
        assert "CPU" in energy and ("measured" in energy or "modelled" in energy)
        assert "Power" in text_of(app.screen.query_one("#power-caption", Static))


def test_budgets_of_the_configuration_show_in_the_accounts_summary(ledger_path):
    from greend import config as config_mod

    data = dict(fx.CONFIG)
    # The fixture's jobs ran in March of this year: a yearly budget counts them.
    data["policy"] = {"budgets": [{"account": "imaging", "period": "year", "carbon_kg": 0.05},
                                  {"account": "genomics", "period": "year", "water_l": 1e6}]}
    src = LedgerSource(ledger_path, config_mod.parse(data), label="ledger")
    if time.gmtime().tm_year != time.gmtime(NOW).tm_year:
        pytest.skip("the fixture's jobs are not in this year's budget period")
    rows = {r.key: r for r in src.summary(None, None, "account").rows}
    imaging = rows["imaging"]
    assert imaging.budget_label == "0.05 kgCO2e per year"
    # What it used this year, over its limit: the same figure greend_budget_used_ratio exports.
    used_kg = sum(r.carbon_g for r in src.jobs(JobQuery(account="imaging", limit=1000), NOW).jobs) / 1000
    assert imaging.budget_used == pytest.approx(used_kg / 0.05, rel=1e-6)
    assert rows["genomics"].budget_used < 0.01 and rows["genomics"].budget_label == "1e+06 L per year"
    assert all(r.budget_used is None for k, r in rows.items() if k not in ("imaging", "genomics"))
