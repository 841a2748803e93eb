"""The monitor's books on a fixture node: balanced to the microjoule, split by CPU time, resumable.

The node is a fake procfs (/proc/stat rewritten between ticks), a fake powercap tree (two packages
with dram) and a fake jobs source; the clock is set by the test. Every interval moves the counters
by known amounts, so every figure the monitor books can be checked exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from fixtures import Clock, FakeJobs, FakeProc, FakeRapl, make_procfs, make_rapl
from greend.collectors.base import JobUsage
from greend.collectors.procscan import NS_PER_TICK
from greend.collectors.rapl import RaplCollector

from greend import config as config_mod
from greend.footprint import J_PER_KWH, UJ_PER_J
from greend.ledger import Ledger
from greend.monitor import Monitor

NCPU = 8
STEP = 60
T0 = 60 * 28_333_333  # aligned on a series step
CPU_DOMAINS = ("package-0", "package-1")
DRAM_DOMAINS = ("dram-0", "dram-1")


@dataclass
class Node:
    tmp: object
    proc: FakeProc
    rapl: FakeRapl
    jobs: FakeJobs
    clock: Clock
    cfg: config_mod.Config
    advanced: dict  # domain -> µJ moved on since the baseline

    def monitor(self, ledger: Ledger | None = None, **kw) -> Monitor:
        return Monitor(self.cfg, ledger, jobs_source=self.jobs,
                       energy_sources=[RaplCollector(self.tmp / "sys")], clock=self.clock, **kw)

    def run(self, dt: float, energy: dict[str, int], job_cpu_s: dict[str, float],
            idle_ticks: int | None = None, extra_active_ticks: int = 0) -> None:
        """Move the node on by dt seconds: counters, job CPU time and /proc/stat agree."""
        for dom, uj in energy.items():
            self.rapl.advance(dom, uj)
            self.advanced[dom] = self.advanced.get(dom, 0) + uj
        active = extra_active_ticks
        for key, s in job_cpu_s.items():
            self.jobs.run(key, int(s * 1e9))
            active += round(s * 1e9 / NS_PER_TICK)
        total = round(dt * NCPU * 1e9 / NS_PER_TICK)
        self.proc.advance(active, total - active if idle_ticks is None else idle_ticks)
        self.clock.advance(dt)


def make_node(tmp_path, *, idle: str = "unattributed", series: str | None = None,
              max_range: int | None = None, start_uj: int = 1_000_000) -> Node:
    proc = make_procfs(tmp_path / "proc", ncpu=NCPU, packages=2)
    kw = {"max_range": max_range} if max_range else {}
    rapl = make_rapl(tmp_path / "sys", packages=2, dram=True, start_uj=start_uj, **kw)
    cluster = {"pue": 1.2, "wue_site_l_per_kwh": 0.5, "ewif_l_per_kwh": 1.6,
               "carbon_intensity_g_per_kwh": 50.0}
    if series is not None:
        (tmp_path / "ci.csv").write_text(series)
        cluster["carbon_intensity_series"] = str(tmp_path / "ci.csv")
    cfg = config_mod.parse({
        "cluster": "c1", "node": "n1", "state_dir": str(tmp_path / "state"),
        "paths": {"procfs": str(tmp_path / "proc"), "sysfs": str(tmp_path / "sys"),
                  "cgroupfs": str(tmp_path / "cgroup")},
        "attribution": {"idle_power": idle},
        "sampling": {"series_step_s": STEP},
        "clusters": {"c1": cluster},
    })
    return Node(tmp_path, proc, rapl, FakeJobs(), Clock(T0), cfg, {})


def energy(pkg0=500_000_001, pkg1=300_000_007, dram0=50_000_003, dram1=40_000_009) -> dict[str, int]:
    return {"package-0": pkg0, "package-1": pkg1, "dram-0": dram0, "dram-1": dram1}


def all_rows(m: Monitor):
    return [a.row for a in [*m.accounts.values(), *m.finished]]


def assert_books_balance(m: Monitor, node: Node, rows=None) -> None:
    rows = rows if rows is not None else all_rows(m)
    for source, domains, field in (("cpu", CPU_DOMAINS, "cpu_uj"), ("dram", DRAM_DOMAINS, "dram_uj")):
        measured = sum(node.advanced.get(d, 0) for d in domains)
        booked = sum(m.node_totals[d][2] for d in domains)
        unattributed = sum(m.node_totals[d][3] for d in domains)
        jobs = sum(getattr(r, field) for r in rows)
        assert booked == measured, source
        assert jobs + unattributed == measured, source


# -- attribution through ticks --------------------------------------------------------------------
def test_books_balance_exactly_and_jobs_split_by_cpu_time(tmp_path):
    node = make_node(tmp_path)
    a = node.jobs.add("1", cluster="c1")
    b = node.jobs.add("2", cluster="c1")
    m = node.monitor()
    try:
        assert m.tick() is None  # the baseline
        for i in range(5):
            node.run(5.0, energy(pkg0=500_000_001 + i), {a: 15.0, b: 5.0})  # a: 3 cores, b: 1
            splits = m.tick()
            assert {s.domain for s in splits} == {*CPU_DOMAINS, *DRAM_DOMAINS}
            for s in splits:
                assert sum(s.jobs.values()) + s.unattributed_uj == s.energy_uj
        assert_books_balance(m, node)
        ra, rb = m.accounts[a].row, m.accounts[b].row
        # Half the node's CPU time was idle, and idle power stays unattributed: jobs share the
        # active half 3:1.
        measured = sum(node.advanced[d] for d in CPU_DOMAINS)
        assert ra.cpu_uj == pytest.approx(measured / 2 * 0.75, abs=10)
        assert rb.cpu_uj == pytest.approx(measured / 2 * 0.25, abs=10)
        assert ra.cpu_time_ns == 5 * 15 * 10**9 and rb.cpu_time_ns == 5 * 5 * 10**9
        assert ra.provenance["cpu"] == "measured: RAPL powercap"
        # carbon and water from the factors in force: C = E x PUE x CI
        it_kwh = ra.it_energy_uj / UJ_PER_J / J_PER_KWH
        assert ra.carbon_g == pytest.approx(it_kwh * 1.2 * 50.0)
        assert ra.water_site_l + ra.water_offsite_l == pytest.approx(it_kwh * (0.5 + 1.2 * 1.6))
        assert ra.facility_j == pytest.approx(ra.it_energy_uj / UJ_PER_J * 1.2)
    finally:
        m.close()


def test_idle_rule_allocated_charges_idle_power_by_allocated_cores(tmp_path):
    node = make_node(tmp_path, idle="allocated")
    a = node.jobs.add("1", alloc_cpus=4)
    b = node.jobs.add("2", alloc_cpus=2)
    m = node.monitor()
    try:
        m.tick()
        # 40 CPU-seconds in the interval; jobs used 10 of them: active ratio 1/4.
        node.run(5.0, {"package-0": 800_000_000, "package-1": 0, "dram-0": 0, "dram-1": 0},
                 {a: 5.0, b: 5.0})
        (s,) = [s for s in m.tick() if s.domain == "package-0"]
        active, idle = 200_000_000, 600_000_000
        assert s.idle_uj == idle
        assert s.jobs[a] == active // 2 + idle * 4 // 8
        assert s.jobs[b] == active // 2 + idle * 2 // 8
        assert s.unattributed_uj == idle * 2 // 8  # the 2 unallocated cores' idle share
        assert_books_balance(m, node)
    finally:
        m.close()


def test_idle_rule_unattributed_keeps_idle_power_out_of_jobs(tmp_path):
    node = make_node(tmp_path, idle="unattributed")
    a = node.jobs.add("1", alloc_cpus=4)
    m = node.monitor()
    try:
        m.tick()
        node.run(5.0, {"package-0": 800_000_000}, {a: 10.0})
        (s,) = [s for s in m.tick() if s.domain == "package-0"]
        assert s.jobs[a] == 200_000_000
        assert s.unattributed_uj == s.idle_uj == 600_000_000
    finally:
        m.close()


def test_rapl_wrap_around_is_counted_through_the_monitor(tmp_path):
    rng = 10**10
    node = make_node(tmp_path, max_range=rng, start_uj=rng - 100_000_000)
    a = node.jobs.add("1")
    m = node.monitor()
    try:
        m.tick()
        node.run(5.0, energy(pkg0=700_000_000), {a: 40.0})  # every core busy with the job
        assert node.rapl.values["package-0"] < rng - 100_000_000  # it wrapped
        splits = {s.domain: s for s in m.tick()}
        assert splits["package-0"].energy_uj == 700_000_000
        assert splits["package-0"].jobs[a] == 700_000_000
        assert_books_balance(m, node)
    finally:
        m.close()


def test_a_gap_longer_than_the_wrap_time_falls_back_to_the_model(tmp_path):
    rng = 10**10  # 300 W of TDP wraps this in ~33 s
    node = make_node(tmp_path, max_range=rng)
    m = node.monitor()
    try:
        m.tick()
        node.run(100.0, energy(), {})
        splits = {s.domain: s for s in m.tick()}
        assert splits["package-0"].provenance.startswith("modelled: TDP")
        assert splits["dram-0"].energy_uj == 0
    finally:
        m.close()


def test_jobs_that_end_are_closed(tmp_path):
    node = make_node(tmp_path)
    a = node.jobs.add("1")
    m = node.monitor()
    try:
        m.tick()
        node.run(5.0, energy(), {a: 10.0})
        m.tick()
        t_last = node.clock.t
        node.jobs.end(a)
        node.run(5.0, energy(), {})
        m.tick()
        assert a not in m.accounts
        (row,) = [acc.row for acc in m.finished]
        assert row.state == "ended" and row.last_seen == t_last and row.end_time == node.clock.t
        assert_books_balance(m, node)
    finally:
        m.close()


def test_a_failing_jobs_source_is_isolated_and_counted(tmp_path):
    node = make_node(tmp_path)
    a = node.jobs.add("1")
    m = node.monitor()
    try:
        m.tick()
        node.run(5.0, energy(), {a: 10.0})
        m.tick()
        node.jobs.fail = RuntimeError("cgroup tree vanished")
        node.run(5.0, energy(), {a: 10.0})
        splits = m.tick()  # energy is still measured and booked, as unattributed
        assert splits and all(not s.jobs for s in splits)
        st = m.status["fakejobs"]
        assert (st.ok, st.errors_total) == (False, 1)
        assert "cgroup tree vanished" in st.error
        assert a in m.accounts  # a failed read does not end the jobs
        node.jobs.fail = None
        node.run(5.0, energy(), {a: 10.0})
        m.tick()
        assert m.status["fakejobs"].ok and m.status["fakejobs"].errors_total == 1
        assert m.accounts[a].row.cpu_time_ns == 30 * 10**9  # the missed interval's CPU time is caught up
        assert_books_balance(m, node)
    finally:
        m.close()


def test_a_failing_energy_source_loses_no_energy(tmp_path):
    node = make_node(tmp_path)
    a = node.jobs.add("1")
    m = node.monitor()
    rapl = m.energy_sources[0]
    real_read = rapl.read
    try:
        m.tick()
        node.run(5.0, energy(), {a: 10.0})
        rapl.read = lambda: (_ for _ in ()).throw(OSError(5, "Input/output error"))
        m.tick()
        assert not m.status["rapl"].ok
        rapl.read = real_read
        node.run(5.0, energy(), {a: 10.0})
        m.tick()
        assert m.status["rapl"].ok
        assert_books_balance(m, node)  # the failed interval's energy came with the next read
    finally:
        rapl.read = real_read
        m.close()


# -- factors and series buckets -------------------------------------------------------------------
def iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat()


def series_rows(ledger: Ledger, cluster: str, job_id: str):
    (row,) = ledger.get_job(cluster, job_id)
    return row, ledger.series(row.pk)


def test_factors_are_recorded_per_series_bucket(tmp_path):
    series = f"timestamp,g_per_kwh\n{iso(T0)},40\n{iso(T0 + STEP)},90\n"
    node = make_node(tmp_path, series=series)
    a = node.jobs.add("1")
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    m = node.monitor(ledger)
    try:
        m.tick()
        per_tick = []
        for _ in range(10):  # 100 s: the intensity changes at T0 + 60 s
            node.run(10.0, energy(), {a: 40.0})
            before = m.accounts[a].row.it_energy_uj
            m.tick()
            ci = 40 if node.clock.t < T0 + STEP else 90
            per_tick.append((m.accounts[a].row.it_energy_uj - before, ci))
            m.checkpoint()
        row, series_ = series_rows(ledger, "c1", "1")
        assert {s["carbon_intensity_g_per_kwh"] for s in series_} == {40.0, 90.0}
        for s in series_:
            expected_ci = 40.0 if s["t_start"] < T0 + STEP else 90.0
            assert s["carbon_intensity_g_per_kwh"] == expected_ci
            assert s["carbon_g"] == pytest.approx(
                (s["cpu_uj"] + s["dram_uj"]) / UJ_PER_J / J_PER_KWH * 1.2 * expected_ci)
        # the job's total carbon uses both factor sets
        expected = sum(e / UJ_PER_J / J_PER_KWH * 1.2 * ci for e, ci in per_tick)
        assert row.carbon_g == pytest.approx(expected)
        assert len(ledger.factor_sets_of(row.pk)) == 2
        # the stored series adds up to the job's totals
        assert sum(s["cpu_uj"] for s in series_) == row.cpu_uj
        assert sum(s["carbon_g"] for s in series_) == pytest.approx(row.carbon_g)
    finally:
        m.close()
        ledger.close()


def factors_with_ci(cfg: config_mod.Config, ci: float) -> config_mod.ClusterFactors:
    c1 = cfg.clusters["c1"].model_copy(update={"carbon_intensity_g_per_kwh": ci})
    return config_mod.cluster_factors(cfg.model_copy(update={"clusters": {"c1": c1}}))


@pytest.mark.parametrize("order", ["new key sorts first", "new key sorts last"])
def test_factor_change_within_a_series_step_keeps_both_buckets(tmp_path, order):
    # The daemon re-reads a changed intensity file at any time, not on step boundaries.
    node = make_node(tmp_path)
    old_key = factors_with_ci(node.cfg, 50.0).at(T0).key()
    first = order == "new key sorts first"
    new_ci = next(ci for ci in range(51, 200)
                  if (factors_with_ci(node.cfg, ci).at(T0).key() < old_key) == first)
    a = node.jobs.add("1")
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    m = node.monitor(ledger)
    try:
        m.tick()
        for i in range(5):
            if i == 2:
                m.factors = factors_with_ci(node.cfg, new_ci)
            node.run(5.0, energy(), {a: 40.0})
            m.tick()
            m.checkpoint()
        row, series_ = series_rows(ledger, "c1", "1")
        assert {s["carbon_intensity_g_per_kwh"] for s in series_} == {50.0, new_ci}
        assert sum(s["cpu_uj"] for s in series_) == row.cpu_uj
        assert sum(s["carbon_g"] for s in series_) == pytest.approx(row.carbon_g)
    finally:
        m.close()
        ledger.close()


# -- checkpoints and restarts ---------------------------------------------------------------------
def test_resume_attributes_the_energy_used_while_greend_was_down(tmp_path):
    node = make_node(tmp_path)
    a = node.jobs.add("1")
    b = node.jobs.add("2")
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    m = node.monitor(ledger)
    m.tick()
    node.run(5.0, energy(), {a: 30.0, b: 10.0})
    m.tick()
    m.checkpoint()
    before = ledger.get_job("c1", "1")[0].cpu_uj
    m.close()
    # greend is down for 20 s; the job keeps running and the counters keep counting.
    node.run(20.0, energy(pkg0=2_000_000_000, pkg1=0, dram0=0, dram1=0), {a: 160.0})
    m2 = node.monitor(ledger)
    try:
        assert set(m2.accounts) == {a, b}
        splits = {s.domain: s for s in m2.tick()}
        assert splits["package-0"].energy_uj == 2_000_000_000
        assert splits["package-0"].jobs[a] == 2_000_000_000  # all cores busy with job 1
        m2.checkpoint()
        (row,) = ledger.get_job("c1", "1")
        assert row.cpu_uj == before + 2_000_000_000
        assert row.cpu_time_ns == (30 + 160) * 10**9
        rows = ledger.jobs(cluster="c1")
        assert len(rows) == 2  # the same records, carried on, not new ones
        # the books over both lives of the daemon balance
        for d in (*CPU_DOMAINS, *DRAM_DOMAINS):
            (nt,) = [r for r in ledger.node_totals("n1") if r["domain"] == d]
            assert nt["energy_uj"] == node.advanced[d]
        assert_books_balance(m2, node, rows)
    finally:
        m2.close()
        ledger.close()


def test_restart_within_a_series_step_keeps_the_step_already_stored(tmp_path):
    node = make_node(tmp_path)
    a = node.jobs.add("1")
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    m = node.monitor(ledger)
    m.tick()
    node.run(10.0, energy(), {a: 40.0})
    m.tick()
    m.checkpoint()
    m.close()
    node.run(10.0, energy(), {a: 40.0})  # a quick restart: still in the same 60 s step
    m2 = node.monitor(ledger)
    try:
        m2.tick()
        m2.checkpoint()
        row, series_ = series_rows(ledger, "c1", "1")
        assert sum(s["cpu_uj"] for s in series_) == row.cpu_uj
        assert sum(s["cpu_time_ns"] for s in series_) == row.cpu_time_ns
        node_energy = ledger.db.execute("SELECT SUM(energy_uj) FROM node_series").fetchone()[0]
        assert node_energy == sum(node.advanced.values())
    finally:
        m2.close()
        ledger.close()


def test_replayed_checkpoint_does_not_double_count(tmp_path):
    node = make_node(tmp_path)
    a = node.jobs.add("1")
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    m = node.monitor(ledger)
    try:
        m.tick()
        node.run(5.0, energy(), {a: 40.0})
        m.tick()
        m.checkpoint()
        first = ledger.get_job("c1", "1")[0]
        m.accounts[a].dirty = True
        m.checkpoint()
        again = ledger.get_job("c1", "1")[0]
        assert (again.cpu_uj, again.carbon_g) == (first.cpu_uj, first.carbon_g)
    finally:
        m.close()
        ledger.close()


def test_a_reboot_closes_the_jobs_instead_of_resuming(tmp_path):
    node = make_node(tmp_path)
    a = node.jobs.add("1")
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    m = node.monitor(ledger)
    m.tick()
    node.run(5.0, energy(), {a: 40.0})
    m.tick()
    m.checkpoint()
    m.close()
    stored = ledger.get_job("c1", "1")[0]
    node.proc.set_boot_id("boot-2")
    node.run(5.0, energy(), {a: 40.0})  # counters after a reboot say nothing about the gap
    m2 = node.monitor(ledger)
    try:
        (row,) = ledger.get_job("c1", "1")
        assert row.state == "ended" and row.end_time == stored.last_seen
        assert row.cpu_uj == stored.cpu_uj
        assert m2.accounts == {} and m2.prev is None
        assert m2.tick() is None  # a fresh baseline
    finally:
        m2.close()
        ledger.close()


def test_without_rapl_cpu_energy_is_modelled_from_tdp(tmp_path):
    node = make_node(tmp_path)
    a = node.jobs.add("1")
    m = Monitor(node.cfg, None, jobs_source=node.jobs, energy_sources=[], clock=node.clock)
    try:
        assert m.cpu_model.tdp_w == 300.0  # Xeon Gold 6248, 150 W x 2 packages
        m.tick()
        node.run(10.0, {}, {a: 80.0})  # every core busy: P = TDP
        splits = {s.domain: s for s in m.tick()}
        assert splits["cpu"].energy_uj == 300 * 10 * UJ_PER_J
        # The model's floor (0.1 x TDP) is idle power, charged by allocation (none known here:
        # unattributed); the job gets what the model adds above it, whoever else loads the node.
        assert splits["cpu"].jobs[a] == round(0.9 * splits["cpu"].energy_uj)
        assert splits["cpu"].idle_uj == splits["cpu"].unattributed_uj == 30 * 10 * UJ_PER_J
        assert "modelled: TDP" in splits["cpu"].provenance
        # memory model, 0.3725 W/GB of the node's 64 GiB, with no DRAM counter
        assert splits["memory"].energy_uj == round(0.3725 * (64 << 30) / 1e9 * 10 * UJ_PER_J)
    finally:
        m.close()


# -- node books in the ledger: several writers, user groups that come back ------------------------
def _ledger_books(ledger: Ledger) -> tuple[int, int, int, int]:
    db = ledger.db
    jobs = db.execute("SELECT COALESCE(sum(cpu_uj + dram_uj + gpu_uj + memory_uj), 0) FROM jobs"
                      ).fetchone()[0]
    series = db.execute("SELECT COALESCE(sum(cpu_uj + dram_uj + gpu_uj + memory_uj), 0) "
                        "FROM job_series").fetchone()[0]
    e, u = db.execute("SELECT sum(energy_uj), sum(unattributed_uj) FROM node_series").fetchone()
    te, tu = db.execute("SELECT sum(energy_uj), sum(unattributed_uj) FROM node_totals").fetchone()
    assert (te, tu) == (e, u)
    return jobs, series, e, u


def _user(node: Node, uid: int = 1000) -> str:
    key = f"user/{uid}"
    node.jobs.jobs[key] = JobUsage(key=key, kind="user", job_id=f"user:u{uid}", uid=uid,
                                   cpu_time_ns=0, mem_bytes=8 << 30, cluster="c1")
    return key


def test_a_user_group_that_comes_back_continues_its_record(tmp_path):
    # Issue 11: the user's processes all exit, then new ones start within the same series step.
    # Starting the record again from zero overwrote the stored totals and bucket: the node's
    # books were short by what the first appearance had been given (memory, by resident size).
    node = make_node(tmp_path)
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    m = Monitor(node.cfg, ledger, jobs_source=node.jobs, clock=node.clock)
    try:
        u = _user(node)
        m.tick()
        node.run(2.0, energy(), {u: 0.5})
        m.tick()
        m.checkpoint()
        saved = node.jobs.jobs.pop(u)
        node.run(2.0, energy(), {})
        m.tick()  # the group ends
        m.checkpoint()
        node.jobs.jobs[u] = saved
        node.run(2.0, energy(), {u: 0.2})
        m.tick()  # and comes back
        m.checkpoint()
        (row,) = ledger.get_job("c1", "user:u1000")
        assert row.state == "running" and row.dram_uj > 0
        jobs, series, e, un = _ledger_books(ledger)
        assert jobs == series and e == jobs + un
        # A new monitor (a restart) sees the group again: it continues the stored record too.
        m.end_user_records()
        m.checkpoint()
        assert ledger.get_job("c1", "user:u1000")[0].state == "ended"
        before = ledger.get_job("c1", "user:u1000")[0].it_energy_uj
        m2 = Monitor(node.cfg, ledger, jobs_source=node.jobs, clock=node.clock)
        try:
            node.run(2.0, energy(), {u: 0.2})
            m2.tick()
            m2.checkpoint()
            (row,) = ledger.get_job("c1", "user:u1000")
            assert row.state == "running" and row.it_energy_uj > before
            jobs, series, e, un = _ledger_books(ledger)
            assert jobs == series and e == jobs + un
        finally:
            m2.close()
    finally:
        m.close()
        ledger.close()


def test_writers_add_to_the_node_books_instead_of_overwriting(tmp_path):
    # Two monitors on one node and one ledger (the daemon and a `measure` run, or two runs):
    # what each measured adds up, and each one's unrecorded jobs count as unattributed.
    node = make_node(tmp_path)
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    a = node.jobs.add("1", alloc_cpus=4)
    ma = Monitor(node.cfg, ledger, jobs_source=node.jobs, clock=node.clock, resume=False)
    mb = Monitor(node.cfg, ledger, jobs_source=node.jobs, clock=node.clock, resume=False,
                 record_kinds={"command"})
    try:
        ma.tick()
        mb.tick()
        for _ in range(3):
            node.run(2.0, energy(), {a: 1.0})
            ma.tick()
            mb.tick()
            ma.checkpoint()
            mb.checkpoint()
        jobs, series, e, un = _ledger_books(ledger)
        measured = 2 * 3 * sum(energy().values())  # both saw all of it
        booked = sum(v[2] for v in ma.node_totals.values())
        assert e >= measured and booked * 2 == e
        assert jobs == series and e == jobs + un
    finally:
        ma.close()
        mb.close()
        ledger.close()


def test_node_totals_exist_from_the_first_sample(tmp_path):
    node = make_node(tmp_path)
    m = Monitor(node.cfg, None, jobs_source=node.jobs, energy_sources=[], clock=node.clock)
    try:
        assert m.tick() is None
        assert {"cpu", "memory"} <= set(m.node_totals)
        assert all(v[2] == 0 for v in m.node_totals.values())
    finally:
        m.close()
