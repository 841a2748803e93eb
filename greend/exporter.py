"""Prometheus exposition of a node's books: a custom collector built from a snapshot of the monitor.

Per-job series come and go with jobs, so no long-lived labelled Gauge is kept: each scrape yields
families from the current accounts (running jobs, and finished ones for a grace period). Names follow
Prometheus conventions: greend_<what>_<base unit>, _total on counters. Every metric is listed in
METRICS, from which docs/metrics.md is generated.
"""

from __future__ import annotations

import logging
import math
import platform
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from . import __version__

if TYPE_CHECKING:  # the exporter only reads these; importing it must not load the monitor
    from greend.collectors.base import CollectorStatus, Gauge

    from .footprint import Factors
    from .monitor import DomainTotals, JobTotals

# name -> (type, help, labels)
JOB_LABELS = ["cluster", "node", "job_id", "user", "account", "partition", "kind"]
METRICS: dict[str, tuple[str, str, list[str]]] = {
    "greend_build": ("info", "greend version and Python version.", ["version", "python"]),
    "greend_node_energy_joules_total": (
        "counter", "IT energy measured (or modelled) on this node by domain since greend first ran.",
        ["cluster", "node", "domain", "source", "method"]),
    "greend_node_power_watts": (
        "gauge", "Average power of each domain over the last sampling interval.",
        ["cluster", "node", "domain", "source", "method"]),
    "greend_node_unattributed_energy_joules_total": (
        "counter", "Part of the node energy not attributed to any job (idle per the idle rule, "
        "processes outside jobs, greend itself).", ["cluster", "node", "domain", "source"]),
    "greend_node_idle_energy_joules_total": (
        "counter", "Part of the node energy due to idle power (before the idle rule shares it).",
        ["cluster", "node", "domain", "source"]),
    "greend_job_energy_joules_total": (
        "counter", "IT energy attributed to a job on this node, by source (cpu, dram, gpu, memory).",
        [*JOB_LABELS, "source"]),
    "greend_job_facility_energy_joules_total": (
        "counter", "Facility energy of a job on this node: IT energy x PUE in force.", JOB_LABELS),
    "greend_job_carbon_grams_total": (
        "counter", "Location-based carbon emissions of a job on this node, gCO2e.", JOB_LABELS),
    "greend_job_water_litres_total": (
        "counter", "Estimated water consumption of a job on this node, by scope (site: on-site "
        "cooling, WUE; offsite: electricity generation, EWIF).", [*JOB_LABELS, "scope"]),
    "greend_job_cpu_seconds_total": (
        "counter", "CPU time of a job on this node seen by greend.", JOB_LABELS),
    "greend_job_power_watts": (
        "gauge", "Average IT power attributed to a job over the last sampling interval.", JOB_LABELS),
    "greend_job_running": (
        "gauge", "1 while the job runs on this node, 0 during its grace period after it ended.",
        JOB_LABELS),
    "greend_jobs_active": ("gauge", "Jobs running on this node.", ["cluster", "node"]),
    "greend_factor_pue": ("gauge", "PUE in force for the cluster.", ["cluster"]),
    "greend_factor_wue_site_litres_per_kilowatt_hour": (
        "gauge", "On-site water usage effectiveness in force, L per kWh of IT energy.", ["cluster"]),
    "greend_factor_ewif_litres_per_kilowatt_hour": (
        "gauge", "Off-site water intensity of electricity in force, L per kWh.", ["cluster"]),
    "greend_factor_carbon_intensity_grams_per_kilowatt_hour": (
        "gauge", "Carbon intensity of electricity in force, gCO2e per kWh.", ["cluster"]),
    "greend_collector_up": (
        "gauge", "1 if the collector's last read succeeded, 0 if it failed (absent sources are "
        "not listed).", ["collector"]),
    "greend_collector_errors_total": ("counter", "Failed reads of a collector.", ["collector"]),
    "greend_collector_duration_seconds": (
        "gauge", "Duration of the collector's last read.", ["collector"]),
    "greend_sample_duration_seconds": ("gauge", "Duration of the last sampling tick.", []),
    "greend_samples_total": ("counter", "Sampling ticks taken.", []),
    "greend_checkpoint_errors_total": ("counter", "Failed ledger checkpoints.", []),
    "greend_last_checkpoint_timestamp_seconds": (
        "gauge", "Unix time of the last successful ledger checkpoint.", []),
    "greend_gpu_power_watts": ("gauge", "GPU power draw (NVML).", ["gpu", "uuid", "model"]),
    "greend_gpu_utilization_ratio": ("gauge", "GPU utilisation, 0 to 1 (NVML).", ["gpu", "uuid", "model"]),
    "greend_gpu_memory_used_bytes": ("gauge", "GPU memory in use (NVML).", ["gpu", "uuid", "model"]),
    "greend_gpu_power_limit_watts": ("gauge", "GPU power limit (NVML).", ["gpu", "uuid", "model"]),
    "greend_gpu_temperature_celsius": ("gauge", "GPU temperature (NVML).", ["gpu", "uuid", "model"]),
    "greend_route_decisions_total": (
        "counter", "Routing decisions in this ledger (`greend submit`, /api/v1/decisions) by the "
        "cluster and tier chosen (empty when none) and outcome (submitted, refused, no_cluster, "
        "failed, unknown, pending).", ["cluster", "tier", "outcome"]),
    "greend_route_overflow_total": (
        "counter", "Submitted decisions that went to another tier than a candidate the overflow rule "
        "held back (rejected_by or held_by 'overflow' in the decision): the preferred tier was too "
        "busy. A relaxed overflow (nothing else could take the job) is not counted.", []),
    "greend_budget_used_ratio": (
        "gauge", "Usage of each [[policy.budgets]] entry over its current period (jobs of the account "
        "in this ledger, as the budget rule counts them) divided by its limit, per resource (energy: "
        "facility kWh, carbon: kg CO2e, water: L).", ["account", "resource"]),
}


def _method(provenance: str) -> str:
    return provenance.split(":", 1)[0] if ":" in provenance else "unknown"


@dataclass(slots=True)
class Snapshot:
    """What one scrape shows, copied under the daemon's lock so rendering does not hold it."""

    cluster: str
    node: str
    domains: list[DomainTotals]
    jobs: list[JobTotals]
    """Running jobs, then finished ones in their grace period (running False)."""
    factors: dict[str, Factors]
    """The factors in force for each cluster of the configuration (its own and the others)."""
    collectors: list[CollectorStatus]
    """Copies of the present collectors' status."""
    sample_duration_s: float
    samples: int
    checkpoint_errors: int
    last_checkpoint: float
    gauges: list[Gauge]


def _label_value(v: str) -> str:
    if "\\" in v or '"' in v or "\n" in v:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return v


class JobFamily(Metric):
    """A per-job family (a node can run a thousand jobs: several thousand series a scrape). Each
    job's label set is formatted once for all its families, and the family writes its own
    exposition text (api.render_metrics); `samples` are built only for other consumers."""

    def __init__(self, name: str):
        kind, help_, labels = METRICS[name]
        super().__init__(name.removesuffix("_total") if kind == "counter" else name, help_, kind)
        self.sample_name = name
        self.labelnames = labels
        self.rows: list[tuple[tuple, str, float]] = []  # (label values, formatted labels, value)

    @property
    def samples(self) -> list[Sample]:
        n, names = self.sample_name, self.labelnames
        return [Sample(n, dict(zip(names, v, strict=True)), x, None, None) for v, _, x in self.rows]

    @samples.setter
    def samples(self, _value) -> None:  # Metric.__init__ sets an empty list
        pass

    def add(self, values: tuple, labels: str, value: float) -> None:
        self.rows.append((values, labels, value))

    def text(self) -> str:
        # repr() of a finite float is valid in the text format (Go writes large values with an
        # exponent where Python may not: both parse the same); only +Inf, -Inf and NaN differ.
        n, fmt, finite = self.sample_name, floatToGoString, math.isfinite
        return "".join([f"{n}{{{ls}}} {x!r}\n" if finite(x) else f"{n}{{{ls}}} {fmt(x)}\n"
                        for _, ls, x in self.rows])


class NodeCollector:
    """prometheus_client custom collector; `snapshot` is a callable returning a Snapshot."""

    def __init__(self, snapshot, user_label: bool = True):
        self.snapshot = snapshot
        self.user_label = user_label

    def describe(self):
        return []  # series depend on the jobs present: no fixed description

    def collect(self):
        s: Snapshot = self.snapshot()
        fam = {}

        def f(name):
            if name not in fam:
                kind, help_, labels = METRICS[name]
                if kind == "counter":
                    # CounterMetricFamily wants the name without _total and adds it back.
                    fam[name] = CounterMetricFamily(name.removesuffix("_total"), help_, labels=labels)
                elif kind == "info":
                    fam[name] = InfoMetricFamily(name, help_, labels=[])
                else:
                    fam[name] = GaugeMetricFamily(name, help_, labels=labels)
            return fam[name]

        f("greend_build").add_metric([], {"version": __version__, "python": platform.python_version()})
        cn = [s.cluster, s.node]
        for d in s.domains:
            m = _method(d.provenance)
            f("greend_node_energy_joules_total").add_metric([*cn, d.domain, d.source, m], d.energy_uj / 1e6)
            f("greend_node_power_watts").add_metric([*cn, d.domain, d.source, m], d.power_w)
            f("greend_node_unattributed_energy_joules_total").add_metric(
                [*cn, d.domain, d.source], d.unattributed_uj / 1e6)
            f("greend_node_idle_energy_joules_total").add_metric([*cn, d.domain, d.source], d.idle_uj / 1e6)
        for name in ("greend_job_energy_joules_total", "greend_job_facility_energy_joules_total",
                     "greend_job_carbon_grams_total", "greend_job_water_litres_total",
                     "greend_job_cpu_seconds_total", "greend_job_power_watts", "greend_job_running"):
            fam[name] = JobFamily(name)
        en = fam["greend_job_energy_joules_total"].add
        fac = fam["greend_job_facility_energy_joules_total"].add
        co2 = fam["greend_job_carbon_grams_total"].add
        wat = fam["greend_job_water_litres_total"].add
        cpu = fam["greend_job_cpu_seconds_total"].add
        pw = fam["greend_job_power_watts"].add
        run = fam["greend_job_running"].add
        active = 0
        user_label = self.user_label
        for j in s.jobs:
            lab = (j.cluster, j.node, j.job_id, j.user if user_label else "", j.account, j.partition,
                   j.kind)
            ls = ",".join([f'{k}="{_label_value(v)}"' for k, v in zip(JOB_LABELS, lab, strict=True)])
            # cpu and memory always appear so that a job's series exist from its first scrape.
            en((*lab, "cpu"), ls + ',source="cpu"', j.cpu_uj / 1e6)
            en((*lab, "memory"), ls + ',source="memory"', j.memory_uj / 1e6)
            if j.dram_uj:
                en((*lab, "dram"), ls + ',source="dram"', j.dram_uj / 1e6)
            if j.gpu_uj:
                en((*lab, "gpu"), ls + ',source="gpu"', j.gpu_uj / 1e6)
            fac(lab, ls, j.facility_j)
            co2(lab, ls, j.carbon_g)
            wat((*lab, "site"), ls + ',scope="site"', j.water_site_l)
            wat((*lab, "offsite"), ls + ',scope="offsite"', j.water_offsite_l)
            cpu(lab, ls, j.cpu_time_ns / 1e9)
            pw(lab, ls, j.power_w)
            run(lab, ls, 1.0 if j.running else 0.0)
            active += j.running
        f("greend_jobs_active").add_metric(cn, active)
        for cluster, fa in s.factors.items():
            f("greend_factor_pue").add_metric([cluster], fa.pue)
            f("greend_factor_wue_site_litres_per_kilowatt_hour").add_metric([cluster], fa.wue_site_l_per_kwh)
            f("greend_factor_ewif_litres_per_kilowatt_hour").add_metric([cluster], fa.ewif_l_per_kwh)
            f("greend_factor_carbon_intensity_grams_per_kilowatt_hour").add_metric(
                [cluster], fa.carbon_intensity_g_per_kwh)
        for c in s.collectors:
            f("greend_collector_up").add_metric([c.name], 1.0 if c.ok else 0.0)
            f("greend_collector_errors_total").add_metric([c.name], c.errors_total)
            f("greend_collector_duration_seconds").add_metric([c.name], c.last_duration_s)
        f("greend_sample_duration_seconds").add_metric([], s.sample_duration_s)
        f("greend_samples_total").add_metric([], s.samples)
        f("greend_checkpoint_errors_total").add_metric([], s.checkpoint_errors)
        f("greend_last_checkpoint_timestamp_seconds").add_metric([], s.last_checkpoint)
        for name, labels, value in s.gauges:
            if name in METRICS:
                f(name).add_metric([str(labels.get(k, "")) for k in METRICS[name][2]], value)
        yield from fam.values()


class LedgerMetrics:
    """greend_route_* and greend_budget_used_ratio, from aggregate queries on a ledger (the
    decisions and jobs tables) cached for ttl_s seconds: a scrape never waits on more than one
    refresh, and most read the cache. `budgets` is a callable returning the config's budgets.
    `reader`, when given (a controller on a database server: greend.sitedb.ServerSite.reader),
    is a context manager factory whose reader the queries run on instead of ledger_path's file."""

    def __init__(self, ledger_path, budgets, ttl_s: float = 10.0, clock=time.monotonic,
                 reader=None):
        self.ledger_path = ledger_path
        self.reader = reader
        self.budgets = budgets
        self.ttl_s = ttl_s
        self.clock = clock
        self.lock = threading.Lock()
        self.db = None
        self.at: float | None = None
        self.values: tuple[list, int, list] = ([], 0, [])

    def invalidate(self) -> None:
        self.at = None

    def describe(self):
        return []

    def _refresh(self) -> tuple[list, int, list]:
        if self.reader is not None:
            with self.reader() as db:
                return self._query(db)
        if self.db is None:
            from .ledger import Ledger

            self.db = Ledger(self.ledger_path, readonly=True).db
        return self._query(self.db)

    def _query(self, db) -> tuple[list, int, list]:
        from . import decisions
        from .budgets import budget_status

        counts, overflow = decisions.aggregates(db)
        ratios = [(account, resource, ratio)
                  for account, st in budget_status(db, self.budgets()).items()
                  for resource, ratio in st["ratio"].items()]
        return counts, overflow, ratios

    def collect(self):
        with self.lock:
            now = self.clock()
            if self.at is None or now - self.at >= self.ttl_s:
                try:
                    self.values = self._refresh()
                except Exception as e:  # a ledger being migrated or locked: keep the last values
                    logging.getLogger(__name__).warning("route and budget metrics not refreshed: %s", e)
                self.at = now
            counts, overflow, ratios = self.values
        name = "greend_route_decisions_total"
        c = CounterMetricFamily(name.removesuffix("_total"), METRICS[name][1], labels=METRICS[name][2])
        for cluster, tier, outcome, n in counts:
            c.add_metric([cluster, tier, outcome], n)
        yield c
        name = "greend_route_overflow_total"
        yield CounterMetricFamily(name.removesuffix("_total"), METRICS[name][1], value=overflow)
        name = "greend_budget_used_ratio"
        g = GaugeMetricFamily(name, METRICS[name][1], labels=METRICS[name][2])
        for account, resource, ratio in ratios:
            g.add_metric([account, resource], ratio)
        yield g


def metrics_markdown() -> str:
    """docs/metrics.md, generated from the metric tables so that it cannot drift from the code."""
    from . import wire

    lines = [
        "# greend metrics",
        "",
        "Generated from `greend/exporter.py` and `greend/wire.py` (`greend metrics-doc`); do not edit "
        "by hand. Node daemons export the node and job metrics; agents in site mode add the "
        "`greend_outbox_*` metrics; `greend controller` exports the `greend_controller_*` metrics.",
        "",
        "| metric | type | labels | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, (kind, help_, labels) in sorted({**METRICS, **wire.METRICS}.items()):
        shown = name + "_info" if kind == "info" else name
        lines.append(f"| `{shown}` | {kind} | {', '.join(labels) or '-'} | {help_} |")
    lines += [
        "",
        "A site controller that forwards to an institute controller (`[controller] upstream_url`, "
        "docs/site-mode.md) also exports the `greend_outbox_*` metrics, about its upstream.",
        "",
        "## A national view",
        "",
        "Each site's Prometheus records greend's recording rules (dashboards/prometheus/rules) and "
        "carries a `site` external label (dashboards/prometheus/prometheus.yml). A national "
        "Prometheus federates from every site, with `honor_labels: true`, the per-cluster and "
        "per-account rules only (`match[]={__name__=~\"(cluster|account):greend_.+\"}`, "
        "dashboards/prometheus/prometheus-national.yml): every series keeps its site's `site` "
        "label, per-node, per-job and per-user series stay at the sites. The site overview "
        "dashboard's Site variable and \"Sites\" row answer on it (tests/test_federation.py); "
        "docs/scale.md gives the series counts and samples per second.",
    ]
    return "\n".join(lines) + "\n"
