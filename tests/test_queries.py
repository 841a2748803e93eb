"""The read model over the ledger (greend.queries) and budgets in the core (greend.budgets), against
the TUI's fixture ledger and ledgers written here; and the API's sort, order, q and outcome on a real
`greend run`, with the TUI's HTTP source reading through them."""

from __future__ import annotations

import math
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import test_tui_fixtures as fx
from daemonproc import Greend, token_file
from test_tui_fixtures import NOW, build_ledger, config

from greend import budgets, queries
from greend import config as config_mod
from greend.ledger import JobRow, Ledger
from greend.queries import JobQuery, QueryError

H = 3600.0


def Budget(**kw):
    """One [[policy.budgets]] entry, as the configuration parses it."""
    return config_mod.parse({"policy": {"budgets": [kw]}}).policy.budgets[0]


@pytest.fixture(scope="module")
def fixture_ledger(tmp_path_factory) -> Path:
    return build_ledger(tmp_path_factory.mktemp("queries") / "ledger.sqlite")


@pytest.fixture
def db(fixture_ledger):
    led = Ledger(fixture_ledger, readonly=True)
    yield led.db
    led.close()


def all_jobs(db) -> list[JobRow]:
    """Every job merged over its nodes, the slow and obvious way (the oracle for job_page)."""
    rows = [queries.job_row(dict(r)) for r in db.execute("SELECT * FROM jobs")]
    return queries.group_jobs(rows)


SORT_VALUE = {
    "recent": lambda r: r.last_seen,
    "energy": lambda r: r.it_energy_uj,
    "carbon": lambda r: r.carbon_g,
    "water": queries.water_l,
    "elapsed": lambda r: queries.elapsed_s(r, NOW),
    "job": lambda r: (r.cluster, len(r.job_id), r.job_id),
    "name": lambda r: r.name.lower(),
}


def key_of(r: JobRow) -> tuple:
    return queries.job_key(r)


# -- a page of jobs -----------------------------------------------------------------------------
@pytest.mark.parametrize("sort", queries.SORT_KEYS)
@pytest.mark.parametrize("descending", [True, False])
def test_every_sort_orders_all_jobs_and_pages_cover_them_once(db, sort, descending):
    everything = all_jobs(db)
    whole = queries.job_page(db, JobQuery(sort=sort, descending=descending, limit=1000), NOW)
    assert whole.total == len(everything) == 28 and whole.running == 2
    values = [SORT_VALUE[sort](r) for r in whole.jobs]
    assert values == sorted(values, reverse=descending)
    # Pages of 7, concatenated, are the whole list: no job twice, none lost between pages.
    paged = []
    for offset in range(0, whole.total, 7):
        page = queries.job_page(db, JobQuery(sort=sort, descending=descending, limit=7, offset=offset),
                                NOW)
        assert page.total == whole.total and page.offset == offset
        paged += page.jobs
    assert [key_of(r) for r in paged] == [key_of(r) for r in whole.jobs]
    assert {key_of(r) for r in paged} == {key_of(r) for r in everything}
    # Each job's figures are the sums over its nodes.
    by_key = {key_of(r): r for r in everything}
    assert all(r.it_energy_uj == by_key[key_of(r)].it_energy_uj for r in whole.jobs)


def test_filters_search_and_outcome(db):
    jp = queries.job_page
    everything = all_jobs(db)
    ok = jp(db, JobQuery(outcome="ok", limit=1000), NOW)
    failed = jp(db, JobQuery(outcome="failed", limit=1000), NOW)
    # The exit code first, then Slurm's final state (queries.outcome_of), the same in SQL.
    assert {queries.outcome_of(r) for r in ok.jobs} == {"ok"}
    assert {queries.outcome_of(r) for r in failed.jobs} == {"failed"}
    assert {r.exit_code for r in failed.jobs} == {1, None}  # exit 1, or TIMEOUT with no exit code
    assert {r.exit_code for r in ok.jobs} == {0, None}  # exit 0, or COMPLETED with no exit code
    assert ok.total == sum(1 for r in everything if queries.outcome_of(r) == "ok")
    assert failed.total == sum(1 for r in everything if queries.outcome_of(r) == "failed") >= 3
    unknown = [r for r in everything if queries.outcome_of(r) is None]
    assert unknown and ok.total + failed.total + len(unknown) == len(everything)  # neither
    assert jp(db, JobQuery(outcome="failed", user="alice", state="running"), NOW).total == 0
    assert [r.job_id for r in jp(db, JobQuery(kind="command"), NOW).jobs] == ["20260310-093000-4242"]
    (unet,) = jp(db, JobQuery(search="UNET"), NOW).jobs  # case-insensitive, any column
    assert unet.node == "site-n1,site-n2" and unet.state == "running"
    assert jp(db, JobQuery(search="analyse.py"), NOW).total == 1  # the command line
    assert jp(db, JobQuery(search="100%_"), NOW).total == 0  # LIKE wildcards are taken literally
    recent = jp(db, JobQuery(user="alice", since=NOW - 86400, state="ended"), NOW)
    assert recent.total == 1 and recent.jobs[0].job_id == "20260310-093000-4242"
    assert jp(db, JobQuery(until=NOW - 20 * 86400, limit=1000), NOW).total == sum(
        1 for r in everything if r.first_seen <= NOW - 20 * 86400)


def test_ties_are_broken_by_recency_cluster_and_job_id_in_sql_and_in_memory(tmp_path):
    from greend.tui.data import select_page

    led = Ledger(tmp_path / "ledger.sqlite")
    with led.transaction() as w:
        for cluster, job, last in (("b", "7", NOW), ("a", "9", NOW), ("b", "10", NOW - 5), ("a", "10", NOW),
                                   ("b", "1", NOW)):
            led.upsert_job(w, JobRow(cluster=cluster, job_id=job, node="n1", kind="slurm", state="ended",
                                     first_seen=NOW - 60, last_seen=last, cpu_uj=100))
    led.close()
    ro = Ledger(tmp_path / "ledger.sqlite", readonly=True)
    try:
        rows = [queries.job_row(dict(r)) for r in ro.db.execute("SELECT * FROM jobs")]
        for q in (JobQuery(sort="energy"), JobQuery(sort="energy", descending=False),
                  JobQuery(limit=2, offset=2)):
            page = queries.job_page(ro.db, q, NOW)
            assert [(r.cluster, r.job_id) for r in page.jobs] == [
                (r.cluster, r.job_id) for r in select_page(rows, q, NOW).jobs]
        page = queries.job_page(ro.db, JobQuery(sort="energy"), NOW)
        assert [(r.cluster, r.job_id) for r in page.jobs] == [
            ("a", "10"), ("a", "9"), ("b", "1"), ("b", "7"), ("b", "10")]
    finally:
        ro.close()


def test_records_are_listed_per_node(db):
    jobs = queries.job_page(db, JobQuery(limit=1000), NOW)
    recs = queries.job_page(db, JobQuery(limit=1000, per="record"), NOW)
    assert recs.total == jobs.total + 1  # the two-node job is two records
    assert recs.running == 3 and jobs.running == 2
    unet = [r for r in recs.jobs if r.job_id == "812345"]
    assert sorted(r.node for r in unet) == ["site-n1", "site-n2"] and all(r.pk for r in unet)
    last_seen = [r.last_seen for r in recs.jobs]
    assert last_seen == sorted(last_seen, reverse=True)  # newest first, as the API always listed
    by_energy = queries.job_page(db, JobQuery(per="record", sort="energy", descending=False, limit=5), NOW)
    e = [r.it_energy_uj for r in by_energy.jobs]
    assert e == sorted(e) and e[0] == min(r.it_energy_uj for r in recs.jobs)


@pytest.mark.parametrize(("query", "field"), [
    (JobQuery(sort="size"), "sort"), (JobQuery(outcome="maybe"), "outcome"),
    (JobQuery(state="sleeping"), "state"), (JobQuery(per="node"), "per"), (JobQuery(limit=0), "limit"),
])
def test_a_bad_query_names_its_field(db, query, field):
    with pytest.raises(QueryError, match=f"^{field}: expected"):
        queries.job_page(db, query, NOW)


# -- one job ------------------------------------------------------------------------------------
def test_job_detail_per_node_and_merged(db):
    d = queries.job_detail(db, "site", "812345")
    assert [n.node for n in d.nodes] == ["site-n1", "site-n2"]
    assert d.job.it_energy_uj == sum(n.it_energy_uj for n in d.nodes)
    assert [len(s) for s in d.node_series] == [30, 30] and len(d.series) == 30
    assert sum(p.energy_uj for p in d.series) == d.job.it_energy_uj
    assert sum(p.cpu_time_ns for p in d.series) == d.job.cpu_time_ns
    assert d.factors and d.node_factors[0][0]["sources"]["pue"] == "site energy audit 2025"
    assert d.decision is None
    assert queries.job_detail(db, "site", "812300").decision["outcome"] == "submitted"
    assert queries.job_detail(db, "site", "812345", user="bob") is None
    assert queries.job_detail(db, "site", "nope") is None


def test_a_reused_job_id_shows_its_latest_submission(fixture_ledger, tmp_path):
    path = tmp_path / "ledger.sqlite"
    shutil.copy(fixture_ledger, path)
    led = Ledger(path)
    with led.transaction() as w:
        led.upsert_job(w, JobRow(cluster="site", job_id="812300", node="site-n9", kind="slurm",
                                 state="ended", first_seen=NOW - H, last_seen=NOW - 60,
                                 submit_time=int(NOW - 2 * H), user="alice", cpu_uj=5))
    led.close()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        latest = queries.job_detail(ro, "site", "812300")
        assert [n.node for n in latest.nodes] == ["site-n9"] and latest.job.it_energy_uj == 5
        both = queries.job_detail(ro, "site", "812300", all_submissions=True)
        assert [n.node for n in both.nodes] == ["site-n3", "site-n9"] and both.job.it_energy_uj == 5
        assert len(both.node_series) == len(both.node_factors) == 2 and not both.node_series[1]
    finally:
        ro.close()


# -- clusters -----------------------------------------------------------------------------------
def test_clusters_take_live_load_from_the_provider(db, fixture_ledger):
    asked = []

    def live(cfg):
        asked.append(cfg)
        return {"site": {"ok": True, "load": 0.5, "pending": 3, "running": 7},
                "national": {"ok": False, "error": "slurmctld: connection refused"}}

    cfg = config()
    cl = {c.name: c for c in queries.clusters(cfg, NOW, db=db, live_load=live)}
    assert asked == [cfg]
    assert (cl["site"].load, cl["site"].queue, cl["site"].running) == (0.5, 3, 2)
    assert cl["national"].load is None and cl["national"].note == "slurmctld: connection refused"
    assert cl["oldlab"].live is None and cl["oldlab"].factors["pue"] == 1.8

    def down(cfg):
        raise RuntimeError("no slurm.conf")

    cl = queries.clusters(cfg, NOW, db=db, live_load=down)
    assert {c.note for c in cl} == {"load and queue unavailable: no slurm.conf"}
    # The TUI's ledger source passes its provider (the composition root's) on, and its ledger.
    from greend.tui import data as tui_data

    src = tui_data.LedgerSource(fixture_ledger, cfg, live_load=live)
    cl = {c.name: c for c in src.clusters(NOW)}
    assert (cl["site"].load, cl["site"].running) == (0.5, 2) and len(asked) == 2
    # Without a provider nor a ledger: the configuration alone.
    cl = queries.clusters(cfg, NOW)
    assert {c.name for c in cl} == {"oldlab", "site", "national"} and all(c.running is None for c in cl)


# -- summaries and budgets ----------------------------------------------------------------------
def test_summary_by_every_dimension(db):
    everything = all_jobs(db)
    for by in queries.SUMMARY_BY:
        s = queries.summary(db, by)
        assert sum(r.jobs for r in s.rows) >= len(everything)
        assert sum(r.it_energy_j for r in s.rows) == pytest.approx(
            sum(r.it_energy_uj for r in everything) / 1e6)
        carbon = [r.carbon_g for r in s.rows]
        assert carbon == sorted(carbon, reverse=True)
    # A job on two nodes counts once by account, once on each node by node.
    accounts = {r.key: r.jobs for r in queries.summary(db, "account").rows}
    assert accounts["imaging"] == sum(1 for r in everything if r.account == "imaging")
    nodes = {r.key: r.jobs for r in queries.summary(db, "node").rows}
    assert nodes["site-n1"] >= 1 and nodes["site-n2"] >= 1
    bob = queries.summary(db, "user", user="bob")
    assert [r.key for r in bob.rows] == ["bob"]
    by_energy = queries.summary(db, "user", order="energy", limit=2)
    assert len(by_energy.rows) == 2 and by_energy.rows[0].it_energy_j >= by_energy.rows[1].it_energy_j
    window = queries.summary(db, "account", NOW - 30 * 86400, NOW)
    assert window.unattributed_share == pytest.approx((30 * .06 + 26 * .08 + 12 * .21 + 9 * .35) / 77)
    with pytest.raises(QueryError, match=r"^by: expected account, user, cluster, node"):
        queries.summary(db, "partition; DROP TABLE jobs")


def test_period_starts_are_local_calendar_periods():
    t = time.mktime((2026, 5, 20, 15, 30, 0, 0, 0, -1))  # a Wednesday
    lt = lambda x: time.localtime(x)[:6]  # noqa: E731
    assert [lt(x) for x in budgets.period_start("day", t)] == [(2026, 5, 20, 0, 0, 0), (2026, 5, 21, 0, 0, 0)]
    assert [lt(x) for x in budgets.period_start("week", t)] == [(2026, 5, 18, 0, 0, 0),
                                                               (2026, 5, 25, 0, 0, 0)]
    assert [lt(x) for x in budgets.period_start("month", t)] == [(2026, 5, 1, 0, 0, 0), (2026, 6, 1, 0, 0, 0)]
    assert [lt(x) for x in budgets.period_start("quarter", t)] == [(2026, 4, 1, 0, 0, 0),
                                                                  (2026, 7, 1, 0, 0, 0)]
    assert [lt(x) for x in budgets.period_start("year", t)] == [(2026, 1, 1, 0, 0, 0), (2027, 1, 1, 0, 0, 0)]


def test_budget_status_counts_the_period_and_each_job_once(tmp_path):
    now = time.time()
    month, _ = budgets.period_start("month", now)
    led = Ledger(tmp_path / "ledger.sqlite")
    with led.transaction() as w:
        # Two nodes of one job this month, one job of last month, another account's job.
        for node in ("n1", "n2"):
            led.upsert_job(w, JobRow(cluster="c", job_id="1", node=node, kind="slurm", state="ended",
                                     first_seen=now - 120, last_seen=now - 60, account="proj",
                                     facility_j=1.8e6, carbon_g=150.0, water_site_l=1.0,
                                     water_offsite_l=2.0))
        led.upsert_job(w, JobRow(cluster="c", job_id="0", node="n1", kind="slurm", state="ended",
                                 first_seen=month - 7200, last_seen=month - 3600, account="proj",
                                 carbon_g=1e6))
        led.upsert_job(w, JobRow(cluster="c", job_id="2", node="n1", kind="slurm", state="ended",
                                 first_seen=now - 120, last_seen=now - 60, account="other", carbon_g=5.0))
    led.close()
    ro = Ledger(tmp_path / "ledger.sqlite", readonly=True)
    try:
        use = queries.account_usage(ro.db, "proj", month)
        assert (use.jobs, use.facility_energy_j, use.carbon_g, use.water_l) == (1, 3.6e6, 300.0, 6.0)
        st = budgets.budget_status(ro.db, [
            Budget(account="proj", period="month", energy_kwh=2.0, carbon_kg=0.2, water_l=12.0),
            Budget(account="other", period="month", carbon_kg=0.0),
            Budget(account="idle", period="month", carbon_kg=0.0),
        ], now)
    finally:
        ro.close()
    proj = st["proj"]
    assert proj["since"] == month and proj["used"] == {"energy": 1.0, "carbon": 0.3, "water": 6.0}
    assert proj["ratio"] == {"energy": 0.5, "carbon": pytest.approx(1.5), "water": 0.5}
    assert proj["max_ratio"] == pytest.approx(1.5) and budgets.label(proj) == "0.2 kgCO2e per month"
    assert math.isinf(st["other"]["max_ratio"]) and st["idle"]["max_ratio"] == 0.0
    j = budgets.to_json(st["other"])
    assert j["ratio"] == {"carbon": None} and j["max_ratio"] is None and j["exceeded"]
    assert not budgets.to_json(st["idle"])["exceeded"]


def test_add_budgets_says_why_they_are_missing(db):
    s = queries.summary(db, "account")
    budgets.add_budgets(db, s, [Budget(account="imaging", period="year", carbon_kg=1e9)], NOW)
    (imaging,) = [r for r in s.rows if r.key == "imaging"]
    assert imaging.budget["period"] == "year" and imaging.budget_label == "1e+09 kgCO2e per year"
    users = queries.summary(db, "user")
    budgets.add_budgets(db, users, [Budget(account="imaging", period="year", carbon_kg=1.0)], NOW)
    assert all(r.budget is None for r in users.rows)  # budgets are per account
    broken = sqlite3.connect(":memory:")
    s = queries.summary(db, "account")
    budgets.add_budgets(broken, s, [Budget(account="imaging", period="year", carbon_kg=1.0)], NOW)
    assert s.note.startswith("budgets unavailable: no such table: jobs")
    assert all(r.budget is None for r in s.rows)


# -- the API on a real daemon, and the TUI's HTTP source through it ------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory, fixture_ledger):
    """`greend controller` serving a copy of the fixture ledger: the read API of a node daemon, and
    no process scan that would add the jobs of whatever else runs on this machine."""
    home = tmp_path_factory.mktemp("api")
    (home / "state").mkdir()
    shutil.copy(fixture_ledger, home / "state" / "ledger.sqlite")
    clusters = {"local": {"tier": "local"}, **fx.CONFIG["clusters"]}
    g = Greend(home, command="controller", config={"cluster": "local", "clusters": clusters},
               args=["--socket", "", "--token-file", str(token_file(home / "token"))])
    g.start()
    yield g
    assert g.stop() == 0, g.log()


def test_api_sorts_searches_and_filters_jobs(daemon):
    st, d = daemon.get("/api/v1/jobs?per=job&sort=energy&order=desc&limit=5")
    assert st == 200 and d["per"] == "job" and (d["total"], d["running"]) == (28, 2) and d["next_offset"] == 5
    e = [j["energy_j"]["it"] for j in d["jobs"]]
    assert e == sorted(e, reverse=True) and d["jobs"][0]["job"]["job_id"] == "4410021"
    st, d = daemon.get("/api/v1/jobs?per=job&q=unet")
    assert [(j["job"]["job_id"], j["job"]["node"]) for j in d["jobs"]] == [("812345", "site-n1,site-n2")]
    assert d["total"] == 1 and d["running"] == 1 and d["next_offset"] is None
    st, d = daemon.get("/api/v1/jobs?per=job&outcome=failed&sort=name&order=asc&account=imaging")
    names = [j["job"]["name"] for j in d["jobs"]]
    assert d["total"] == 2 and names == sorted(names)
    assert {j["job"]["outcome"] for j in d["jobs"]} == {"failed"}
    # Records (the default, as before): one per node, newest first, paged to the end.
    seen, offset = [], 0
    while offset is not None:
        st, d = daemon.get(f"/api/v1/jobs?user=alice&limit=10&offset={offset}")
        seen += d["jobs"]
        offset = d["next_offset"]
    assert len(seen) == d["total"] == 25 and "per" in d and d["per"] == "record"
    last = [j["job"]["last_seen"] for j in seen]
    assert last == sorted(last, reverse=True)
    for query, word in (("sort=size", "sort"), ("order=sideways", "order"), ("outcome=maybe", "outcome"),
                        ("per=node", "per")):
        st, d = daemon.get(f"/api/v1/jobs?{query}")
        assert st == 400 and d["error"].startswith(("query parameter " + word, f"query parameter '{word}'"))


def test_api_job_clusters_and_summary_from_the_read_model(daemon):
    st, d = daemon.get("/api/v1/jobs/site/812345")
    assert st == 200 and [r["job"]["node"] for r in d["records"]] == ["site-n1", "site-n2"]
    assert all(len(r["series"]) == 30 and r["factors"] for r in d["records"])
    assert set(d["records"][0]["series"][0]) == {"t_start", "t_end", "cpu_uj", "dram_uj", "gpu_uj",
                                                  "memory_uj", "cpu_time_ns", "carbon_g", "water_site_l",
                                                  "water_offsite_l"}
    assert daemon.get("/api/v1/jobs/site/812300")[1]["records"][0]["decision"]["outcome"] == "submitted"
    st, d = daemon.get("/api/v1/clusters")
    site = d["clusters"]["site"]
    assert st == 200 and site["running"] == 2 and site["country"] == config().clusters["site"].country
    assert "live" not in site and "load" not in site  # no slurm.conf nor partitions: not reachable
    st, d = daemon.get(f"/api/v1/summary?by=account&since={NOW - 30 * 86400}")
    e = [r["it_energy_j"] for r in d["rows"]]
    assert st == 200 and e == sorted(e, reverse=True) and "note" in d


def test_the_tuis_api_source_pages_on_the_server(daemon, fixture_ledger):
    from greend.tui.data import LedgerSource, UrlSource

    calls = []

    class Counting(UrlSource):
        def _get(self, path, params=None):
            calls.append(params)
            return super()._get(path, params)

    api = Counting(f"http://127.0.0.1:{daemon.port}")
    led = LedgerSource(fixture_ledger, config())
    for q in (JobQuery(user="alice", since=NOW - 30 * 86400),
              JobQuery(sort="carbon", limit=5, cluster="site"), JobQuery(search="unet"),
              JobQuery(outcome="ok", sort="elapsed", descending=False, cluster="site"),
              JobQuery(user="alice", state="ended", sort="name", limit=5, offset=5)):
        calls.clear()
        a, b = api.jobs(q, NOW), led.jobs(q, NOW)
        assert len(calls) == 1 and calls[0]["limit"] == q.limit  # one page asked, not every record
        assert (a.total, a.running) == (b.total, b.running)
        assert [(j.job_id, j.it_energy_uj, j.node) for j in a.jobs] == [
            (j.job_id, j.it_energy_uj, j.node) for j in b.jobs]
    # A page larger than the API's largest comes in several requests.
    api.max_limit = 4
    calls.clear()
    q = JobQuery(limit=10, cluster="site", sort="energy")
    page = api.jobs(q, NOW)
    assert len(calls) == 3 and [j.job_id for j in page.jobs] == [j.job_id for j in led.jobs(q, NOW).jobs]
    assert len(page.jobs) == 10
