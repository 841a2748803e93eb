"""The exporter renders the monitor's typed snapshot (exporter.Snapshot of DomainTotals, JobTotals)."""

from __future__ import annotations

from greend.collectors.base import CollectorStatus

from greend.exporter import NodeCollector, Snapshot
from greend.footprint import Factors
from greend.monitor import DomainTotals, JobTotals


def job(job_id: str, running: bool, **kw) -> JobTotals:
    base = dict(cluster="c1", node="n1", job_id=job_id, user="alice", account="proj", partition="batch",
                kind="slurm", running=running, cpu_uj=2_000_000, dram_uj=0, gpu_uj=5_000_000,
                memory_uj=1_000_000, facility_j=12.0, carbon_g=0.5, water_site_l=0.1,
                water_offsite_l=0.2, cpu_time_ns=3_000_000_000, power_w=4.0 if running else 0.0)
    return JobTotals(**{**base, **kw})


def snapshot() -> Snapshot:
    return Snapshot(
        cluster="c1", node="n1",
        domains=[DomainTotals("package-0", "cpu", "measured: RAPL powercap", 9_000_000, 1_000_000, 500_000,
                              42.0)],
        jobs=[job("1", True), job("2", False, gpu_uj=0)],
        factors={"c1": Factors(1.2, 0.5, 1.6, 56.0), "far": Factors(1.5, 1.8, 2.0, 400.0)},
        collectors=[CollectorStatus("rapl", ok=False, errors_total=3, last_duration_s=0.001)],
        sample_duration_s=0.002, samples=10, checkpoint_errors=0, last_checkpoint=1.7e9,
        gauges=[("greend_gpu_power_watts", {"gpu": "0", "uuid": "GPU-a", "model": "A100"}, 250.0)],
    )


def values(user_label: bool = True) -> dict[tuple, float]:
    out = {}
    for fam in NodeCollector(snapshot, user_label=user_label).collect():
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def find(vals, name, **labels):
    hits = [v for (n, ls), v in vals.items() if n == name and labels.items() <= dict(ls).items()]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def test_named_fields_become_the_right_series():
    v = values()
    assert find(v, "greend_node_energy_joules_total", domain="package-0", method="measured") == 9.0
    assert find(v, "greend_node_power_watts", domain="package-0") == 42.0
    assert find(v, "greend_node_idle_energy_joules_total", domain="package-0") == 0.5
    assert find(v, "greend_job_energy_joules_total", job_id="1", source="gpu") == 5.0
    assert find(v, "greend_job_energy_joules_total", job_id="1", source="memory") == 1.0
    assert not [k for k in v if k[0] == "greend_job_energy_joules_total" and ("source", "dram") in k[1]]
    assert find(v, "greend_job_water_litres_total", job_id="1", scope="offsite") == 0.2
    assert find(v, "greend_job_cpu_seconds_total", job_id="1") == 3.0
    assert find(v, "greend_job_power_watts", job_id="1") == 4.0
    assert find(v, "greend_job_running", job_id="1") == 1.0
    assert find(v, "greend_job_running", job_id="2") == 0.0  # ended, in its grace period
    assert find(v, "greend_jobs_active") == 1
    assert find(v, "greend_factor_carbon_intensity_grams_per_kilowatt_hour", cluster="far") == 400.0
    assert find(v, "greend_factor_pue", cluster="c1") == 1.2
    assert find(v, "greend_collector_up", collector="rapl") == 0.0
    assert find(v, "greend_collector_errors_total", collector="rapl") == 3
    assert find(v, "greend_gpu_power_watts", uuid="GPU-a") == 250.0


def test_user_label_can_be_left_out():
    v = values(user_label=False)
    assert find(v, "greend_job_carbon_grams_total", job_id="1", user="") == 0.5
    assert not [k for k in v if ("user", "alice") in k[1]]
