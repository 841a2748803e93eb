"""What a controller on a database server reads besides the API (docs/site-mode.md, "Reads on a
server database"): the route and budget metrics of /metrics come from the server's records, as on
SQLite."""

from __future__ import annotations

import pytest
from daemonproc import token_file
from test_sitedb import FACTORS, TOKEN
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

