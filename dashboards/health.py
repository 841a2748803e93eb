"""greend health, for admins: targets up, collectors, sampling and scrape durations, checkpoints, the
daemon's own footprint, and site mode (agents reporting to the controller, outbox backlog).

Scrape jobs are expected to be named greend-* (dashboards/prometheus/prometheus.yml does so).
"""

from __future__ import annotations

from .builders import (
    BYTES,
    CORES,
    COUNT,
    PER_MINUTE,
    SECONDS,
    YES_NO,
    Board,
    Column,
    label_variable,
    query,
    stat_panel,
    table_panel,
    timeseries_panel,
)

UID = "greend-health"

I = 'instance=~"$instance"'  # noqa: E741 - the Prometheus label it filters on
UP = f'up{{job=~"greend.*", {I}}}'
RED_FROM_1 = [(None, "green"), (1, "red")]


def build():
    b = Board(UID, "greend: health",
              "Is every greend scraped, sampling and checkpointing; collectors, durations, and site "
              "mode's agents and outboxes.", tags=["admin"])
    b.variable(label_variable("instance", "instance", 'up{job=~"greend.*"}', "Instance"))

    b.row("Targets")
    b.panel(stat_panel("Targets up", COUNT, query(f"sum({UP})"),
                       "greend node agents and controllers that Prometheus scrapes successfully."))
    b.panel(stat_panel("Targets down", COUNT, query(f"count({UP}) - sum({UP})"),
                       "Scrape targets of greend-* jobs that fail.", thresholds=RED_FROM_1))
    b.panel(stat_panel(
        "Nodes without energy data", COUNT,
        query(f"count(greend_samples_total{{{I}}}) - "
              f"count(count by (instance) (greend_node_energy_joules_total{{{I}}}))"),
        "Node agents that sample but export no energy counter (no readable source and no model).",
        thresholds=RED_FROM_1))
    b.panel(stat_panel("Collectors failing", COUNT,
                       query(f"count(greend_collector_up{{{I}}}) - sum(greend_collector_up{{{I}}})"),
                       "Collectors whose last read failed.", thresholds=RED_FROM_1))
    b.panel(stat_panel("Agents reporting to the controller", COUNT,
                       query("sum(greend_controller_agents_reporting)"),
                       "Site mode: agents the controller heard from recently (controller.agent_stale_s)."))
    b.panel(stat_panel("Outbox backlog", COUNT, query(f"sum(greend_outbox_records{{{I}}})"),
                       "Site mode: job records waiting on agents to be sent to the controller.",
                       thresholds=[(None, "green"), (10000, "orange")]))

    b.row("Collectors and sampling")
    b.panel(table_panel(
        "Collectors", ["instance", "collector"],
        [Column("Up", YES_NO, f"greend_collector_up{{{I}}}"),
         Column("Last read", SECONDS, f"greend_collector_duration_seconds{{{I}}}"),
         Column("Errors", COUNT, f"greend_collector_errors_total{{{I}}}")],
        "Present collectors (absent sources are not listed).", width=12, height=8))
    b.panel(timeseries_panel(
        "Collector errors", COUNT,
        query(f"sum by (instance, collector) (increase(greend_collector_errors_total{{{I}}}"
              "[$__rate_interval]))", "{{instance}} {{collector}}")))
    b.panel(timeseries_panel(
        "Collector read duration", SECONDS,
        query(f"greend_collector_duration_seconds{{{I}}}", "{{instance}} {{collector}}"), width=8))
    b.panel(timeseries_panel(
        "Sample duration", SECONDS, query(f"greend_sample_duration_seconds{{{I}}}", "{{instance}}"),
        width=8, description="Duration of one sampling tick: all collectors, attribution, books."))
    b.panel(timeseries_panel(
        "Sampling ticks", PER_MINUTE,
        query(f"rate(greend_samples_total{{{I}}}[$__rate_interval]) * 60", "{{instance}}"), width=8))

    b.row("Scrapes and checkpoints")
    b.panel(timeseries_panel(
        "Scrape duration", SECONDS, query(f"scrape_duration_seconds{{job=~\"greend.*\", {I}}}",
                                          "{{instance}}"), width=8))
    b.panel(timeseries_panel(
        "Samples per scrape", COUNT,
        query(f"scrape_samples_scraped{{job=~\"greend.*\", {I}}}", "{{instance}}"), width=8,
        description="Series in one scrape: grows with the jobs on the node (and finished jobs "
        "during daemon.finished_job_grace_s)."))
    b.panel(timeseries_panel(
        "Jobs running per node", COUNT, query(f"greend_jobs_active{{{I}}}", "{{cluster}} {{node}}"),
        width=8))
    b.panel(timeseries_panel(
        "Time since the last ledger checkpoint", SECONDS,
        query(f"time() - greend_last_checkpoint_timestamp_seconds{{{I}}}", "{{instance}}"), width=12))
    b.panel(timeseries_panel(
        "Ledger checkpoint errors", COUNT,
        query(f"increase(greend_checkpoint_errors_total{{{I}}}[$__rate_interval])", "{{instance}}"),
        width=12))

    b.row("The daemon itself")
    b.panel(timeseries_panel(
        "greend CPU", CORES,
        query(f"rate(process_cpu_seconds_total{{{I}}}[$__rate_interval])", "{{instance}}"),
        width=8))
    b.panel(timeseries_panel(
        "greend resident memory", BYTES,
        query(f"process_resident_memory_bytes{{{I}}}", "{{instance}}"), width=8))
    b.panel(table_panel(
        "Versions", ["version", "python"],
        [Column("Instances", COUNT, f"count by (version, python) (greend_build_info{{{I}}})")],
        width=8, height=8))

    b.row("Site mode")
    b.panel(timeseries_panel(
        "Agents reporting to the controller", COUNT,
        query("sum by (instance) (greend_controller_agents_reporting)", "{{instance}}")))
    b.panel(timeseries_panel(
        "Outbox backlog by agent", COUNT,
        query(f"sum by (instance) (greend_outbox_records{{{I}}})", "{{instance}}")))
    return b.build()
