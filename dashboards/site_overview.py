"""Site overview, for admins: power and energy by tier, cluster and node; carbon and water; the
unattributed and idle share; routing decisions; budgets used per account.

`tier` is a target label set in the Prometheus scrape config (dashboards/prometheus/prometheus.yml);
`site` is each site Prometheus's external label, which a national Prometheus federating the sites'
recording-rule series sees (dashboards/prometheus/prometheus-national.yml, docs/metrics.md). The
first row ("Sites") and the variables read recording-rule series only, so they answer on a site
Prometheus and on the national one; the rows below need the node series of a site Prometheus.
Node-level carbon and water apply the factors in force now (from greend_factor_*) to node energy;
the per-job counters carry the exact figures, computed by greend with the factors in force at the time.
"""

from __future__ import annotations

from .builders import (
    CARBON,
    CARBON_INTENSITY,
    CARBON_PER_HOUR,
    COUNT,
    J_PER_KWH,
    KWH,
    LITRE,
    LITRE_PER_HOUR,
    PER_MINUTE,
    RATIO,
    WATT,
    Board,
    Column,
    bargauge_panel,
    label_variable,
    query,
    stat_panel,
    table_panel,
    timeseries_panel,
)

UID = "greend-site-overview"

N = 'site=~"$site", tier=~"$tier", cluster=~"$cluster", node=~"$node"'
C = 'site=~"$site", tier=~"$tier", cluster=~"$cluster"'
A = 'site=~"$site", cluster=~"$cluster"'  # the per-account rules have no tier
CLUSTER_E = f"cluster:greend_node_energy_joules:rate5m{{{C}}}"
NODE_E = f"greend_node_energy_joules_total{{{N}}}"
UNATTR = f"greend_node_unattributed_energy_joules_total{{{N}}}"
IDLE = f"greend_node_idle_energy_joules_total{{{N}}}"


def _energy_by(by: str, window: str = "$__range") -> str:
    return f"sum by ({by}) (increase({NODE_E}[{window}]))"


def build():
    b = Board(UID, "greend: site overview",
              "Power, energy, carbon and water of the site by tier, cluster and node; the share not "
              "attributed to jobs; routing decisions and budgets.", tags=["admin"])
    # Site, tier and cluster from a recording rule: a national Prometheus has them too.
    b.variable(label_variable("site", "site", "cluster:greend_node_energy_joules:rate5m", "Site"))
    b.variable(label_variable("tier", "tier", 'cluster:greend_node_energy_joules:rate5m{site=~"$site"}',
                              "Tier"))
    b.variable(label_variable("cluster", "cluster", 'cluster:greend_node_energy_joules:rate5m'
                              '{site=~"$site", tier=~"$tier"}', "Cluster"))
    b.variable(label_variable("node", "node", f"greend_node_energy_joules_total{{{C}}}", "Node"))

    b.row("Sites (recording rules: also on a national Prometheus)")
    b.panel(timeseries_panel(
        "IT power by site and tier", WATT,
        query(f"sum by (site, tier) ({CLUSTER_E})", "{{site}} {{tier}}"), stack=True,
        description="From cluster:greend_node_energy_joules:rate5m. `site` is each site "
        "Prometheus's external label (empty on a site's own Prometheus)."))
    b.panel(timeseries_panel(
        "Carbon emission rate by site", CARBON_PER_HOUR,
        query(f"sum by (site) (cluster:greend_node_carbon_grams:rate5m{{{C}}}) * 3600", "{{site}}"),
        stack=True, description="Node energy x PUE x carbon intensity in force, per site."))
    b.panel(timeseries_panel(
        "Water consumption rate by site", LITRE_PER_HOUR,
        query(f"sum by (site) (cluster:greend_node_water_litres:rate5m{{{C}}}) * 3600", "{{site}}"),
        stack=True, width=8))
    b.panel(timeseries_panel(
        "Share not attributed to jobs, by site", RATIO,
        query(f"sum by (site) (cluster:greend_node_unattributed_energy_joules:rate5m{{{C}}}) / "
              f"sum by (site) ({CLUSTER_E})", "{{site}}"), width=8))
    b.panel(timeseries_panel(
        "Jobs' carbon by site and account", CARBON,
        query(f"sum by (site, account) (account:greend_job_carbon_grams:increase5m{{{A}}})",
              "{{site}} {{account}}"), stack=True, width=8,
        description="Grams CO2e of the account's jobs per 5 minutes (account:...:increase5m), "
        "exact: the factors in force when the energy was used."))
    b.panel(table_panel(
        "Jobs by site, cluster and account, last 5 minutes", ["site", "cluster", "account"],
        [Column("IT energy", KWH, f"sum by (site, cluster, account) "
                f"(account:greend_job_energy_joules:increase5m{{{A}}}) / {J_PER_KWH}"),
         Column("Carbon", CARBON, f"sum by (site, cluster, account) "
                f"(account:greend_job_carbon_grams:increase5m{{{A}}})"),
         Column("Water", LITRE, f"sum by (site, cluster, account) "
                f"(account:greend_job_water_litres:increase5m{{{A}}})")],
        "From the account:...:increase5m rules (the last day: the :increase1d rules, the "
        "footprints dashboard and the ledger).", sort_by="Carbon"))

    b.row("Power and energy")
    b.panel(stat_panel("IT power", WATT, query(f"sum(rate({NODE_E}[$__rate_interval]))"),
                       "IT power of the selected nodes now (all domains: CPU, DRAM, GPU, memory)."))
    b.panel(stat_panel("IT energy", KWH, query(f"sum(increase({NODE_E}[$__range])) / {J_PER_KWH}"),
                       "IT energy of the selected nodes over the dashboard's time range."))
    b.panel(stat_panel(
        "Facility energy", KWH,
        query(f"sum({_energy_by('cluster')} * on (cluster) cluster:greend_factor_pue:max) / {J_PER_KWH}"),
        "IT energy x the PUE in force now, over the time range."))
    b.panel(stat_panel(
        "Not attributed to jobs", RATIO,
        query(f"sum(increase({UNATTR}[$__range])) / sum(increase({NODE_E}[$__range]))"),
        "Share of node energy over the time range that no job was charged: idle power (unless "
        "the idle rule shares it among jobs), processes outside jobs, greend itself."))
    b.panel(stat_panel("Slurm jobs running", COUNT, query(
        f'count(count by (cluster, job_id) (greend_job_running{{{N}, kind="slurm"}} == 1))'),
        "Distinct Slurm jobs running on the selected nodes now."))
    b.panel(stat_panel("Nodes reporting", COUNT, query(
        f"count(count by (cluster, node) ({NODE_E}))"),
        "Nodes whose greend exports energy counters."))
    b.panel(timeseries_panel(
        "IT power by tier", WATT,
        query(f"sum by (tier) (rate({NODE_E}[$__rate_interval]))", "{{tier}}"), stack=True,
        description="Tier comes from the scrape config's target labels."))
    b.panel(timeseries_panel(
        "IT power by cluster", WATT,
        query(f"sum by (cluster) (rate({NODE_E}[$__rate_interval]))", "{{cluster}}"), stack=True))
    b.panel(timeseries_panel(
        "IT power by node", WATT,
        query(f"sum by (cluster, node) (rate({NODE_E}[$__rate_interval]))", "{{cluster}} {{node}}")))
    b.panel(timeseries_panel(
        "IT power by source and method", WATT,
        query(f"sum by (source, method) (rate({NODE_E}[$__rate_interval]))", "{{source}} ({{method}})"),
        stack=True,
        description="measured: RAPL or NVML counters; modelled: TDP or memory model "
        "(docs/methodology.md)."))
    b.panel(bargauge_panel(
        "IT energy by tier", KWH, query(f"{_energy_by('tier')} / {J_PER_KWH}", "{{tier}}"),
        "Over the dashboard's time range.", width=8))
    b.panel(table_panel(
        "Energy by cluster and node", ["tier", "cluster", "node"],
        [Column("IT energy", KWH, f"{_energy_by('tier, cluster, node')} / {J_PER_KWH}"),
         Column("Not attributed", RATIO,
                f"sum by (tier, cluster, node) (increase({UNATTR}[$__range])) / "
                f"{_energy_by('tier, cluster, node')}"),
         Column("Idle", RATIO,
                f"sum by (tier, cluster, node) (increase({IDLE}[$__range])) / "
                f"{_energy_by('tier, cluster, node')}")],
        "Over the dashboard's time range.", width=16, sort_by="IT energy"))

    b.panel(timeseries_panel(
        "GPU power", WATT,
        query('sum by (instance, gpu, model) (greend_gpu_power_watts{tier=~"$tier"})',
              "{{instance}} GPU {{gpu}} ({{model}})"),
        description="NVML power draw of each GPU (nodes with NVIDIA GPUs only)."))
    b.panel(timeseries_panel(
        "GPU utilisation", RATIO,
        query('avg by (instance, gpu, model) (greend_gpu_utilization_ratio{tier=~"$tier"})',
              "{{instance}} GPU {{gpu}} ({{model}})"),
        description="NVML utilisation of each GPU (nodes with NVIDIA GPUs only)."))

    b.row("Carbon and water")
    b.panel(stat_panel(
        "Carbon", CARBON,
        query(f"sum({_energy_by('cluster')} * on (cluster) cluster:greend_carbon_grams_per_it_joule:max)"),
        "Location-based emissions of all node energy over the time range (IT energy x PUE x carbon "
        "intensity, factors in force now).", width=6))
    b.panel(stat_panel(
        "Water", LITRE,
        query(f"sum({_energy_by('cluster')} * on (cluster) cluster:greend_water_litres_per_it_joule:max)"),
        "On-site (WUE) and off-site (electricity generation) water over the time range, factors "
        "in force now.", width=6))
    b.panel(stat_panel(
        "Carbon of jobs", CARBON, query(f"sum(increase(greend_job_carbon_grams_total{{{N}}}[$__range]))"),
        "Attributed to jobs over the time range, exact (factors in force at the time).", width=6))
    b.panel(stat_panel(
        "Water of jobs", LITRE, query(f"sum(increase(greend_job_water_litres_total{{{N}}}[$__range]))"),
        "Attributed to jobs over the time range, exact (factors in force at the time).", width=6))
    b.panel(timeseries_panel(
        "Carbon emission rate by cluster", CARBON_PER_HOUR,
        query(f"sum by (site, cluster) (cluster:greend_node_carbon_grams:rate5m{{{C}}}) * 3600",
              "{{site}} {{cluster}}"),
        stack=True, description="From the recording rule cluster:greend_node_carbon_grams:rate5m."))
    b.panel(timeseries_panel(
        "Water consumption rate by cluster", LITRE_PER_HOUR,
        query(f"sum by (site, cluster) (cluster:greend_node_water_litres:rate5m{{{C}}}) * 3600",
              "{{site}} {{cluster}}"),
        stack=True, description="From the recording rule cluster:greend_node_water_litres:rate5m."))
    b.panel(timeseries_panel(
        "Carbon intensity in force", CARBON_INTENSITY,
        query("max by (cluster) "
              '(greend_factor_carbon_intensity_grams_per_kilowatt_hour{cluster=~"$cluster"})', "{{cluster}}"),
        width=8))
    b.panel(table_panel(
        "Carbon and water by cluster", ["tier", "cluster"],
        [Column("Carbon", CARBON, f"sum by (tier, cluster) ({_energy_by('tier, cluster')} "
                "* on (cluster) group_left cluster:greend_carbon_grams_per_it_joule:max)"),
         Column("Water", LITRE, f"sum by (tier, cluster) ({_energy_by('tier, cluster')} "
                "* on (cluster) group_left cluster:greend_water_litres_per_it_joule:max)"),
         Column("Carbon of jobs", CARBON,
                f"sum by (tier, cluster) (increase(greend_job_carbon_grams_total{{{N}}}[$__range]))"),
         Column("Water of jobs", LITRE,
                f"sum by (tier, cluster) (increase(greend_job_water_litres_total{{{N}}}[$__range]))")],
        "Over the dashboard's time range; node totals with the factors in force now, job totals "
        "exact.", width=16, sort_by="Carbon"))

    b.row("Not attributed and idle")
    b.panel(timeseries_panel(
        "Share of node power not attributed to jobs", RATIO,
        query(f"sum(rate({UNATTR}[$__rate_interval])) / sum(rate({NODE_E}[$__rate_interval]))",
              "not attributed", ref="A"),
        query(f"sum(rate({IDLE}[$__rate_interval])) / sum(rate({NODE_E}[$__rate_interval]))", "idle",
              ref="B"),
        description="Idle: the node's idle power; charged to jobs or not per [attribution] "
        "idle_power. Not attributed: what no job was charged."))
    b.panel(timeseries_panel(
        "Power not attributed, by cluster", WATT,
        query(f"sum by (cluster) (rate({UNATTR}[$__rate_interval]))", "{{cluster}}"), stack=True))

    b.row("Routing (policy engine)")
    b.panel(timeseries_panel(
        "Routing decisions by tier and outcome", PER_MINUTE,
        query('sum by (tier, outcome) (rate(greend_route_decisions_total{cluster=~"$cluster"}'
              "[$__rate_interval])) * 60", "{{tier}}: {{outcome}}"), stack=True,
        description="Outcome: submitted, deferred (--begin), refused (budget), no cluster. Each "
                    "decision's full reasons are in `greend route` and the TUI's job screen."))
    b.panel(timeseries_panel(
        "Overflow to another tier", PER_MINUTE,
        query("sum(rate(greend_route_overflow_total[$__rate_interval])) * 60", "overflow"),
        description="Jobs sent to a higher tier because the preferred one was full or closed."))
    b.panel(table_panel(
        "Routing decisions", ["tier", "cluster", "outcome"],
        [Column("Decisions", COUNT, 'sum by (tier, cluster, outcome) (increase(greend_route_decisions_total'
                '{cluster=~"$cluster"}[$__range]))')],
        "Over the dashboard's time range.", width=16, sort_by="Decisions"))
    b.panel(stat_panel(
        "Overflow share", RATIO,
        query("sum(increase(greend_route_overflow_total[$__range])) / "
              "sum(increase(greend_route_decisions_total[$__range]))"),
        "Share of routing decisions that overflowed, over the time range.", width=8, height=8))

    b.row("Budgets")
    b.panel(bargauge_panel(
        "Budget used per account", RATIO,
        query("max by (account, resource) (greend_budget_used_ratio)", "{{account}} {{resource}}"),
        "Share of each account's budget used in the current budget period.",
        thresholds=[(None, "green"), (0.8, "orange"), (1.0, "red")], max_value=1.0))
    b.panel(timeseries_panel(
        "Budget used over time", RATIO,
        query("max by (account, resource) (greend_budget_used_ratio)", "{{account}} {{resource}}")))
    return b.build()
