"""One node's books: each tick reads the collectors, splits the interval's energy among jobs and adds
carbon and water with the factors in force; checkpoints commit the books to the ledger.

Data flows one way: collectors -> attribution -> accounts -> ledger/exporter. A failing collector is
isolated: its domain is missing from that interval (its energy is picked up by the next good read,
since counters are cumulative) and the failure is counted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from greend.collectors import registry
from greend.collectors.base import (
    Closeable,
    CollectorStatus,
    EnergyCounter,
    EnergySource,
    Gauge,
    HasGauges,
    JobSource,
    JobUsage,
    KnowsPidOwner,
    PartialFailures,
    SplitsOwnDomains,
)
from greend.collectors.procfs import (
    ProcStat,
    boot_id,
    cpu_count,
    cpu_model,
    cpu_packages,
    mem_total_bytes,
)
from greend.collectors.procscan import NS_PER_TICK, ProcScan
from greend.collectors.slurm import SlurmMetadata

from . import refdata
from .attribution import (
    CpuInterval,
    DomainEnergy,
    Split,
    counter_delta,
    split_domain,
    tdp_active_ratio,
    tdp_power_w,
)
from .errors import ConfigError
from .footprint import J_PER_KWH, UJ_PER_J, Factors
from .ledger import JobRow, Ledger
from .site_factors import cluster_factors
from .slurmjobs import SlurmLifecycle

if TYPE_CHECKING:  # greend.config (pydantic) is not imported on `greend measure`'s fast path
    from . import config as config_mod

log = logging.getLogger(__name__)

SOURCES = ("cpu", "dram", "gpu", "memory")


@dataclass(slots=True)
class Sample:
    """The cumulative readings of one tick, the baseline of the next interval (and, checkpointed,
    of the first interval after a restart)."""

    t: float
    boot_id: str
    cpu_total: int
    cpu_idle: int
    counters: dict[str, int]
    jobs: dict[str, int]


@dataclass(slots=True)
class DomainTotals:
    """One energy domain of this node since greend first ran, as the monitor hands it out."""

    domain: str
    source: str  # cpu, dram, gpu, memory
    provenance: str
    energy_uj: int
    unattributed_uj: int
    idle_uj: int
    power_w: float
    """Average power over the last sampling interval."""


@dataclass(slots=True)
class JobTotals:
    """One job's books on this node, as the monitor hands them out (a copy: safe to read after the
    daemon's lock is released)."""

    cluster: str
    node: str
    job_id: str
    user: str
    account: str
    partition: str
    kind: str
    running: bool
    cpu_uj: int
    dram_uj: int
    gpu_uj: int
    memory_uj: int
    facility_j: float
    carbon_g: float
    water_site_l: float
    water_offsite_l: float
    cpu_time_ns: int
    power_w: float
    """Average IT power over the last sampling interval (0 once the job has ended)."""


@dataclass(slots=True)
class Account:
    """A job's running totals on this node, and its not yet checkpointed series buckets."""

    key: str
    row: JobRow
    record: bool
    buckets: dict[tuple[float, str], list] = field(default_factory=dict)
    dirty: bool = True
    last_interval_uj: int = 0
    idle_uj: int = 0  # of the job's energy, its idle-power share (stored in the row's meta)

    def totals(self, running: bool, interval_s: float) -> JobTotals:
        r = self.row
        return JobTotals(r.cluster, r.node, r.job_id, r.user, r.account, r.partition, r.kind, running,
                         r.cpu_uj, r.dram_uj, r.gpu_uj, r.memory_uj, r.facility_j, r.carbon_g,
                         r.water_site_l, r.water_offsite_l, r.cpu_time_ns,
                         self.last_interval_uj / UJ_PER_J / interval_s if running else 0.0)


@dataclass(slots=True)
class CpuPowerModel:
    tdp_w: float
    model: str
    source: str


def cpu_power_model(cfg: config_mod.Config) -> CpuPowerModel:
    """The node's CPU TDP for the fallback model, from the most specific source there is: configured,
    the model's table entry (per package), its family's median per core, else the generic per-core
    default (docs/methodology.md)."""
    procfs = cfg.paths.procfs
    model = cfg.power.cpu_model or cpu_model(procfs) or "unknown CPU"
    if cfg.power.cpu_tdp_w > 0:
        return CpuPowerModel(cfg.power.cpu_tdp_w, model, "site configuration (power.cpu_tdp_w)")
    hit = refdata.cpu_tdp_w(model)
    if hit:
        packages = cpu_packages(procfs)
        return CpuPowerModel(
            hit[1] * packages, model,
            f"CodeCarbon {refdata.codecarbon_version()} cpu_power.csv: {hit[0]} {hit[1]:g} W "
            f"x {packages} package(s)",
        )
    ncpu = cpu_count(procfs)
    fam = refdata.cpu_family(model)
    if fam:
        return CpuPowerModel(
            fam.w_per_core * ncpu, model,
            f"CPU model {model!r} not in CodeCarbon's table: family {fam.family!r}, "
            f"{fam.w_per_core:g} W/core (median of its entries in {fam.source}) x {ncpu} cores",
        )
    w = cfg.power.unknown_cpu_w_per_core
    return CpuPowerModel(
        w * ncpu, model,
        f"CPU model {model!r} not in CodeCarbon's table, family unknown: Green Algorithms 'Any' "
        f"CPU, {w:g} W/core x {ncpu} cores",
    )


class Monitor:
    def __init__(
        self,
        cfg: config_mod.Config,
        ledger: Ledger | None = None,
        *,
        jobs_source: JobSource | None = None,
        energy_sources: list[EnergySource] | None = None,
        record_kinds: Iterable[str] | None = None,
        clock: Callable[[], float] = time.time,
        resume: bool = True,
        slurm: SlurmMetadata | None = None,
    ):
        self.cfg = cfg
        self.ledger = ledger
        self.clock = clock
        self.node = cfg.node_name
        self.cluster = cfg.cluster
        self.tier = cfg.clusters[cfg.cluster].tier
        self.factors = cluster_factors(cfg)
        self.record_kinds = set(record_kinds) if record_kinds is not None else None
        self.status: dict[str, CollectorStatus] = {}
        procfs = cfg.paths.procfs
        self.procstat = ProcStat(procfs)
        self.boot_id = boot_id(procfs)
        self.mem_total_bytes = mem_total_bytes(procfs)
        self.cpu_model = cpu_power_model(cfg)
        self.energy_sources = (
            energy_sources if energy_sources is not None else self._open_energy_sources()
        )
        self.jobs_source = jobs_source if jobs_source is not None else self._open_jobs_source()
        self._partial: dict[int, bool] = {}  # id(source) -> it can fail partially
        # Optional capabilities, looked up once (the sources do not change while the monitor runs).
        self._splitters = [s for s in self.energy_sources if isinstance(s, SplitsOwnDomains)]
        self._pid_owner = (self.jobs_source.owner_of if isinstance(self.jobs_source, KnowsPidOwner)
                           else None)
        self.accounts: dict[str, Account] = {}
        self.finished: list[Account] = []
        self.node_totals: dict[str, list] = {}  # domain -> [source, provenance, e, unattr, idle]
        self.node_bucket: dict[float, list] = {}
        # What this monitor has already added to the ledger's node books: checkpoints add the
        # difference, so several writers (the daemon, concurrent `measure` runs) add up.
        self._node_totals_written: dict[str, list[int]] = {}
        self._node_bucket_written: dict[float, list[int]] = {}
        self.prev: Sample | None = None
        self.ticks = 0
        self.last_tick_s = 0.0
        self.last_split: list[Split] = []
        self.interval_power_w: dict[str, float] = {}
        self._factor_sets: dict[str, Factors] = {}
        self._job_cpu_delta: dict[str, int] = {}
        self._domain_source: dict[str, str] = {}  # counter domain -> source (cpu, dram, gpu)
        self._fkey: tuple[Factors | None, str] = (None, "")
        # Called inside the checkpoint's transaction with the accounts written, so that what they
        # write (the site outbox) commits or rolls back with the books.
        self.on_checkpoint: list[Callable[[object, list[Account]], None]] = []
        # Slurm job metadata (collectors/slurm.py): the tick reads its cache, never waits for Slurm;
        # the jobs' lifecycle with it lives in slurmjobs.py.
        self.slurm = slurm
        self.slurm_jobs = SlurmLifecycle(self, slurm) if slurm is not None else None
        self._ended_users: dict[str, Account] = {}  # user groups that may come back (_revive)
        # Jobs' series step when not sampling.series_step_s (`measure`: one that fits the run).
        self.job_series_step_s: float | None = None
        if slurm is not None:
            slurm.status = self.status.setdefault("slurm", CollectorStatus("slurm",
                                                                           detail=slurm.describe()))
        if ledger is not None and resume:
            self._resume()

    # -- set-up ---------------------------------------------------------------------------------
    def _where(self) -> registry.Where:
        p = self.cfg.paths
        return registry.Where(p.procfs, p.sysfs, p.cgroupfs, self.cluster, self.node)

    def _switches(self) -> dict[str, registry.Switch]:
        """[collectors], with the older spellings: power.rapl = false is rapl off;
        attribution.jobs_from = cgroup / procscan is cgroups on / off."""
        # Read field by field: model_dump would build the model's serializer (~25 ms of
        # `greend measure`'s start, docs/performance.md).
        c = self.cfg.collectors
        sw: dict[str, registry.Switch] = {k: getattr(c, k) for k in type(c).model_fields}
        if not self.cfg.power.rapl:
            sw["rapl"] = "off"
        how = self.cfg.attribution.jobs_from
        if how == "cgroup":
            sw["cgroups"] = "on"
        elif how == "procscan":
            sw["cgroups"] = "off"
            sw["procscan"] = "on" if sw["procscan"] == "off" else sw["procscan"]
        return sw

    def _open_energy_sources(self) -> list[EnergySource]:
        try:
            opened = registry.open_energy(self._switches(), self._where())
        except registry.CollectorMissing as e:
            raise ConfigError(str(e)) from None
        for o in opened:
            self.status[o.name] = CollectorStatus(o.name, present=o.source is not None, detail=o.detail)
        return [o.source for o in opened if o.source is not None]

    def _open_jobs_source(self) -> JobSource:
        try:
            o = registry.open_jobs(self._switches(), self._where())
        except registry.CollectorMissing as e:
            raise ConfigError(str(e)) from None
        self.status[o.name] = CollectorStatus(o.name, detail=o.detail)
        return o.source

    def _guard(self, name: str, fn, default):
        st = self.status.setdefault(name, CollectorStatus(name))
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # a collector must never stop the others
            if st.ok:
                log.warning("collector %s failed: %s", name, e)
            st.ok, st.error = False, f"{type(e).__name__}: {e}"
            st.errors_total += 1
            value = default
        else:
            if not st.ok:
                log.warning("collector %s recovered", name)
            st.ok, st.error = True, ""
        st.last_duration_s = time.perf_counter() - t0
        return value

    # -- resume ---------------------------------------------------------------------------------
    def _resume(self) -> None:
        stored = self.ledger.counters(self.node)
        running = self.ledger.running_jobs(self.node)
        for r in self.ledger.node_totals(self.node):
            self.node_totals[r["domain"]] = [r["source"], r["provenance"], r["energy_uj"],
                                             r["unattributed_uj"], r["idle_uj"]]
            self._node_totals_written[r["domain"]] = [r["energy_uj"], r["unattributed_uj"],
                                                      r["idle_uj"]]
        if stored is None:
            return
        t, state = stored
        if state.get("boot_id") != self.boot_id:
            # Counters from before a reboot mean nothing now; jobs seen running then are over.
            log.info("node rebooted since the last checkpoint: closing %d job(s)", len(running))
            with self.ledger.transaction() as db:
                for row in running:
                    row.state, row.end_time = "ended", row.last_seen
                    self.ledger.upsert_job(db, row)
            return
        self.prev = Sample(t, state["boot_id"], state["cpu"][0], state["cpu"][1],
                             dict(state["counters"]), dict(state["jobs"]))
        for row in running:
            key = (row.meta or {}).get("key")
            if key:
                acc = Account(key, row, self._recordable(row.kind), dirty=False,
                              idle_uj=int((row.meta or {}).get("idle_uj", 0)))
                # A restart within a series step carries the step's stored buckets on: starting
                # them from zero would overwrite what was stored before the restart.
                for r in self.ledger.last_series_step(row.pk):
                    acc.buckets[(r["t_start"], r["factor_set"])] = [
                        r["t_end"], r["cpu_uj"], r["dram_uj"], r["gpu_uj"], r["memory_uj"],
                        r["cpu_time_ns"], r["carbon_g"], r["water_site_l"], r["water_offsite_l"]]
                self.accounts[key] = acc
        nb = self.ledger.last_node_series(self.node)
        if nb is not None:
            self.node_bucket[nb["t_start"]] = [nb["t_end"], nb["energy_uj"], nb["unattributed_uj"]]
            self._node_bucket_written[nb["t_start"]] = [nb["energy_uj"], nb["unattributed_uj"]]
        if isinstance(self.jobs_source, ProcScan) and state.get("scan"):
            self.jobs_source.import_state(state["scan"])
        log.info("resumed from checkpoint of %s (%.0f s ago), %d running job(s)",
                 time.strftime("%H:%M:%S", time.localtime(t)), self.clock() - t, len(self.accounts))

    def _recordable(self, kind: str) -> bool:
        return self.record_kinds is None or kind in self.record_kinds

    # -- one tick -------------------------------------------------------------------------------
    def read_counters(self) -> list[EnergyCounter]:
        out: list[EnergyCounter] = []
        for src in self.energy_sources:
            partial = self._partial.get(id(src))
            if partial is None:  # a Protocol isinstance costs ~10 µs: once per source, not per tick
                partial = self._partial[id(src)] = isinstance(src, PartialFailures)
            before = src.errors_total if partial else 0
            out.extend(self._guard(src.name, src.read, []))
            if partial and src.errors_total > before:
                # A partial failure (one GPU of eight): the read returned, but the source is not
                # healthy, and /healthz and greend_collector_up must say so.
                st = self.status[src.name]
                st.ok, st.error = False, src.last_error or "a device read failed"
                st.errors_total += src.errors_total - before
        for c in out:
            self._domain_source[c.domain] = c.source
        return out

    def tick(self) -> list[Split] | None:
        """Sample once; returns the interval's splits (None on the first, baseline sample)."""
        t0 = time.perf_counter()
        t = self.clock()
        counters = self.read_counters()
        cpu = self.procstat.read()
        jobs_ok = True

        def read_jobs():
            return self.jobs_source.read()

        jobs: list[JobUsage] | None = self._guard(self.jobs_source.name, read_jobs, None)
        if jobs is None:
            jobs_ok, jobs = False, []
        snap = Sample(t, self.boot_id, cpu.total_ticks, cpu.idle_ticks,
                      {c.domain: c.value_uj for c in counters},
                      {u.key: u.cpu_time_ns for u in jobs})
        prev = self.prev
        if self.slurm_jobs is not None:
            self.slurm_jobs.sync(jobs, t)
        for u in jobs:
            self.account_for(u, t)
        if prev is None:
            self._seed_node_totals(counters)
            self.prev = snap
            self.ticks += 1
            self.last_tick_s = time.perf_counter() - t0
            return None
        if not jobs_ok:
            snap.jobs = prev.jobs  # keep the baseline: the next good read catches up
        # A counter that failed this time keeps its old reading, so no energy is lost.
        for dom, val in prev.counters.items():
            snap.counters.setdefault(dom, val)
        splits = self._interval(prev, snap, counters, jobs, cpu.ncpu)
        for u_key in set(prev.jobs) - set(snap.jobs):
            if jobs_ok:
                self.end(u_key, prev.t, t)
        self.prev = snap
        self.ticks += 1
        self.last_split = splits
        self.last_tick_s = time.perf_counter() - t0
        return splits

    def rebaseline(self) -> float:
        """Read the energy counters and /proc/stat again, keeping the last process scan: the start
        of an interval as close to an event (a command's exec) as a read can be, without the cost
        of a scan. What was used since the last tick is left out of the books. Returns the time."""
        if self.prev is None:
            raise RuntimeError("rebaseline needs a first tick")
        t = self.clock()
        counters = {c.domain: c.value_uj for c in self.read_counters()}
        cpu = self.procstat.read()
        p = self.prev
        self.prev = Sample(t, p.boot_id, cpu.total_ticks, cpu.idle_ticks, {**p.counters, **counters},
                           p.jobs)
        return t

    def _seed_node_totals(self, counters: list[EnergyCounter]) -> None:
        """At the baseline, every domain the next interval will measure gets its node totals at
        zero: the first scrape already has the node's series (at 0) instead of none until the
        second sample."""
        seeds = [(c.domain, c.source, c.provenance) for c in counters]
        have = {c.source for c in counters}
        if "cpu" not in have:
            seeds.append(("cpu", "cpu", self._tdp_provenance()))
        if "dram" not in have and self.cfg.power.memory_w_per_gb > 0:
            seeds.append(("memory", "memory", self._memory_provenance()))
        for dom, src, prov in seeds:
            self.node_totals.setdefault(dom, [src, prov, 0, 0, 0])
            self.interval_power_w.setdefault(dom, 0.0)

    def _tdp_provenance(self) -> str:
        return f"modelled: TDP {self.cpu_model.tdp_w:g} W x (0.1 + 0.9 x load^3) (CodeCarbon)"

    def _memory_provenance(self) -> str:
        return (f"modelled: {self.cfg.power.memory_w_per_gb:g} W/GB of memory "
                "(Green Algorithms), allocated or resident")

    def end_user_records(self) -> None:
        """At a clean stop, before the last checkpoint: the records of users' processes outside
        jobs end as last seen (nobody watches them any more; a restart continues the same record
        when they are seen again). Slurm jobs stay running as of their last_seen: a restart
        resumes them, and readers show them as last seen at that time once it is old."""
        for key in [k for k, a in self.accounts.items() if a.row.kind == "user"]:
            last = self.accounts[key].row.last_seen
            self.end(key, last, last)

    def account_for(self, u: JobUsage, t: float) -> Account:
        """The job's account, opened at its first sight."""
        acc = self.accounts.get(u.key)
        if acc is None and u.kind == "user":
            acc = self._revive(u.key, u.job_id, u.cluster or self.cluster)
        if acc is None:
            user = u.meta.get("user") or _user_name(u.uid)
            row = JobRow(
                cluster=u.cluster or self.cluster, job_id=u.job_id, node=self.node, kind=u.kind,
                state="running", first_seen=t, last_seen=t, user=user, uid=u.uid,
                tier=self.tier if (u.cluster or self.cluster) == self.cluster else "",
                alloc_cpus=u.alloc_cpus, alloc_mem_bytes=u.alloc_mem_bytes,
                name=u.meta.get("name", ""), account=u.meta.get("account", ""),
                partition=u.meta.get("partition", ""),
                submit_time=int(u.meta.get("submit_time", 0) or 0),
                meta={"key": u.key}, provenance={},
            )
            acc = Account(u.key, row, self._recordable(u.kind))
            self.accounts[u.key] = acc
        else:
            row = acc.row
            if u.alloc_cpus is not None:
                row.alloc_cpus = u.alloc_cpus
            if u.alloc_mem_bytes is not None:
                row.alloc_mem_bytes = u.alloc_mem_bytes
        if u.mem_bytes > acc.row.max_mem_bytes:
            acc.row.max_mem_bytes = u.mem_bytes
        return acc

    def _revive(self, key: str, job_id: str, cluster: str) -> Account | None:
        """A user's processes that come back after all had exited continue the user's record.

        Its identity (cluster, user:<name>, submit time 0, node) is one row: starting it again from
        zero would overwrite the stored totals and the current series bucket with smaller ones,
        and the node's books would no longer balance (issue 11: a memory-domain gap).
        """
        acc = self._ended_users.pop(key, None)
        if acc is not None:
            self.finished = [a for a in self.finished if a is not acc]
        elif self.ledger is not None:
            rows = [r for r in self.ledger.get_job(cluster, job_id, self.node) if r.submit_time == 0]
            if not rows:
                return None
            row = rows[-1]
            row.meta = {**(row.meta or {}), "key": key}
            acc = Account(key, row, self._recordable(row.kind),
                          idle_uj=int((row.meta or {}).get("idle_uj", 0)))
            for r in self.ledger.last_series_step(row.pk):
                acc.buckets[(r["t_start"], r["factor_set"])] = [
                    r["t_end"], r["cpu_uj"], r["dram_uj"], r["gpu_uj"], r["memory_uj"],
                    r["cpu_time_ns"], r["carbon_g"], r["water_site_l"], r["water_offsite_l"]]
        else:
            return None
        acc.row.state, acc.row.end_time, acc.dirty = "running", None, True
        self.accounts[key] = acc
        return acc

    def end(self, key: str, last_seen: float, t: float) -> None:
        """Close a job's account: it left the node (or Slurm shows another job under its id)."""
        acc = self.accounts.pop(key, None)
        if acc is None:
            return
        acc.row.state = "ended"
        acc.row.last_seen = last_seen
        acc.row.end_time = t
        acc.dirty = True
        self.finished.append(acc)
        if acc.row.kind == "user":
            self._ended_users[key] = acc
        if self.slurm_jobs is not None and acc.row.kind == "slurm":
            self.slurm_jobs.closed(acc)

    _end = end  # the name greend/measure.py calls

    def _domains(self, prev: Sample, snap: Sample, counters: list[EnergyCounter],
                 jobs: list[JobUsage], ncpu: int) -> list[DomainEnergy]:
        dt = max(0.0, snap.t - prev.t)
        job_cpu: dict[str, int] = {}
        alloc: dict[str, float] = {}
        for u in jobs:
            p = prev.jobs.get(u.key)
            d = u.cpu_time_ns - p if p is not None and u.cpu_time_ns >= p else u.cpu_time_ns
            job_cpu[u.key] = max(0, d)
            acc = self.accounts[u.key]
            a = u.alloc_cpus if u.alloc_cpus is not None else acc.row.alloc_cpus
            if a:
                alloc[u.key] = float(a)
        cpu = CpuInterval(
            active_ticks=max(0, (snap.cpu_total - snap.cpu_idle) - (prev.cpu_total - prev.cpu_idle)),
            total_ticks=max(0, snap.cpu_total - prev.cpu_total),
            ncpu=ncpu, tick_ns=NS_PER_TICK, job_cpu_ns=job_cpu, job_alloc_cpus=alloc,
            idle_rule=self.cfg.attribution.idle_power,
        )
        self._job_cpu_delta = job_cpu
        domains: list[DomainEnergy] = []
        have = {"cpu": False, "dram": False}
        for dom in prev.counters.keys() - {c.domain for c in counters}:
            # This counter's read failed: its energy comes with the next good read, so no model
            # may stand in for it now (that would count the interval twice).
            src = self._domain_source.get(dom) or self.node_totals.get(dom, [None])[0]
            if src in have:
                have[src] = True
        model_uj = round(tdp_power_w(self.cpu_model.tdp_w, cpu.usage_ratio) * dt * UJ_PER_J)
        for c in counters:
            p = prev.counters.get(c.domain)
            if p is None:
                continue  # first reading of this domain: a baseline
            e = counter_delta(p, c.value_uj, c.max_range_uj)
            prov = c.provenance
            if c.source in have:
                have[c.source] = True
                if c.max_range_uj and dt * self.cpu_model.tdp_w * 1.5 * UJ_PER_J > c.max_range_uj:
                    # The counter may have wrapped more than once while we were not looking.
                    n = max(1, sum(1 for x in counters if x.source == c.source))
                    e = model_uj // n if c.source == "cpu" else 0
                    prov = "modelled: TDP (counter gap longer than its wrap time)"
                domains.append(cpu.domain(c.domain, c.source, e, prov))
            else:
                own = self._source_of(c)
                domains.append(own.split_hint(c, e, jobs, self.accounts, cpu, pid_owner=self._pid_owner)
                               if own is not None else cpu.domain(c.domain, c.source, e, prov))
        if not have["cpu"]:
            domains.append(cpu.domain("cpu", "cpu", model_uj, self._tdp_provenance(),
                                      active_ratio=tdp_active_ratio(cpu.usage_ratio)))
        if not have["dram"] and self.cfg.power.memory_w_per_gb > 0:
            e = round(self.cfg.power.memory_w_per_gb * self.mem_total_bytes / 1e9 * dt * UJ_PER_J)
            weights = {}
            for u in jobs:
                acc = self.accounts[u.key]
                m = acc.row.alloc_mem_bytes or u.mem_bytes
                if m:
                    weights[u.key] = float(min(m, self.mem_total_bytes))
            domains.append(DomainEnergy(
                "memory", "memory", e, self._memory_provenance(), 1.0, weights,
                float(self.mem_total_bytes), {}, 1.0,
            ))
        return domains

    def _source_of(self, c: EnergyCounter) -> SplitsOwnDomains | None:
        for s in self._splitters:
            if s.owns(c.domain):
                return s
        return None

    def _interval(self, prev: Sample, snap: Sample, counters: list[EnergyCounter],
                  jobs: list[JobUsage], ncpu: int) -> list[Split]:
        domains = self._domains(prev, snap, counters, jobs, ncpu)
        splits = [split_domain(d) for d in domains]
        t, dt = snap.t, max(1e-9, snap.t - prev.t)
        f = self.factors.at(t)
        if f is not self._fkey[0]:  # the key hashes the factors: once per factor set, not per tick
            self._fkey = (f, f.key())
        fkey = self._fkey[1]
        self._factor_sets[fkey] = f
        step = self.cfg.sampling.series_step_s
        tb = math.floor(t / step) * step
        jstep = self.job_series_step_s or step
        jtb = math.floor(t / jstep) * jstep if jstep != step else tb
        per_job: dict[str, list[int]] = {}
        idle_of: dict[str, int] = {}
        self.interval_power_w = {}
        accounts = self.accounts
        for s in splits:
            idx = SOURCES.index(s.source)
            # Shares of jobs this monitor does not record (`measure` records only its command)
            # are unattributed in the stored books: node energy = recorded jobs + unattributed.
            unrecorded = 0
            for key, uj in s.jobs.items():
                e = per_job.get(key)
                if e is None:
                    e = per_job[key] = [0, 0, 0, 0]
                e[idx] += uj
                acc = accounts.get(key)
                if acc is not None and not acc.record:
                    unrecorded += uj
            for key, uj in s.job_idle.items():
                idle_of[key] = idle_of.get(key, 0) + uj
            tot = self.node_totals.setdefault(s.domain, [s.source, s.provenance, 0, 0, 0])
            tot[1] = s.provenance
            tot[2] += s.energy_uj
            tot[3] += s.unattributed_uj + unrecorded
            tot[4] += s.idle_uj
            self.interval_power_w[s.domain] = s.energy_uj / UJ_PER_J / dt
            nb = self.node_bucket.setdefault(tb, [t, 0, 0])
            nb[0] = t
            nb[1] += s.energy_uj
            nb[2] += s.unattributed_uj + unrecorded
        provs = {s.source: s.provenance for s in splits}
        prov_of = [(i, src, provs[src]) for i, src in enumerate(SOURCES) if src in provs]
        # This loop runs for every job at every tick: factors and the bucket key are hoisted.
        pue, ci = f.pue, f.carbon_intensity_g_per_kwh
        wue, ewif = f.wue_site_l_per_kwh, f.ewif_l_per_kwh
        bkey = (jtb, fkey)
        cpu_delta = self._job_cpu_delta
        for key, acc in self.accounts.items():
            e = per_job.get(key)
            cpu_ns = cpu_delta.get(key, 0)
            row = acc.row
            row.last_seen = t
            acc.last_interval_uj = sum(e) if e else 0
            if not e and not cpu_ns:
                continue
            acc.idle_uj += idle_of.get(key, 0)
            e = e or [0, 0, 0, 0]
            it_j = sum(e) / UJ_PER_J
            carbon = it_j / J_PER_KWH * pue * ci
            w_site = it_j / J_PER_KWH * wue
            w_off = it_j / J_PER_KWH * pue * ewif
            row.cpu_uj += e[0]
            row.dram_uj += e[1]
            row.gpu_uj += e[2]
            row.memory_uj += e[3]
            row.cpu_time_ns += cpu_ns
            row.facility_j += it_j * pue
            row.carbon_g += carbon
            row.water_site_l += w_site
            row.water_offsite_l += w_off
            prov = row.provenance if row.provenance is not None else {}
            for i, src, p in prov_of:
                if e[i]:
                    prov[src] = p
            row.provenance = prov
            b = acc.buckets.get(bkey)
            if b is None:
                b = acc.buckets[bkey] = [t, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0]
            b[0] = t
            b[1] += e[0]
            b[2] += e[1]
            b[3] += e[2]
            b[4] += e[3]
            b[5] += cpu_ns
            b[6] += carbon
            b[7] += w_site
            b[8] += w_off
            acc.dirty = True
        return splits

    # -- views ----------------------------------------------------------------------------------
    def domain_totals(self) -> list[DomainTotals]:
        power = self.interval_power_w
        return [DomainTotals(dom, v[0], v[1], v[2], v[3], v[4], power.get(dom, 0.0))
                for dom, v in self.node_totals.items()]

    def job_totals(self) -> list[JobTotals]:
        """The running jobs' books (power over the last sampling interval)."""
        dt = self.cfg.sampling.interval_s
        return [acc.totals(True, dt) for acc in self.accounts.values()]

    def gauges(self) -> list[Gauge]:
        """The energy sources' own gauges (GPU power, utilisation...), from their last read."""
        out: list[Gauge] = []
        for src in self.energy_sources:
            if isinstance(src, HasGauges):
                out.extend(src.gauges())
        return out

    # -- checkpoint -----------------------------------------------------------------------------
    def state(self) -> dict:
        p = self.prev
        st = {
            "boot_id": self.boot_id,
            "cpu": [p.cpu_total, p.cpu_idle] if p else [0, 0],
            "counters": p.counters if p else {},
            "jobs": p.jobs if p else {},
        }
        if isinstance(self.jobs_source, ProcScan):
            st["scan"] = self.jobs_source.export_state()
        return st

    def checkpoint(self) -> int:
        """Commit the books to the ledger in one transaction; returns the number of jobs written."""
        if self.ledger is None or self.prev is None:
            return 0
        written: list[Account] = []
        t = self.prev.t
        with self.ledger.transaction() as db:
            for key, f in self._factor_sets.items():
                self.ledger.put_factor_set(db, key, f, t)
            for acc in [*self.accounts.values(), *self.finished]:
                if not acc.record or not acc.dirty:
                    continue
                if acc.idle_uj:
                    acc.row.meta = {**(acc.row.meta or {}), "idle_uj": acc.idle_uj}
                pk = self.ledger.upsert_job(db, acc.row)
                self.ledger.put_series(db, (
                    (pk, tb, b[0], fk, b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8])
                    for (tb, fk), b in acc.buckets.items()
                ))
                written.append(acc)
            totals_w, bucket_w = self._node_totals_written, self._node_bucket_written
            self.ledger.add_node_totals(db, self.node, [
                (dom, v[0], v[1], *(x - w for x, w in zip(v[2:], totals_w.get(dom, (0, 0, 0)),
                                                          strict=True)))
                for dom, v in self.node_totals.items()
            ])
            self.ledger.add_node_series(db, self.node, [
                (tb, v[0], *(x - w for x, w in zip(v[1:], bucket_w.get(tb, (0, 0)), strict=True)))
                for tb, v in self.node_bucket.items()
            ])
            self.ledger.put_counters(db, self.node, t, self.state())
            for hook in self.on_checkpoint:
                hook(db, written)
        self._node_totals_written = {dom: v[2:] for dom, v in self.node_totals.items()}
        self._node_bucket_written = {tb: v[1:] for tb, v in self.node_bucket.items()}
        # Buckets of past steps are final once written; keep only the current step's in memory
        # (one per factor set used in it: factors can change within a step).
        for acc in [*self.accounts.values(), *self.finished]:
            acc.dirty = False
            if len(acc.buckets) > 1:
                last = max(tb for tb, _ in acc.buckets)
                acc.buckets = {k: b for k, b in acc.buckets.items() if k[0] == last}
        if len(self.node_bucket) > 1:
            last = max(self.node_bucket)
            self.node_bucket = {last: self.node_bucket[last]}
            self._node_bucket_written = {last: self._node_bucket_written[last]}
        self.finished.clear()
        return len(written)

    def close(self) -> None:
        for src in [*self.energy_sources, self.jobs_source, self.procstat]:
            if isinstance(src, Closeable):
                src.close()


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)

