"""The dashboards and Prometheus rules in dashboards/, proven: the committed JSON is what the code
builds; promtool accepts the config and rules and their unit tests pass; and in a real Prometheus
scraping real greend daemons with a real job running, every panel's query (variables filled in with
values that exist) parses and returns data, and every recording rule records.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from promharness import (
    PROMETHEUS,
    PROMTOOL,
    GreendDaemon,
    PromError,
    PromServer,
    busy_job,
    scrape_config,
    stop_process,
)

from greend import decisions

REPO = Path(__file__).resolve().parent.parent
DASH = REPO / "dashboards"
PROM_DIR = DASH / "prometheus"
RULE_FILES = [PROM_DIR / "rules" / "greend-recording.yml", PROM_DIR / "rules" / "greend-alerts.yml"]
UIDS = {"greend-site-overview.json": "greend-site-overview",
        "greend-footprints.json": "greend-footprints",
        "greend-health.json": "greend-health"}

# Panels may show "no data" only when they query one of these metrics, which other parts of greend
# will export but do not yet. Each entry says why; the test fails once a metric here has data (remove
# it then) and when a metric here is no longer used by any panel.
NOT_YET_EXPORTED = {
    "greend_outbox_records": "site mode: agents with [controller] url "
                             "export it; this test runs no controller",
    "greend_controller_agents_reporting": "site mode: `greend controller` "
                                          "exports it; this test runs no controller",
}

# The routing and budget panels' data: a budget on node n1 and two decisions reported to it, one
# kept in the site tier and one that overflowed to the national tier.
BUDGETS = '[[policy.budgets]]\naccount = "proj-green"\nenergy_kwh = 10.0\n'


def _decision(token: str, cluster: str, tier: str, job_id: str, candidates: list) -> dict:
    return {"token": token, "t": time.time(), "user": pwd.getpwuid(os.getuid()).pw_name,
            "uid": os.getuid(), "outcome": "submitted", "cluster": cluster, "tier": tier,
            "job_id": job_id, "account": "proj-green", "job_name": "job.sh", "tried": [],
            "decision": {"outcome": "route", "cluster": cluster, "candidates": candidates}}


DECISIONS = [
    _decision("greend-dash-1", "alpha", "site", "1", [{"cluster": "alpha", "tier": "site",
                                                       "rejected_by": None, "held_by": []}]),
    _decision("greend-dash-2", "beta", "national", "2", [
        {"cluster": "alpha", "tier": "site", "rejected_by": "overflow", "held_by": []},
        {"cluster": "beta", "tier": "national", "rejected_by": None, "held_by": []}]),
]

# Metrics that exist only on nodes with NVIDIA GPUs (this test's nodes may have none).
NEEDS_GPU = {
    "greend_gpu_power_watts": "NVML, nodes with NVIDIA GPUs",
    "greend_gpu_utilization_ratio": "NVML, nodes with NVIDIA GPUs",
}

# Variables that may list no value in the test, and why; they are then set to "All" (.*).
MAY_BE_EMPTY = {
    "site": "a site's own Prometheus does not see its `site` external label; a national one "
            "federating the sites does (tests/test_federation.py)",
    "account": "the process scan gives jobs no account (Slurm metadata comes from Slurm's commands "
               "or cgroups); an empty label is matched by All",
}

# Grafana's built-in interval variables, with durations suited to a 1 s scrape interval and the
# ~20 s of data the test has.
BUILTINS = {"$__rate_interval": "5s", "$__interval": "1s", "$__range": "1m"}

JOB_ID = str(800000 + os.getpid() % 100000)
USER = pwd.getpwuid(os.getuid()).pw_name
PREFERRED = {"cluster": "alpha", "tier": "site", "node": "n1", "user": USER, "job": JOB_ID}


def load(name: str) -> dict:
    return json.loads((DASH / name).read_text())


def all_panels(d: dict):
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows hold their panels


def data_panels(d: dict):
    return [p for p in all_panels(d) if p["type"] != "row"]


def exprs(d: dict) -> list[tuple[str, str, bool]]:
    """(panel title, expression, whether Grafana runs it as a range query) of every target."""
    return [(p["title"], t["expr"], bool(t.get("range"))) for p in data_panels(d)
            for t in p.get("targets", [])]


# -- static checks --------------------------------------------------------------------------------
def test_committed_json_is_what_the_code_builds():
    pytest.importorskip("grafana_foundation_sdk",
                        reason="grafana-foundation-sdk not installed (pip install "
                        "'grafana-foundation-sdk==1769699379!11.6.0')")
    sys.path.insert(0, str(REPO))
    try:
        from dashboards import build
    finally:
        sys.path.remove(str(REPO))
    built = build.rendered()
    assert set(built) == set(UIDS)
    for name, text in built.items():
        assert (DASH / name).read_text() == text, (
            f"dashboards/{name} differs from the code: run `.venv/bin/python -m dashboards.build`")


@pytest.mark.parametrize("name", sorted(UIDS))
def test_dashboard_conventions(name):
    d = load(name)
    assert d["uid"] == UIDS[name]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids)) and 0 not in ids
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, v["name"]
    for p in data_panels(d):
        where = f"{name}: panel {p['title']!r}"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
        assert p["targets"], where
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert t["expr"] and t["refId"], where
        if p["type"] == "table":  # every value column has its own unit
            organize = next(x for x in p["transformations"] if x["id"] == "organize")
            renamed = organize["options"]["renameByName"]
            units = {o["matcher"]["options"] for o in p["fieldConfig"]["overrides"]
                     if any(q["id"] == "unit" for q in o["properties"])}
            assert set(renamed.values()) <= units, where
    assert "uid" not in json.dumps(d).replace('"uid": "${datasource}"', "").replace(
        f'"uid": "{d["uid"]}"', ""), "a hard-coded datasource uid"


def test_footprints_variables_and_job_links():
    d = load("greend-footprints.json")
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "cluster", "account", "user", "job"]
    (jobs,) = [p for p in data_panels(d) if p["title"] == "Jobs" and p["type"] == "table"]
    links = [link for o in jobs["fieldConfig"]["overrides"] if o["matcher"]["options"] == "job_id"
             for prop in o["properties"] if prop["id"] == "links" for link in prop["value"]]
    assert links and all(link["url"].startswith("/d/greend-footprints/") for link in links)
    assert "var-job=${__data.fields.job_id}" in links[0]["url"]
    assert "var-cluster=${__data.fields.cluster}" in links[0]["url"]
    # the detail the link leads to: panels filtered by $job
    titles = [p["title"] for p in all_panels(d)]
    assert "Job detail ($job)" in titles
    detail = titles[titles.index("Job detail ($job)") + 1:]
    assert detail and all('job_id=~\\"$job\\"' in json.dumps(p["targets"])
                          for p in data_panels(d) if p["title"] in detail)


def test_units_are_the_right_ones():
    """Energy in joules or kWh, carbon in gCO2e, water in litres: checked from the metric queried."""
    for name in UIDS:
        for p in data_panels(load(name)):
            unit = p["fieldConfig"]["defaults"]["unit"]
            text = json.dumps(p["targets"])
            if p["type"] == "table":
                continue  # per-column units, checked in test_dashboard_conventions
            if "carbon_grams" in text and "intensity" not in text:
                assert unit.startswith("si:gCO2e"), p["title"]
            elif "water_litres" in text:
                assert unit in ("litre", "litreh"), p["title"]
            elif "energy_joules" in text and "rate(" not in text and ":rate5m" not in text:
                assert unit in ("joule", "kwatth", "percentunit", "short"), p["title"]


def test_provisioning_files():
    ds = (DASH / "grafana" / "provisioning" / "datasources" / "greend.yaml").read_text()
    assert "apiVersion: 1" in ds and "type: prometheus" in ds
    prov = (DASH / "grafana" / "provisioning" / "dashboards" / "greend.yaml").read_text()
    assert "apiVersion: 1" in prov and "type: file" in prov and "path:" in prov


@pytest.mark.prometheus
@pytest.mark.skipif(not Path(PROMTOOL).is_file(), reason=f"promtool not installed ({PROMTOOL})")
@pytest.mark.parametrize("args", [
    ["check", "config", "prometheus.yml"],
    ["check", "rules", "rules/greend-recording.yml", "rules/greend-alerts.yml"],
    ["test", "rules", "tests/greend-alerts-test.yml"],
], ids=["check-config", "check-rules", "test-rules"])
def test_promtool(args):
    r = subprocess.run([PROMTOOL, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr


# -- against a real Prometheus --------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two greend daemons (clusters alpha/site and beta/national), a job, and Prometheus with the
    shipped rules, scraping every second."""
    if not Path(PROMETHEUS).is_file():
        pytest.skip(f"prometheus not installed ({PROMETHEUS}; Debian package prometheus)")
    job = busy_job(JOB_ID)
    n1_dir = tmp_path_factory.mktemp("n1")
    try:
        with (GreendDaemon(n1_dir, node="n1", clusters={"alpha": "site", "beta": "national"},
                           extra_config=BUDGETS, socket=n1_dir / "api.sock") as n1,
              GreendDaemon(tmp_path_factory.mktemp("n2"), node="n2",
                           clusters={"beta": "national", "alpha": "site"}) as n2):
            for d in DECISIONS:  # what `greend submit` reports to the node's daemon
                ok, why = decisions.report(n1_dir / "api.sock", d)
                assert ok, why
            with PromServer(tmp_path_factory.mktemp("prometheus"), [scrape_config([n1, n2])],
                            rule_files=RULE_FILES, scrape_interval_s=1.0, evaluation_interval_s=1.0) as prom:
                energy = f'greend_job_energy_joules_total{{job_id="{JOB_ID}", source="cpu"}}'
                prom.wait_for(f"rate({energy}[5s]) > 0",
                              lambda r: len(r) == 2, what=f"job {JOB_ID} on both nodes")
                # The tier and cluster variables list the recording rules' series (so that they
                # work on a national Prometheus too): wait for the rules' evaluation to have both.
                prom.wait_for("count by (tier) (cluster:greend_node_energy_joules:rate5m)",
                              lambda r: len(r) == 2, what="the node energy rule for both tiers")
                yield prom
    finally:
        stop_process(job)


def test_excused_metrics_are_used_and_not_exported_by_greend():
    from greend import exporter

    used = " ".join(e for name in UIDS for _, e, _ in exprs(load(name)))
    for metric in NOT_YET_EXPORTED:
        assert metric in used, f"{metric} is in NOT_YET_EXPORTED but no panel queries it"
        assert metric not in exporter.METRICS, f"greend exports {metric} now: remove it from NOT_YET_EXPORTED"


@pytest.mark.prometheus
def test_every_recording_and_alert_rule_loads_and_records(site):
    deadline = time.monotonic() + 20
    while True:
        rules = site.rules()
        recording = [r for r in rules if r["type"] == "recording"]
        # The daily figures are 5-minute steps of the :increase5m rules ([1d:5m]): a Prometheus
        # younger than the last 5-minute boundary has no step yet. promtool's unit tests
        # (greend-alerts-test.yml) check their values over a day.
        missing = [r["name"] for r in recording
                   if not r["name"].endswith(":increase1d") and not site.query(r["name"])]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    shipped = "".join(f.read_text() for f in RULE_FILES)
    assert len(recording) == len(re.findall(r"^\s*- record:", shipped, re.M))
    assert len(rules) - len(recording) == len(re.findall(r"^\s*- alert:", shipped, re.M))
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    assert missing == [], f"recording rules without data: {missing}"
    # The per-account energy is the jobs' energy: the job of this test is in it.
    assert sum(float(r["value"][1]) for r in site.query("account:greend_job_energy_joules:increase5m")) > 0


def _resolve_variables(prom: PromServer, d: dict) -> tuple[dict[str, str], list[str]]:
    """Fill the dashboard's query variables in order, each from its own label_values() query."""
    values: dict[str, str] = {}
    notes = []
    for v in d["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
        assert m, f"variable {v['name']}: unsupported query {q}"
        selector = substitute(m.group(1), values)
        found = prom.label_values(m.group(2), match=selector)
        if not found:
            assert v["name"] in MAY_BE_EMPTY, f"variable {v['name']}: no value for {selector}"
            values[v["name"]] = v.get("allValue") or ".*"
            notes.append(f"${v['name']} = All ({MAY_BE_EMPTY[v['name']]})")
            continue
        want = PREFERRED.get(v["name"])
        assert want is None or want in found, f"variable {v['name']}: {want!r} not in {found}"
        values[v["name"]] = want or found[0]
    return values, notes


def substitute(expr: str, values: dict[str, str]) -> str:
    for k, val in BUILTINS.items():
        expr = expr.replace(k, val)
    # longest names first so that $job does not eat into a longer variable name
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    assert "$" not in expr, f"unfilled variable in {expr}"
    return expr


@pytest.mark.prometheus
@pytest.mark.parametrize("name", sorted(UIDS))
def test_every_panel_query_parses_and_returns_data(site, name):
    d = load(name)
    values, _notes = _resolve_variables(site, d)
    # the recording rules the panels use have recorded at least once
    site.wait_for("cluster:greend_water_litres_per_it_joule:max", lambda r: len(r) == 2)
    site.wait_for("count(count by (instance) (greend_job_carbon_grams_total))", lambda r: r != [])
    failures, pending, excused = [], [], []

    def evaluate(expr: str, is_range: bool) -> list:
        now = time.time()
        result = site.query(expr, at=now)
        if result and is_range:  # as Grafana runs it: over the last 10 s, one point a second
            result = site.query_range(expr, now - 10, now, 1)
        return result

    for title, raw, is_range in exprs(d):
        expr = substitute(raw, values)
        try:
            result = evaluate(expr, is_range)
        except PromError as e:
            failures.append(f"{title}: {expr}\n    {e}")
            continue
        if result:
            continue
        waiting = [m for m in NOT_YET_EXPORTED if m in expr]
        if waiting:
            excused.append(title)
            have = [m for m in waiting if site.query(f"count({m})")]
            assert not have, f"{have} have data now: remove them from NOT_YET_EXPORTED"
        elif any(m in expr for m in NEEDS_GPU):
            excused.append(title)
        else:
            pending.append((title, expr, is_range))
    assert failures == [], "queries Prometheus refused:\n" + "\n".join(failures)
    # On a loaded machine a scrape can time out (its series go stale for a second, and so do the
    # rules' results): ask again for a while before calling a query empty.
    deadline = time.monotonic() + 15
    while pending and time.monotonic() < deadline:
        time.sleep(0.5)
        pending = [(t, e, r) for t, e, r in pending if not evaluate(e, r)]
    scrapes = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in site.targets()]
    empty = [f"{t}: {e}" for t, e, _ in pending]
    assert empty == [], "queries without data:\n" + "\n".join(empty) + f"\ntargets: {scrapes}"
