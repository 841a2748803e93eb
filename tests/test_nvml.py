"""GPU energy through NVML: counters, power integration, failures, and the per-job split.

NVML is faked at the pynvml function boundary (fake_nvml.py), so the collector makes the same calls
it makes on real hardware and meets the same structures and NVMLError subclasses.
"""

from __future__ import annotations

import pynvml
import pytest
from fake_nvml import GPU_IS_LOST, UNKNOWN, FakeGpu, FakeNvml
from fixtures import FakeJobs, make_procfs
from greend.collectors.base import SourceUnavailable
from greend.collectors.cgroups import SlurmCgroups
from greend.collectors.nvml import PROV_COUNTER, PROV_INTEGRATED, PROV_MIG, NvmlCollector
from greend.collectors.procscan import ProcScan
from hypothesis import given, settings
from hypothesis import strategies as st

from greend import config as config_mod
from greend.attribution import CpuInterval, counter_delta, split_domain
from greend.ledger import Ledger
from greend.monitor import Monitor

J = 1_000_000  # µJ per joule


def make(monkeypatch, *gpus: FakeGpu, **kw) -> tuple[FakeNvml, NvmlCollector]:
    fake = FakeNvml(list(gpus), **kw).install(monkeypatch)
    return fake, NvmlCollector(clock=fake.monotonic)


def by_domain(counters):
    return {c.domain: c for c in counters}


def interval(rule: str = "allocated") -> CpuInterval:
    return CpuInterval(active_ticks=0, total_ticks=0, ncpu=8, tick_ns=10_000_000, job_cpu_ns={},
                       job_alloc_cpus={}, idle_rule=rule)


def jobs(*keys: str, gpus: dict[str, str] | None = None):
    src = FakeJobs()
    out = []
    for k in keys:
        _, cluster, job_id = k.split("/")
        src.add(job_id, cluster=cluster)
    for u in src.read():
        if gpus and u.job_id in gpus:
            u.meta["gpus"] = gpus[u.job_id]
        out.append(u)
    return out


def tick(fake: FakeNvml, nvml: NvmlCollector, seconds: float):
    """Two reads `seconds` apart; returns {domain: (counter, energy_uj)} of the second."""
    before = by_domain(nvml.read())
    fake.advance(seconds)
    after = by_domain(nvml.read())
    return {d: (c, counter_delta(before[d].value_uj, c.value_uj, c.max_range_uj))
            for d, c in after.items() if d in before}


# -- energy ---------------------------------------------------------------------------------------
def test_energy_counter_delta_on_a_volta_or_newer_gpu(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=250.0))
    (c, e), = tick(fake, nvml, 10.0).values()
    assert (c.domain, c.source, c.max_range_uj, c.provenance) == ("gpu-0", "gpu", None, PROV_COUNTER)
    assert e == 2500 * J  # 250 W for 10 s, mJ counter converted to µJ
    assert c.value_uj == int(fake.gpus[0].energy_mj) * 1000
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 2  # for the gauge only


def test_no_energy_counter_integrates_power_with_the_trapezoid_rule(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-p", name="Tesla P100-PCIE-16GB", energy_counter=False,
                                           power_w=100.0))
    first = nvml.read()[0]
    assert first.provenance == PROV_INTEGRATED
    fake.advance(10.0)
    fake.gpus[0].power_w = 300.0
    second = nvml.read()[0]
    assert second.value_uj - first.value_uj == 2000 * J  # (100 W + 300 W) / 2 x 10 s
    fake.advance(5.0)
    third = nvml.read()[0]
    assert third.value_uj - second.value_uj == 1500 * J  # 300 W x 5 s
    # the counter that NVML lacks is never read again after the probe said NOT_SUPPORTED
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1


def test_counter_that_loses_support_switches_to_integration(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=200.0))
    assert nvml.read()[0].provenance == PROV_COUNTER
    fake.gpus[0].energy_counter = False
    c = nvml.read()[0]
    assert c.provenance == PROV_INTEGRATED
    fake.advance(2.0)
    assert nvml.read()[0].value_uj - c.value_uj == 400 * J


def test_counter_reset_by_a_driver_reload_counts_only_what_came_after(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=100.0, energy_mj=9_000_000.0))
    before = nvml.read()[0]
    fake.gpus[0].energy_mj = 0.0  # driver reloaded
    fake.advance(3.0)
    after = nvml.read()[0]
    assert after.value_uj < before.value_uj
    assert counter_delta(before.value_uj, after.value_uj, after.max_range_uj) == 300 * J


def test_an_error_on_one_gpu_does_not_stop_the_others(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=100.0), FakeGpu("GPU-b", power_w=200.0),
                      FakeGpu("GPU-c", power_w=300.0))
    nvml.read()
    fake.gpus[1].failures["nvmlDeviceGetTotalEnergyConsumption"] = GPU_IS_LOST
    fake.advance(1.0)
    got = by_domain(nvml.read())
    assert sorted(got) == ["gpu-0", "gpu-2"]
    assert nvml.errors_total == 1 and nvml.device_errors == {1: 1}
    assert "gpu-1" in nvml.last_error
    assert {lab["gpu"] for _, lab, _ in nvml.gauges()} == {"0", "2"}
    del fake.gpus[1].failures["nvmlDeviceGetTotalEnergyConsumption"]
    fake.advance(1.0)
    assert sorted(by_domain(nvml.read())) == ["gpu-0", "gpu-1", "gpu-2"]


def test_a_failing_gauge_or_process_call_does_not_drop_the_energy(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=100.0))
    fake.gpus[0].failures["nvmlDeviceGetComputeRunningProcesses"] = UNKNOWN
    fake.gpus[0].failures["nvmlDeviceGetTemperature"] = UNKNOWN
    (_, e), = tick(fake, nvml, 1.0).values()
    assert e == 100 * J
    assert nvml.errors_total == 4  # two calls on each of the two reads
    assert "greend_gpu_temperature_celsius" not in {n for n, _, _ in nvml.gauges()}


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_no_driver_is_source_unavailable(monkeypatch, code):
    FakeNvml([FakeGpu("GPU-a")], init_error=code).install(monkeypatch)
    with pytest.raises(SourceUnavailable, match="no NVIDIA driver"):
        NvmlCollector()


def test_no_gpu_is_source_unavailable_and_nvml_is_shut_down(monkeypatch):
    fake = FakeNvml([]).install(monkeypatch)
    with pytest.raises(SourceUnavailable, match="no GPU"):
        NvmlCollector()
    assert fake.initialised == 0


def test_real_pynvml_without_a_driver_is_source_unavailable():
    # This machine has no NVIDIA library: the unpatched bindings must end the same way.
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover - only on a GPU machine
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present")
    with pytest.raises(SourceUnavailable):
        NvmlCollector()


def test_close_shuts_nvml_down_once(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a"))
    assert fake.initialised == 1
    nvml.close()
    nvml.close()
    assert fake.initialised == 0 and fake.calls["nvmlShutdown"] == 1


# -- gauges ---------------------------------------------------------------------------------------
def test_gauges_come_from_the_last_read_without_calling_nvml(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", name="NVIDIA H100 80GB HBM3", power_w=350.5,
                                           util=75, memory_used=3 << 30, power_limit_w=700.0,
                                           temperature_c=61))
    nvml.read()
    calls = sum(fake.calls.values())
    g = {name: (labels, value) for name, labels, value in nvml.gauges()}
    assert sum(fake.calls.values()) == calls
    labels = {"gpu": "0", "uuid": "GPU-a", "model": "NVIDIA H100 80GB HBM3"}
    assert g == {
        "greend_gpu_power_watts": (labels, 350.5),
        "greend_gpu_utilization_ratio": (labels, 0.75),
        "greend_gpu_memory_used_bytes": (labels, float(3 << 30)),
        "greend_gpu_power_limit_watts": (labels, 700.0),
        "greend_gpu_temperature_celsius": (labels, 61.0),
    }


# -- the per-job split ----------------------------------------------------------------------------
OWNERS = {10: "slurm/c1/1", 11: "slurm/c1/1", 20: "slurm/c1/2", 30: None}


@pytest.mark.parametrize("rule", ["allocated", "unattributed"])
def test_one_job_on_a_gpu_gets_all_its_energy(monkeypatch, rule):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=200.0, util=40))
    fake.gpus[0].add_process(10, sm=40)
    fake.gpus[0].add_process(11, sm=0, graphics=True)
    (c, e), = tick(fake, nvml, 10.0).values()
    d = nvml.split_hint(c, e, jobs("slurm/c1/1", "slurm/c1/2"), {}, interval(rule), OWNERS.get)
    s = split_domain(d)
    assert s.jobs == {"slurm/c1/1": 2000 * J}
    assert s.unattributed_uj == 0
    assert s.idle_uj == 1200 * J  # 60 % idle, booked as such but still the job's
    assert s.provenance == PROV_COUNTER


@pytest.mark.parametrize("rule", ["allocated", "unattributed"])
def test_two_jobs_sharing_a_gpu_split_active_by_sm_and_idle_by_the_rule(monkeypatch, rule):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=200.0, util=80))
    fake.gpus[0].add_process(10, sm=45)
    fake.gpus[0].add_process(11, sm=15)  # same job as 10: 60 in all
    fake.gpus[0].add_process(20, sm=20)
    (c, e), = tick(fake, nvml, 10.0).values()
    assert e == 2000 * J
    s = split_domain(nvml.split_hint(c, e, jobs("slurm/c1/1", "slurm/c1/2"), {}, interval(rule),
                                     OWNERS.get))
    # active 80 % = 1600 J, split 60:20; idle 400 J
    if rule == "allocated":
        assert s.jobs == {"slurm/c1/1": 1400 * J, "slurm/c1/2": 600 * J}
        assert s.unattributed_uj == 0
    else:
        assert s.jobs == {"slurm/c1/1": 1200 * J, "slurm/c1/2": 400 * J}
        assert s.unattributed_uj == 400 * J
    assert sum(s.jobs.values()) + s.unattributed_uj == e


def test_activity_of_a_process_outside_any_job_stays_unattributed(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=100.0, util=100))
    fake.gpus[0].add_process(10, sm=50)
    fake.gpus[0].add_process(30, sm=50)  # no job owns it
    (c, e), = tick(fake, nvml, 10.0).values()
    s = split_domain(nvml.split_hint(c, e, jobs("slurm/c1/1"), {}, interval(), OWNERS.get))
    assert s.jobs == {"slurm/c1/1": 500 * J}
    assert s.unattributed_uj == 500 * J


def test_samples_are_counted_once_per_interval(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=100.0, util=100))
    a = fake.gpus[0].add_process(10, sm=90)
    nvml.read()
    fake.advance(10.0)  # job 1 alone, busy
    nvml.read()
    a.sm = 10
    fake.gpus[0].add_process(20, sm=30)
    before = nvml.read()[0]
    fake.advance(10.0)
    c = nvml.read()[0]
    e = counter_delta(before.value_uj, c.value_uj, None)
    s = split_domain(nvml.split_hint(c, e, jobs("slurm/c1/1", "slurm/c1/2"), {}, interval(),
                                     OWNERS.get))
    assert s.jobs == {"slurm/c1/1": 250 * J, "slurm/c1/2": 750 * J}  # 10:30, nothing older


def test_shared_gpu_without_samples_splits_equally(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=100.0, util=50))
    fake.gpus[0].add_process(10, sm=0)
    fake.gpus[0].add_process(20, sm=0)
    (c, e), = tick(fake, nvml, 10.0).values()
    s = split_domain(nvml.split_hint(c, e, jobs("slurm/c1/1", "slurm/c1/2"), {}, interval(),
                                     OWNERS.get))
    assert s.jobs == {"slurm/c1/1": 500 * J, "slurm/c1/2": 500 * J}


def test_a_gpu_without_a_job_is_unattributed(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=80.0))
    fake.gpus[0].add_process(30, sm=10)
    (c, e), = tick(fake, nvml, 10.0).values()
    s = split_domain(nvml.split_hint(c, e, jobs("slurm/c1/1"), {}, interval(), OWNERS.get))
    assert s.jobs == {} and s.unattributed_uj == 800 * J


def test_a_job_whose_owner_is_not_running_here_gets_nothing(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=80.0))
    fake.gpus[0].add_process(20, sm=10)
    (c, e), = tick(fake, nvml, 10.0).values()
    s = split_domain(nvml.split_hint(c, e, jobs("slurm/c1/1"), {}, interval(), OWNERS.get))
    assert s.jobs == {} and s.unattributed_uj == e  # job 2 is not among the node's jobs


def test_allocation_by_index_or_uuid_holds_a_gpu(monkeypatch):
    fake, nvml = make(monkeypatch, FakeGpu("GPU-a", power_w=100.0), FakeGpu("GPU-b", power_w=50.0))
    got = tick(fake, nvml, 10.0)
    js = jobs("slurm/c1/1", "slurm/c1/2", gpus={"1": "0", "2": " GPU-b "})
    s0 = split_domain(nvml.split_hint(*got["gpu-0"], js, {}, interval(), None))
    s1 = split_domain(nvml.split_hint(*got["gpu-1"], js, {}, interval(), None))
    assert s0.jobs == {"slurm/c1/1": 1000 * J}
    assert s1.jobs == {"slurm/c1/2": 500 * J}


@settings(max_examples=200, deadline=None)
@given(
    sms=st.lists(st.integers(0, 100), min_size=0, max_size=5),
    unowned=st.integers(0, 100),
    util=st.integers(0, 100),
    power=st.floats(1.0, 1000.0),
    seconds=st.floats(0.2, 60.0),
    rule=st.sampled_from(["allocated", "unattributed"]),
)
def test_jobs_plus_unattributed_is_always_the_measured_energy(sms, unowned, util, power, seconds, rule):
    mp = pytest.MonkeyPatch()
    try:
        fake, nvml = make(mp, FakeGpu("GPU-a", power_w=power, util=util))
        owners = {}
        for i, sm in enumerate(sms):
            fake.gpus[0].add_process(100 + i, sm=sm)
            owners[100 + i] = f"slurm/c1/{i % 3}"
        if unowned:
            fake.gpus[0].add_process(999, sm=unowned)
        (c, e), = tick(fake, nvml, seconds).values()
        keys = sorted(set(owners.values()))
        s = split_domain(nvml.split_hint(c, e, jobs(*keys), {}, interval(rule), owners.get))
        assert all(v >= 0 for v in s.jobs.values()) and s.unattributed_uj >= 0
        assert sum(s.jobs.values()) + s.unattributed_uj == e
        if len(keys) == 1 and not unowned:
            assert s.jobs == {keys[0]: e}
    finally:
        mp.undo()


# -- MIG ------------------------------------------------------------------------------------------
def mig_gpu() -> FakeGpu:
    g = FakeGpu("GPU-m", name="NVIDIA A100-SXM4-80GB", power_w=350.0, mig_capable=True, mig=True,
                util=99)
    g.add_mig("MIG-3g", 3).add_process(10)
    g.add_mig("MIG-2g", 2).add_process(20)
    g.add_mig("MIG-1g-a", 1)  # an instance nobody uses
    g.add_mig("MIG-1g-b", 1).add_process(30)  # used by a process outside any job
    return g


def test_mig_gpu_is_split_by_the_slices_each_job_holds(monkeypatch):
    fake, nvml = make(monkeypatch, mig_gpu())
    (c, e), = tick(fake, nvml, 10.0).values()
    assert e == 3500 * J  # the whole GPU's counter works under MIG
    for rule in ("allocated", "unattributed"):
        s = split_domain(nvml.split_hint(c, e, jobs("slurm/c1/1", "slurm/c1/2"), {}, interval(rule),
                                         OWNERS.get))
        assert s.jobs == {"slurm/c1/1": 1500 * J, "slurm/c1/2": 1000 * J}  # 3/7 and 2/7
        assert s.unattributed_uj == 1000 * J  # idle instance, unowned instance
        assert s.provenance == f"{PROV_COUNTER}; {PROV_MIG}"
    # what NVML does not offer under MIG is not asked for
    assert fake.calls["nvmlDeviceGetProcessUtilization"] == 0
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == 0
    assert "greend_gpu_utilization_ratio" not in {n for n, _, _ in nvml.gauges()}


def test_mig_allocation_by_instance_uuid_and_shared_instances(monkeypatch):
    fake, nvml = make(monkeypatch, mig_gpu())
    fake.gpus[0].mig_devices[0].add_process(20)  # job 2 also runs in the 3g instance
    (c, e), = tick(fake, nvml, 10.0).values()
    js = jobs("slurm/c1/1", "slurm/c1/2", "slurm/c1/3", gpus={"3": "MIG-1g-a"})
    s = split_domain(nvml.split_hint(c, e, js, {}, interval(), OWNERS.get))
    # 3g shared by jobs 1 and 2 (1.5 slices each), 2g job 2, 1g-a job 3 by allocation
    assert s.jobs == {"slurm/c1/1": 750 * J, "slurm/c1/2": 1750 * J, "slurm/c1/3": 500 * J}
    assert s.unattributed_uj == 500 * J


def test_mig_instance_attributes_are_read_once(monkeypatch):
    fake, nvml = make(monkeypatch, mig_gpu())
    for _ in range(3):
        nvml.read()
    assert fake.calls["nvmlDeviceGetAttributes"] == 4


# -- owners of processes --------------------------------------------------------------------------
def test_procscan_and_cgroups_tell_a_process_owner(tmp_path):
    proc = make_procfs(tmp_path / "proc")
    proc.add_process(4242, env={"SLURM_JOB_ID": "77"})
    scan = ProcScan(proc.root, "c1")
    scan.read()
    assert scan.owner_of(4242) == "slurm/c1/77"
    assert scan.owner_of(5555) is None
    scan.close()

    (tmp_path / "cg" / "cgroup.controllers").parent.mkdir()
    (tmp_path / "cg" / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cg" / "system.slice" / "slurmstepd.scope").mkdir(parents=True)
    cg = SlurmCgroups(tmp_path / "cg", "c1", "n1")
    cg.procfs = proc.root
    (proc.root / "4242" / "cgroup").write_text(
        "0::/system.slice/slurmstepd.scope/job_91/step_0/user/task_0\n")
    (proc.root / "4243").mkdir()
    (proc.root / "4243" / "cgroup").write_text(
        "12:memory:/slurm_n1/uid_1000/job_92/step_batch\n4:cpuacct,cpu:/slurm_n1/uid_1000/job_92\n")
    (proc.root / "4244").mkdir()
    (proc.root / "4244" / "cgroup").write_text("0::/user.slice/user-1000.slice/session-3.scope\n")
    assert cg.owner_of(4242) == "slurm/c1/91"
    assert cg.owner_of(4243) == "slurm/c1/92"
    assert cg.owner_of(4244) is None
    assert cg.owner_of(9999) is None


# -- through the monitor --------------------------------------------------------------------------
def cfg_for(tmp_path, proc_root, rule="allocated"):
    return config_mod.parse({
        "node": "n1", "cluster": "c1", "clusters": {"c1": {}},
        "paths": {"procfs": str(proc_root), "sysfs": str(tmp_path / "sys")},
        "power": {"rapl": False},
        "attribution": {"idle_power": rule},
    })


def test_monitor_books_gpu_energy_and_provenance_to_the_job(monkeypatch, tmp_path, clock):
    proc = make_procfs(tmp_path / "proc")
    proc.add_process(4242, env={"SLURM_JOB_ID": "77", "SLURM_CLUSTER_NAME": "c1"}, utime=10)
    fake = FakeNvml([FakeGpu("GPU-a", power_w=250.0, util=90), FakeGpu("GPU-b", power_w=60.0)])
    fake.install(monkeypatch)
    fake.gpus[0].add_process(4242, sm=90)
    cfg = cfg_for(tmp_path, proc.root)
    ledger = Ledger(tmp_path / "greend.db")
    mon = Monitor(cfg, ledger, jobs_source=ProcScan(proc.root, "c1"),
                  energy_sources=[NvmlCollector(clock=fake.monotonic)], clock=clock)
    assert mon.tick() is None
    for _ in range(2):
        fake.advance(5.0)
        clock.advance(5.0)
        proc.advance(400, 400)
        proc.set_process(4242, utime=proc.user)
        splits = {s.domain: s for s in mon.tick()}
    assert splits["gpu-0"].jobs == {"slurm/c1/77": 1250 * J}
    assert splits["gpu-1"].jobs == {} and splits["gpu-1"].unattributed_uj == 300 * J
    mon.checkpoint()
    row, = ledger.get_job("c1", "77")
    assert row.gpu_uj == 2500 * J
    assert row.provenance["gpu"] == PROV_COUNTER
    assert mon.node_totals["gpu-1"][2:4] == [600 * J, 600 * J]
    mon.close()
    ledger.close()
    assert fake.initialised == 0


class PidJobs(FakeJobs):
    def __init__(self, owners):
        super().__init__()
        self.owners = owners

    def owner_of(self, pid):
        return self.owners.get(pid)


def test_monitor_catches_up_after_a_failed_read_and_survives_a_reset(monkeypatch, tmp_path, clock):
    proc = make_procfs(tmp_path / "proc")
    fake = FakeNvml([FakeGpu("GPU-a", power_w=100.0), FakeGpu("GPU-b", power_w=200.0)])
    fake.install(monkeypatch)
    src = PidJobs({10: "slurm/c1/1"})
    src.add("1")
    fake.gpus[1].add_process(10, sm=50)
    mon = Monitor(cfg_for(tmp_path, proc.root), None, jobs_source=src,
                  energy_sources=[NvmlCollector(clock=fake.monotonic)], clock=clock)

    def step(seconds=2.0):
        fake.advance(seconds)
        clock.advance(seconds)
        proc.advance(10, 10)
        return mon.tick()

    mon.tick()
    fake.gpus[1].failures["nvmlDeviceGetTotalEnergyConsumption"] = GPU_IS_LOST
    step()
    # One lost GPU of two: the read returned, but the collector is reported failing, with the GPU.
    st = mon.status["nvml"]
    assert not st.ok and "gpu-1" in st.error and st.errors_total == 1
    del fake.gpus[1].failures["nvmlDeviceGetTotalEnergyConsumption"]
    step()
    assert mon.status["nvml"].ok
    assert mon.node_totals["gpu-1"][2] == 800 * J  # both intervals, none lost
    assert mon.node_totals["gpu-0"][2] == 400 * J
    assert mon.accounts["slurm/c1/1"].row.gpu_uj == 800 * J
    fake.gpus[1].energy_mj = 0.0  # driver reload
    step()
    assert mon.node_totals["gpu-1"][2] == 1200 * J
    assert mon.accounts["slurm/c1/1"].row.gpu_uj == 1200 * J
    assert mon.status["nvml"].ok


def test_monitor_opens_nvml_itself_and_reports_a_missing_driver(monkeypatch, tmp_path):
    proc = make_procfs(tmp_path / "proc")
    FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED).install(monkeypatch)
    mon = Monitor(cfg_for(tmp_path, proc.root), None, jobs_source=FakeJobs())
    st_ = mon.status["nvml"]
    assert not st_.present and "no NVIDIA driver" in st_.detail
    assert not any(isinstance(s, NvmlCollector) for s in mon.energy_sources)

    fake = FakeNvml([FakeGpu("GPU-a")]).install(monkeypatch)
    mon = Monitor(cfg_for(tmp_path, proc.root), None, jobs_source=FakeJobs())
    assert mon.status["nvml"].present and "gpu-0" in mon.status["nvml"].detail
    assert any(isinstance(s, NvmlCollector) for s in mon.energy_sources)
    mon.close()
    assert fake.initialised == 0
