"""Footprints, for users and project leads: energy, carbon and water by account, user and job, with a
job detail section that the job tables link to (it selects the job through the `job` variable).

Figures come from greend's per-job counters, which greend computes with the factors in force at the
time, so they are exact; a job's energy between its start and its first scrape is not seen by
increase() (a few seconds): the ledger and `greend jobs` are the books of record.
"""

from __future__ import annotations

from .builders import (
    CARBON,
    CARBON_PER_HOUR,
    CORES,
    COUNT,
    JOULE,
    LITRE,
    SECONDS,
    WATT,
    Board,
    Column,
    label_variable,
    query,
    stat_panel,
    table_panel,
    timeseries_panel,
)

UID = "greend-footprints"

F = 'cluster=~"$cluster", account=~"$account", user=~"$user", job_id=~"$job"'
ENERGY = f"greend_job_energy_joules_total{{{F}}}"
FACILITY = f"greend_job_facility_energy_joules_total{{{F}}}"
CARBON_C = f"greend_job_carbon_grams_total{{{F}}}"
WATER = f"greend_job_water_litres_total{{{F}}}"
CPU = f"greend_job_cpu_seconds_total{{{F}}}"

# Links keep the time range and the datasource and select one job (or user) on this dashboard.
_HERE = f"/d/{UID}/greend-footprints?${{__url_time_range}}&${{datasource:queryparam}}"
JOB_LINK = (_HERE + "&var-cluster=${__data.fields.cluster}&var-account=$__all&var-user=$__all"
            "&var-job=${__data.fields.job_id}")
USER_LINK = _HERE + "&${cluster:queryparam}&var-account=$__all&var-user=${__data.fields.user}&var-job=$__all"


def _increase(metric: str, by: str) -> str:
    return f"sum by ({by}) (increase({metric}[$__range]))"


def _totals(by: str) -> list[Column]:
    return [Column("IT energy", JOULE, _increase(ENERGY, by)),
            Column("Facility energy", JOULE, _increase(FACILITY, by)),
            Column("Carbon", CARBON, _increase(CARBON_C, by)),
            Column("Water", LITRE, _increase(WATER, by))]


def build():
    b = Board(UID, "greend: footprints",
              "Energy, carbon and water of jobs by account, user and job. Select a job (or click one "
              "in a table) for its detail at the bottom.", tags=["users"])
    sel = "greend_job_energy_joules_total"
    b.variable(label_variable("cluster", "cluster", sel, "Cluster"))
    b.variable(label_variable("account", "account", f'{sel}{{cluster=~"$cluster"}}', "Account"))
    b.variable(label_variable("user", "user", f'{sel}{{cluster=~"$cluster", account=~"$account"}}',
                              "User"))
    b.variable(label_variable(
        "job", "job_id", f'{sel}{{cluster=~"$cluster", account=~"$account", user=~"$user"}}', "Job"))

    b.row("Totals over the time range")
    b.panel(stat_panel("IT energy", JOULE, query(f"sum(increase({ENERGY}[$__range]))"),
                       "CPU, DRAM, GPU and memory energy attributed to the selected jobs.", width=5))
    b.panel(stat_panel("Facility energy", JOULE, query(f"sum(increase({FACILITY}[$__range]))"),
                       "IT energy x PUE in force.", width=5))
    b.panel(stat_panel("Carbon", CARBON, query(f"sum(increase({CARBON_C}[$__range]))"),
                       "Location-based emissions (gCO2e).", width=5))
    b.panel(stat_panel("Water", LITRE, query(f"sum(increase({WATER}[$__range]))"),
                       "On-site cooling water and off-site water of electricity generation.", width=5))
    b.panel(stat_panel("Jobs", COUNT, query(f"count(count by (cluster, job_id) ({ENERGY}))"),
                       "Jobs (and per-user process groups) seen in the time range.", width=4))

    b.row("By account")
    b.panel(table_panel("Footprint by account", ["cluster", "account"], _totals("cluster, account"),
                        "Over the dashboard's time range.", sort_by="Carbon"))
    b.panel(timeseries_panel(
        "Power by account", WATT,
        query(f"sum by (cluster, account) (rate({ENERGY}[$__rate_interval]))", "{{cluster}} {{account}}"),
        stack=True))
    b.panel(timeseries_panel(
        "Carbon rate by account", CARBON_PER_HOUR,
        query(f"sum by (cluster, account) (rate({CARBON_C}[$__rate_interval])) * 3600",
              "{{cluster}} {{account}}"), stack=True))

    b.row("By user")
    b.panel(table_panel(
        "Footprint by user", ["cluster", "account", "user"], _totals("cluster, account, user"),
        "Over the dashboard's time range. Click a user to select them.",
        links={"user": ("Footprint of ${__data.fields.user}", USER_LINK)}, sort_by="Carbon"))
    b.panel(timeseries_panel(
        "Power by user", WATT,
        query(f"sum by (cluster, user) (rate({ENERGY}[$__rate_interval]))", "{{cluster}} {{user}}"),
        stack=True))
    b.panel(timeseries_panel(
        "Carbon rate by user", CARBON_PER_HOUR,
        query(f"sum by (cluster, user) (rate({CARBON_C}[$__rate_interval])) * 3600",
              "{{cluster}} {{user}}"), stack=True))

    b.row("Jobs")
    labels = "cluster, job_id, kind, user, account, partition"
    b.panel(table_panel(
        "Jobs", ["cluster", "job_id", "kind", "user", "account", "partition"],
        [Column("IT energy", JOULE, f"sum by ({labels}) (max_over_time({ENERGY}[$__range]))"),
         Column("Carbon", CARBON, f"sum by ({labels}) (max_over_time({CARBON_C}[$__range]))"),
         Column("Water", LITRE, f"sum by ({labels}) (max_over_time({WATER}[$__range]))"),
         Column("CPU time", SECONDS, f"sum by ({labels}) (max_over_time({CPU}[$__range]))"),
         Column("Running", COUNT, f"max by ({labels}) (greend_job_running{{{F}}})")],
        "Each job seen in the time range with its totals so far (on every node it ran on). "
        "Running: 1 while it runs, 0 for a while after it ended. Click a job for its detail.",
        height=10, links={"job_id": ("Detail of job ${__data.fields.job_id}", JOB_LINK)},
        sort_by="Carbon"))

    b.row("Job detail ($job)")
    b.panel(timeseries_panel(
        "Power by source", WATT,
        query(f"sum by (cluster, job_id, source) (rate({ENERGY}[$__rate_interval]))",
              "{{cluster}}/{{job_id}} {{source}}"), stack=True))
    b.panel(timeseries_panel(
        "Power by node", WATT,
        query(f"sum by (cluster, job_id, node) (rate({ENERGY}[$__rate_interval]))",
              "{{cluster}}/{{job_id}} {{node}}"), stack=True))
    b.panel(timeseries_panel(
        "Energy so far", JOULE,
        query(f"sum by (cluster, job_id) ({ENERGY})", "{{cluster}}/{{job_id}} IT", ref="A"),
        query(f"sum by (cluster, job_id) ({FACILITY})", "{{cluster}}/{{job_id}} facility", ref="B"),
        width=8))
    b.panel(timeseries_panel(
        "Carbon so far", CARBON, query(f"sum by (cluster, job_id) ({CARBON_C})", "{{cluster}}/{{job_id}}"),
        width=8))
    b.panel(timeseries_panel(
        "Water so far, by scope", LITRE,
        query(f"sum by (cluster, job_id, scope) ({WATER})", "{{cluster}}/{{job_id}} {{scope}}"),
        width=8, description="site: on-site cooling (WUE); offsite: electricity generation (EWIF)."))
    b.panel(timeseries_panel(
        "CPU cores used", CORES,
        query(f"sum by (cluster, job_id) (rate({CPU}[$__rate_interval]))", "{{cluster}}/{{job_id}}"),
        width=24, height=6))
    return b.build()
