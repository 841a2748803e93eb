"""The national view through Prometheus itself: two real site Prometheus servers, each scraping a
real greend daemon with the shipped recording rules and its own `site` external label, and a real
national Prometheus federating their recording-rule series as
dashboards/prometheus/prometheus-national.yml says. The site overview dashboard's queries that use
recording-rule series only (its "Sites" row among them) answer on the national server, and for each
site picked in its Site variable they give exactly what that site's own Prometheus gives.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest
from promharness import PROMETHEUS, PROMTOOL, GreendDaemon, PromServer, busy_job, scrape_config, stop_process

REPO = Path(__file__).resolve().parent.parent
PROM_DIR = REPO / "dashboards" / "prometheus"
NATIONAL = PROM_DIR / "prometheus-national.yml"
RECORDING = [PROM_DIR / "rules" / "greend-recording.yml"]
BUILTINS = {"$__rate_interval": "5s", "$__interval": "1s", "$__range": "1m"}
SITES = {"lyon": {"alpha": "site"}, "paris": {"alpha": "national"}}  # the same cluster name
RECORDED = re.compile(r"\b[a-z_]+:greend_\w+:\w+\b")
RAW = re.compile(r"(?<![:\w])greend_\w+")


def test_national_config_is_valid_and_federates_recording_rules_only():
    r = subprocess.run([PROMTOOL, "check", "config", NATIONAL.name], cwd=PROM_DIR,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = NATIONAL.read_text()
    assert re.search(r"^\s*honor_labels: true$", text, re.M)
    assert re.search(r"^\s*metrics_path: /federate$", text, re.M)
    site = (PROM_DIR / "prometheus.yml").read_text()
    assert re.search(r"^\s*external_labels:\n\s+site: \S+", site, re.M), "site config lacks site label"


def federated_matchers() -> list[str]:
    """The match[] selectors of the shipped national config."""
    block = NATIONAL.read_text().split("match[]:", 1)[1]
    return re.findall(r"^\s*- '(\{.*\})'$", block.split("static_configs:", 1)[0], re.M)


def site_overview() -> dict:
    return json.loads((REPO / "dashboards" / "greend-site-overview.json").read_text())


def recording_rule_queries(d: dict) -> dict[str, list[str]]:
    """{panel title: expressions} of the panels that read recording-rule series only; the
    "Sites" row's panels must all be among them."""
    out, row, sites_row = {}, "", []
    for p in d["panels"]:
        if p["type"] == "row":
            row = p["title"]
            continue
        if row.startswith("Sites"):
            sites_row.append(p["title"])
        exprs = [t["expr"] for t in p.get("targets", [])]
        if exprs and all(RECORDED.search(e) and not RAW.search(RECORDED.sub("", e)) for e in exprs):
            out[p["title"]] = exprs
    assert sites_row and set(sites_row) <= set(out), (sites_row, sorted(out))
    return out


def fill(expr: str, site: str) -> str:
    for k, v in BUILTINS.items():
        expr = expr.replace(k, v)
    for name, v in (("site", site), ("tier", ".*"), ("cluster", ".*"), ("node", ".*")):
        expr = expr.replace(f"${name}", v)
    assert "$" not in expr, expr
    return expr


def by_labels(result: list[dict]) -> dict[tuple, float]:
    return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "site")): float(r["value"][1])
            for r in result}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if not Path(PROMETHEUS).is_file():
        pytest.skip(f"prometheus not installed ({PROMETHEUS}; Debian package prometheus)")
    job = busy_job("700" + str(int(time.time()) % 100000))
    daemons, proms = [], {}
    try:
        for site, clusters in SITES.items():
            daemons.append(GreendDaemon(tmp_path_factory.mktemp(f"greend-{site}"), node="n1",
                                        clusters=clusters).start())
            prom = PromServer(tmp_path_factory.mktemp(f"prom-{site}"), [scrape_config([daemons[-1]])],
                              rule_files=RECORDING, scrape_interval_s=1.0, evaluation_interval_s=2.0)
            prom.config["global"]["external_labels"] = {"site": site}
            proms[site] = prom.start()
        national = PromServer(tmp_path_factory.mktemp("prom-national"), [{
            "job_name": "greend-federate", "honor_labels": True, "metrics_path": "/federate",
            "params": {"match[]": federated_matchers()},
            "static_configs": [{"targets": [p.url.removeprefix("http://") for p in proms.values()]}]}],
            scrape_interval_s=1.0).start()
        try:
            for rule in ("cluster:greend_node_energy_joules:rate5m",
                         "cluster:greend_node_unattributed_energy_joules:rate5m",
                         "cluster:greend_node_carbon_grams:rate5m",
                         "account:greend_job_carbon_grams:increase5m"):
                national.wait_for(f"count by (site) ({rule})", lambda r: len(r) == 2,
                                  timeout_s=60, what=f"both sites' {rule}")
            yield national, proms
        finally:
            national.stop()
    finally:
        for p in proms.values():
            p.stop()
        for g in daemons:
            g.stop()
        stop_process(job)


@pytest.mark.prometheus
def test_national_prometheus_has_only_recording_rule_series_labelled_by_site(servers):
    national, proms = servers
    names = national.label_values("__name__")
    assert names and all(re.fullmatch(r"(cluster|account):greend_\w+:\w+", n)
                         or n.startswith(("up", "scrape_")) for n in names), names
    assert not national.query("count(user:greend_job_carbon_grams:increase5m)")  # stays at the sites
    assert not national.query("count(greend_node_energy_joules_total)")
    assert national.label_values("site", match="cluster:greend_node_energy_joules:rate5m") == sorted(SITES)
    # On a site's own Prometheus the external label is not seen: the Site variable is empty there
    # and "All" (.*) matches the absent label.
    assert proms["lyon"].label_values("site", match="cluster:greend_node_energy_joules:rate5m") == []
    tiers = national.values("sum by (site, tier) (cluster:greend_node_energy_joules:rate5m)")
    assert {dict(k)["site"]: dict(k)["tier"] for k in tiers} == {"lyon": "site", "paris": "national"}


@pytest.mark.prometheus
def test_site_overview_answers_on_the_national_prometheus_as_on_each_site(servers):
    national, proms = servers
    queries = recording_rule_queries(site_overview())
    mismatches: list[str] = []
    for _attempt in range(8):
        # A moment the national server has federated every sample of: the sites record every
        # 2 s, the national server federates every second.
        at = time.time() - 5
        mismatches = []
        for title, exprs in queries.items():
            for raw in exprs:
                for site, prom in proms.items():
                    here = by_labels(prom.query(fill(raw, ".*"), at=at))
                    there = by_labels(national.query(fill(raw, site), at=at))
                    same = bool(here) and here.keys() == there.keys() and all(
                        math.isclose(here[k], there[k], rel_tol=1e-9, abs_tol=1e-12) for k in here)
                    if not same:
                        mismatches.append(f"{title} [{site}]: {fill(raw, site)}\n  site {here}\n"
                                          f"  national {there}")
        if not mismatches:
            break
        time.sleep(2)
    assert mismatches == [], "\n".join(mismatches)
    # And picking no site, the national view has both, apart.
    power = national.values(fill("sum by (site) (cluster:greend_node_energy_joules:rate5m"
                                 '{site=~"$site"})', ".*"))
    assert sorted(dict(k)["site"] for k in power) == sorted(SITES)
    assert all(v > 0 for v in power.values())
