"""greend's exporter proven with the real tools: promtool finds nothing to say about /metrics, and a
real Prometheus scraping a real `greend run` sees per-job series whose energy adds up to the node's
(jobs + unattributed = measured, per source, at one scrape). Also: docs/metrics.md is generated.
"""

from __future__ import annotations

import math
import os
import pwd
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
from promharness import PROMETHEUS, PROMTOOL, GreendDaemon, PromServer, busy_job, scrape_config, stop_process

from greend import cli, exporter

REPO = Path(__file__).resolve().parent.parent
JOB_ID = str(700000 + os.getpid() % 100000)
USER = pwd.getpwuid(os.getuid()).pw_name

needs_promtool = pytest.mark.skipif(not Path(PROMTOOL).is_file(),
                                    reason=f"promtool not installed ({PROMTOOL}; Debian package prometheus)")
needs_prometheus = pytest.mark.skipif(not Path(PROMETHEUS).is_file(),
                                      reason=f"prometheus not installed ({PROMETHEUS}; Debian package "
                                      "prometheus)")


def test_metrics_doc_is_the_generators_output(capsys):
    """docs/metrics.md is generated (`greend metrics-doc > docs/metrics.md`): never edited by hand."""
    assert cli.main(["metrics-doc"]) == 0
    out = capsys.readouterr().out
    assert out == exporter.metrics_markdown()
    committed = (REPO / "docs" / "metrics.md").read_text()
    assert committed == out, "docs/metrics.md is stale: run `greend metrics-doc > docs/metrics.md`"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A real greend daemon with a busy Slurm-like job on this machine."""
    job = busy_job(JOB_ID)
    try:
        with GreendDaemon(tmp_path_factory.mktemp("greend"), node="n1",
                          clusters={"alpha": "site"}) as g:
            yield g
    finally:
        stop_process(job)


def _wait_for_job(g: GreendDaemon, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = g.metrics()
        for line in text.splitlines():
            if (line.startswith("greend_job_energy_joules_total{") and f'job_id="{JOB_ID}"' in line
                    and 'source="cpu"' in line and float(line.rsplit(" ", 1)[1]) > 0):
                return text
        if time.monotonic() > deadline:
            raise AssertionError(f"job {JOB_ID} has no energy on /metrics after {timeout_s} s:\n{text}")
        time.sleep(0.25)


@pytest.mark.prometheus
@needs_promtool
def test_promtool_check_metrics_reports_nothing(node):
    text = _wait_for_job(node)
    assert "greend_job_carbon_grams_total{" in text
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=30)
    assert (r.returncode, r.stdout + r.stderr) == (0, ""), f"promtool check metrics:\n{r.stdout}{r.stderr}"


@pytest.mark.prometheus
@needs_promtool
def test_metrics_are_gzipped_and_in_openmetrics_when_asked(node):
    import gzip
    import urllib.request

    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    _wait_for_job(node)

    def get(**headers):
        req = urllib.request.Request(f"http://{node.target}/metrics", headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return dict(r.headers), r.read()

    h, body = get(**{"Accept-Encoding": "gzip"})
    assert h.get("Content-Encoding") == "gzip" and "Accept-Encoding" in h.get("Vary", "")
    text = gzip.decompress(body).decode()
    assert f'job_id="{JOB_ID}"' in text and len(body) < len(text) / 4
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=30)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    h, body = get(**{"Accept-Encoding": "gzip;q=0"})
    assert "Content-Encoding" not in h and body.decode().startswith("# HELP")
    # As Prometheus itself asks (scrape_protocols): OpenMetrics first.
    h, body = get(Accept="application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
    assert h["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    om = body.decode()
    assert om.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(om)}  # the strict parser
    energy = families["greend_job_energy_joules"]
    assert energy.type == "counter" and any(
        smp.labels.get("job_id") == JOB_ID and smp.value > 0 for smp in energy.samples)
    assert "greend_node_energy_joules" in families and "process_cpu_seconds" in families


@pytest.fixture(scope="module")
def prom(node, tmp_path_factory):
    if not Path(PROMETHEUS).is_file():
        pytest.skip(f"prometheus not installed ({PROMETHEUS}; Debian package prometheus)")
    with PromServer(tmp_path_factory.mktemp("prometheus"), [scrape_config([node])],
                    scrape_interval_s=1.0) as p:
        yield p


def _series_key(metric: dict) -> tuple:
    return tuple(sorted(metric.items()))


@pytest.mark.prometheus
@needs_prometheus
def test_prometheus_scrapes_per_job_series(prom, node):
    sel = f'{{job_id="{JOB_ID}"}}'
    prom.wait_for(f"rate(greend_job_energy_joules_total{{job_id=\"{JOB_ID}\", source=\"cpu\"}}[5s]) > 0",
                  lambda r: len(r) == 1, what=f"energy of job {JOB_ID} growing in Prometheus")
    energy = prom.query(f"greend_job_energy_joules_total{sel}")
    labels = {r["metric"]["source"]: r["metric"] for r in energy}
    assert {"cpu", "memory"} <= set(labels)
    m = labels["cpu"]
    assert (m["cluster"], m["node"], m["kind"], m["user"], m["tier"], m["job"]) == (
        "alpha", "n1", "slurm", USER, "site", "greend-nodes")
    assert m["instance"] == node.target
    for metric in ("greend_job_carbon_grams_total", "greend_job_facility_energy_joules_total",
                   "greend_job_cpu_seconds_total"):
        (r,) = prom.query(f"{metric}{sel}")
        assert float(r["value"][1]) > 0, metric
    water = {r["metric"]["scope"]: float(r["value"][1])
             for r in prom.query(f"greend_job_water_litres_total{sel}")}
    assert set(water) == {"site", "offsite"} and all(v > 0 for v in water.values())
    (running,) = prom.query(f"greend_job_running{sel}")
    assert running["value"][1] == "1"


@pytest.mark.prometheus
@needs_prometheus
def test_job_energy_plus_unattributed_is_node_energy_at_each_scrape(prom, node):
    """Per source: sum over jobs + unattributed == node energy, all read at one scrape."""
    prom.wait_for(f'greend_job_energy_joules_total{{job_id="{JOB_ID}", source="cpu"}} > 0',
                  lambda r: len(r) == 1)
    inst = f'instance="{node.target}"'
    names = ("greend_job_energy_joules_total", "greend_node_unattributed_energy_joules_total",
             "greend_node_energy_joules_total")
    checked = set()
    deadline = time.monotonic() + 20
    while len(checked) < 3:
        assert time.monotonic() < deadline, f"only {len(checked)} scrapes checked"
        (ts,) = prom.query(f"timestamp(greend_samples_total{{{inst}}})")
        t = float(ts["value"][1])
        if t in checked:
            time.sleep(0.3)
            continue
        vals, stamps = {}, {}
        for name in names:
            vals[name] = prom.query(f"{name}{{{inst}}}", at=t)
            stamps[name] = {float(r["value"][1]) for r in prom.query(f"timestamp({name}{{{inst}}})", at=t)}
        # Every series read comes from the scrape at t: the identity is checked within one scrape.
        assert set().union(*stamps.values()) == {t}, stamps
        per_source: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for name, result in vals.items():
            for r in result:
                per_source[r["metric"]["source"]][name] += float(r["value"][1])
        assert per_source, vals
        n_series = sum(len(v) for v in vals.values())
        for source, sums in per_source.items():
            jobs = sums["greend_job_energy_joules_total"]
            unattributed = sums["greend_node_unattributed_energy_joules_total"]
            measured = sums["greend_node_energy_joules_total"]
            assert measured > 0, source
            # The exporter prints joules with microjoule resolution; allow for float rounding only.
            assert math.isclose(jobs + unattributed, measured, rel_tol=1e-9, abs_tol=1e-6 * n_series), (
                f"scrape at {t}, source {source}: jobs {jobs} + unattributed {unattributed} "
                f"!= node {measured}")
        assert per_source["cpu"]["greend_job_energy_joules_total"] > 0
        checked.add(t)
