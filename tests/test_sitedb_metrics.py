"""What a controller on a database server reads besides the API (docs/site-mode.md, "Reads on a
server database"): the route and budget metrics of /metrics, and the policy engine's history
behind POST /api/v1/route, come from the server's records, as on SQLite."""

from __future__ import annotations

import json
import re
import time
import tomllib

import pytest
from daemonproc import request as http
from daemonproc import token_file
from test_policies import _toml
from test_route_api import config_text
from test_sitedb import FACTORS, TOKEN, controller, rec
from test_sitedb_reads import NOW, _job, send, site_controller

pytest.importorskip("sqlalchemy", reason="greend[sitedb] is not installed")
pytest_plugins = ["sitedb_servers"]

FAMILIES = ("greend_route_decisions_total", "greend_route_overflow_total", "greend_budget_used_ratio")
AGENT = {"cluster": "c1", "node": "n1", "version": "test"}


def _decision(token: str, *, outcome: str = "submitted", cluster: str | None = "c1",
              tier: str | None = "site", candidates=None) -> dict:
    d = {"token": token, "t": 5.0, "user": "alice", "uid": 1001, "outcome": outcome,
         "cluster": cluster, "tier": tier, "job_id": token.removeprefix("tok-"),
         "decision": {"chosen": cluster, "why": "greener"}}
    if candidates is not None:
        d["decision"]["candidates"] = candidates
    return d


def _cand(tier: str | None, rejected_by: str | None = None, held_by=()) -> dict:
    return {"cluster": f"x-{tier}", "tier": tier, "rejected_by": rejected_by, "held_by": list(held_by)}


DECISIONS = [
    # Overflowed: the local candidate was held back by the overflow rule, the job went to site.
    _decision("tok-1", candidates=[_cand("local", "overflow"), _cand("site")]),
    # Overflowed: 'overflow' among a site candidate's held_by, the job went national.
    _decision("tok-2", cluster="c2", tier="national",
              candidates=[_cand("site", held_by=["quota", "overflow"]), _cand("national")]),
    # Not overflows: the overflow rule relaxed (same tier); a candidate without a tier; a refused
    # decision; a decision without candidates.
    _decision("tok-3", candidates=[_cand("site", held_by=["overflow"])]),
    _decision("tok-4", candidates=[_cand(None, "overflow"), _cand("site")]),
    _decision("tok-5", outcome="refused", cluster=None, tier=None,
              candidates=[_cand("local", "overflow")]),
    _decision("tok-6", tier="local"),
]


def batches() -> list[dict]:
    """Decisions in two batches, and jobs that the budgets count (this month's, this year's) or
    not (1970's)."""
    return [
        {"agent": AGENT, "factor_sets": [FACTORS], "decisions": DECISIONS[:3],
         "records": [_job("8", NOW - 50, k=12, first_seen=NOW - 100), _job("1", 101.0, k=3)]},
        {"agent": AGENT, "factor_sets": [FACTORS], "decisions": DECISIONS[3:],
         "records": [_job("9", NOW - 40, k=4, account="proj2", first_seen=NOW - 90)]},
    ]


def families(text: str) -> dict[str, float]:
    """The three families' series (name and labels) and values in an exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(FAMILIES):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def scrape(db, home, tok) -> dict[str, float]:
    with site_controller(home, tok, db) as ctl:
        ctl.start()
        for b in batches():
            send(ctl.port, b)
        return families(ctl.metrics())


def test_route_and_budget_metrics_are_the_same_on_every_engine(site_db, tmp_path):
    got = scrape(site_db, tmp_path / "ctl", token_file(tmp_path / "token", TOKEN))
    decided = {k: v for k, v in got.items() if k.startswith("greend_route_decisions_total{")}
    assert decided == {
        'greend_route_decisions_total{cluster="",tier="",outcome="refused"}': 1.0,
        'greend_route_decisions_total{cluster="c1",tier="local",outcome="submitted"}': 1.0,
        'greend_route_decisions_total{cluster="c1",tier="site",outcome="submitted"}': 3.0,
        'greend_route_decisions_total{cluster="c2",tier="national",outcome="submitted"}': 1.0,
    }, got
    assert got["greend_route_overflow_total"] == 2.0, got
    ratios = {k: v for k, v in got.items() if k.startswith("greend_budget_used_ratio{")}
    # proj (this month): job 8 only, 3 g of 1 g and 6 J facility of 1 kWh; proj2 (this year):
    # job 9's 0.5625 L of 0.5 L.
    assert ratios == {
        'greend_budget_used_ratio{account="proj",resource="carbon"}': pytest.approx(3.0),
        'greend_budget_used_ratio{account="proj",resource="energy"}': pytest.approx(6 / 3.6e6),
        'greend_budget_used_ratio{account="proj2",resource="water"}': pytest.approx(1.125),
    }, got


def test_a_server_metrics_equal_sqlite(server_db, tmp_path):
    """Side by side, series for series: a server controller's three families are SQLite's."""
    from sitedb_servers import SiteDb

    tok = token_file(tmp_path / "token", TOKEN)
    want = scrape(SiteDb("sqlite", "sqlite", None), tmp_path / "sqlite", tok)
    assert want["greend_route_overflow_total"] == 2.0
    assert scrape(server_db, tmp_path / "server", tok) == pytest.approx(want)


HOUR = 3600.0


def route_controller(home, tok, db):
    """A controller on `db` with the testbed's policy (no live Slurm state) and its router."""
    ctl = controller(home, tok, db)
    data = tomllib.loads(config_text())
    data["controller"] = ctl.cfg["controller"]
    ctl.write_config(_toml(data))
    return ctl


def past_train_jobs(now: float) -> list[dict]:
    """Two of alice's ended 'train' jobs, 1 h each, on the site cluster; and one of bob's."""
    return [rec(str(i), now - 4 * HOUR, "ended", cluster="site", first_seen=now - 5 * HOUR,
                end_time=now - 4 * HOUR, cpu_uj=int(2e9) * (i + 1), cpu_time_ns=int(0.4 * 4 * HOUR * 1e9),
                max_mem_bytes=200 * 2**20, tier="site")
            for i in range(2)] + [rec("7", now - HOUR, "ended", cluster="site", user="bob", uid=1002,
                                      first_seen=now - 2 * HOUR, end_time=now - HOUR, tier="site")]


def route(port: int, user: str) -> dict:
    job = {"sbatch": {"job-name": "train", "cpus-per-task": 4, "mem": "1G", "time": "04:00:00",
                      "account": "proj-green", "argv": ["job.sh"]}, "user": user}
    st, _, out = http(port, "POST", "/api/v1/route", json.dumps(job).encode(),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert st == 200, out
    return json.loads(out)


@pytest.mark.parametrize("engine", ["sqlite", "mysql", "postgresql"])
def test_a_controller_routes_with_the_history_in_its_database(engine, request, tmp_path):
    from sitedb_servers import SiteDb, _site_db

    db = SiteDb("sqlite", "sqlite", None) if engine == "sqlite" else _site_db(request, tmp_path, engine)
    tok = token_file(tmp_path / "token", TOKEN)
    now = time.time()
    with route_controller(tmp_path / "ctl", tok, db) as ctl:
        ctl.start()
        st, _, out = http(ctl.port, "POST", "/api/v1/records", json.dumps(
            {"agent": {**AGENT, "cluster": "site"}, "factor_sets": [FACTORS],
             "records": past_train_jobs(now)}).encode(),
            {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert st == 200, out
        d = route(ctl.port, "alice")
        est = d["plan"]["estimate"]
        assert "2 similar job(s) of alice named 'train'" in est["correction_from"], est
        assert est["runtime_s"] == pytest.approx(HOUR, rel=1e-3)  # their median, not the 4 h asked
        assert d["ledger"] == "used", d
        advice = [r for r in d["rules"] if r["rule"] == "right_sizing" and r["verdict"] == "advice"]
        assert any("used 40% of their CPUs" in r["reason"] for r in advice), d["rules"]
        # bob's one job of that name is his history, not alice's.
        bob = route(ctl.port, "bob")["plan"]["estimate"]
        assert re.search(r"1 similar job\(s\) of bob", bob["correction_from"] or ""), bob
