"""What the ledger knows that a decision needs: the measured history of a user's similar jobs (same
job name) and each project's (account's) usage over a budget period. Answers are cached briefly, so a
busy router does not query the ledger (a SQLite file, or a site's database server) for every job.
The queries are the core's read model (greend.queries).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path

from greend import queries
from greend.errors import LedgerError

from .records import Record

log = logging.getLogger(__name__)

MB = 1024 * 1024


def power_of(site, cluster: str):
    """A cluster's power model (the site's first cluster's for one it does not know)."""
    spec = site.by_name.get(cluster)
    return spec.power if spec is not None else site.clusters[0].power


def modelled_j(power, elapsed_s: float, cpus: float, mem_mb: float, gpus: int,
               cpu_usage: float | None = None) -> float:
    """A past job's Green Algorithms energy (IT, J) under a cluster's power model."""
    u = power.cpu_usage if cpu_usage is None else cpu_usage
    return elapsed_s * (cpus * power.cpu_w_per_core * u + mem_mb / 1024 * power.memory_w_per_gb
                        + gpus * power.default_gpu_w * power.gpu_usage)


def summarise(site, user: str, name: str, past: list, measured: list) -> History:
    """The history of similar jobs: efficiencies and elapsed times over `past`, energy (against the
    model) over `measured`, the ones whose energy greend measured. Shared by the ledger and sacct."""
    cpu_den = sum(p.cpus * p.elapsed_s for p in past)
    mem_ratios = [p.max_mem_mb / p.mem_mb for p in past if p.mem_mb > 0 and p.max_mem_mb > 0]
    gpu_jobs = [p for p in measured if p.gpus > 0]
    gpu_den = sum(p.gpus * power_of(site, p.cluster).default_gpu_w * p.elapsed_s for p in gpu_jobs)
    return History(
        user=user, name=name, jobs=tuple(past),
        measured_j=sum(p.it_energy_j for p in measured), modelled_j=sum(p.modelled_j for p in measured),
        median_elapsed_s=_median([p.elapsed_s for p in past]),
        cpu_efficiency=sum(p.cpu_time_s for p in past) / cpu_den if cpu_den > 0 else None,
        peak_cpus_used=max(p.cpu_time_s / p.elapsed_s for p in past),
        mem_efficiency=max(mem_ratios) if mem_ratios else None,
        peak_mem_mb=max(p.max_mem_mb for p in past),
        gpu_use=sum(p.gpu_energy_j for p in gpu_jobs) / gpu_den if gpu_den > 0 else None,
    )


class PastJob(Record):
    cluster: str
    job_id: str
    elapsed_s: float
    cpus: float
    mem_mb: float
    gpus: int
    cpu_time_s: float
    it_energy_j: float
    gpu_energy_j: float
    max_mem_mb: float
    modelled_j: float

    __slots__ = (
        "cluster", "cpu_time_s", "cpus", "elapsed_s", "gpu_energy_j", "gpus", "it_energy_j", "job_id",
        "max_mem_mb", "mem_mb", "modelled_j",
    )

    def __init__(
        self,
        cluster: str,
        job_id: str,
        elapsed_s: float,
        cpus: float,
        mem_mb: float,
        gpus: int,
        cpu_time_s: float,
        it_energy_j: float,
        gpu_energy_j: float,
        max_mem_mb: float,
        modelled_j: float,
    ):
        self.cluster = cluster
        self.job_id = job_id
        self.elapsed_s = elapsed_s
        self.cpus = cpus
        self.mem_mb = mem_mb
        self.gpus = gpus
        self.cpu_time_s = cpu_time_s
        self.it_energy_j = it_energy_j
        self.gpu_energy_j = gpu_energy_j
        self.max_mem_mb = max_mem_mb
        self.modelled_j = modelled_j


class History(Record):
    """Similar jobs (same user, same job name, ended) and what they really used."""

    user: str
    name: str
    jobs: tuple[PastJob, ...]
    measured_j: float
    modelled_j: float
    median_elapsed_s: float
    cpu_efficiency: float | None
    """CPU time / (CPUs x elapsed), over all of them."""
    peak_cpus_used: float
    mem_efficiency: float | None
    """Highest memory used / memory allocated."""
    peak_mem_mb: float
    gpu_use: float | None
    """GPU energy / (GPUs x TDP x elapsed): ~0 for GPUs that sat idle."""

    __slots__ = (
        "cpu_efficiency", "gpu_use", "jobs", "measured_j", "median_elapsed_s", "mem_efficiency", "modelled_j",
        "name", "peak_cpus_used", "peak_mem_mb", "user",
    )

    def __init__(
        self,
        user: str,
        name: str,
        jobs: tuple[PastJob, ...],
        measured_j: float,
        modelled_j: float,
        median_elapsed_s: float,
        cpu_efficiency: float | None,
        peak_cpus_used: float,
        mem_efficiency: float | None,
        peak_mem_mb: float,
        gpu_use: float | None,
    ):
        self.user = user
        self.name = name
        self.jobs = jobs
        self.measured_j = measured_j
        self.modelled_j = modelled_j
        self.median_elapsed_s = median_elapsed_s
        self.cpu_efficiency = cpu_efficiency
        self.peak_cpus_used = peak_cpus_used
        self.mem_efficiency = mem_efficiency
        self.peak_mem_mb = peak_mem_mb
        self.gpu_use = gpu_use

    @property
    def n(self) -> int:
        return len(self.jobs)

    @property
    def power_ratio(self) -> float | None:
        return self.measured_j / self.modelled_j if self.modelled_j > 0 and self.measured_j > 0 else None

    def to_dict(self) -> dict:
        return {
            "jobs": self.n, "job_ids": [f"{j.cluster}/{j.job_id}" for j in self.jobs[:10]],
            "measured_it_energy_j": round(self.measured_j, 1),
            "modelled_it_energy_j": round(self.modelled_j, 1),
            "power_ratio": None if self.power_ratio is None else round(self.power_ratio, 4),
            "median_elapsed_s": round(self.median_elapsed_s, 1),
            "cpu_efficiency": None if self.cpu_efficiency is None else round(self.cpu_efficiency, 4),
            "peak_cpus_used": round(self.peak_cpus_used, 2),
            "mem_efficiency": None if self.mem_efficiency is None else round(self.mem_efficiency, 4),
            "peak_mem_mb": round(self.peak_mem_mb, 1),
            "gpu_use": None if self.gpu_use is None else round(self.gpu_use, 4),
        }


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


# What an account used since a time (the budget rule reads it): the read model's type, whether it
# came from greend's ledger or from Slurm's accounting (history_sacct.py).
Usage = queries.AccountUsage


class LedgerView:
    """Read-only queries on the ledger, cached for ttl_s seconds. A missing ledger is no history.

    The ledger is a SQLite file at `path`, or, given `reader`, a database server's: a context
    manager factory yielding a reader with sqlite3's execute() (a controller on MariaDB or
    PostgreSQL injects greend.sitedb.ServerSite.reader from greend/daemon_cli.py; the policies do
    not import sitedb). A reader's failure is logged and answers no history, as SQLite's."""

    sacct = None
    """Optional policies.history_sacct.SacctHistory (Slurm's accounting, the site's whole record):
    similar jobs come from it when the ledger has none, and usage always does."""

    def __init__(self, path: Path | None, site, ttl_s: float = 60.0, clock=time.time, *,
                 reader=None):
        self.path = path
        self.reader = reader
        self.site = site
        self.ttl_s = ttl_s
        self.clock = clock
        self.db: sqlite3.Connection | None = None
        self.error = ""
        self._cache: dict[tuple, tuple[float, object]] = {}
        self._lock = threading.Lock()
        if reader is not None:
            return
        if path is None:
            self.error = "no ledger configured"
            return
        if not Path(path).exists():
            self.error = f"no ledger at {path}"
            return
        try:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5, check_same_thread=False)
            self.db.execute("SELECT 1 FROM jobs LIMIT 1")
        except sqlite3.Error as e:
            self.error = f"cannot read ledger {path}: {e}"
            self.db = None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    @property
    def readable(self) -> bool:
        return self.db is not None or self.reader is not None

    @contextlib.contextmanager
    def _reading(self):
        if self.reader is not None:
            with self.reader() as db:
                yield db
        else:
            yield self.db

    def _where(self) -> str:
        return "the site database" if self.reader is not None else f"ledger {self.path}"

    def _cached(self, key: tuple, compute):
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < self.ttl_s:
                return hit[1]
        value = compute()
        with self._lock:
            self._cache[key] = (now, value)
        return value

    def similar(self, user: str, name: str, now: float) -> History | None:
        if (not self.readable and self.sacct is None) or not user or not name:
            return None
        days = self.site.settings.history_days
        limit = self.site.settings.history_max_jobs
        since = now - days * 86400
        return self._cached(("similar", user, name), lambda: (
            (self._similar(user, name, since, limit) if self.readable else None)
            or (self.sacct.similar(user, name, since, limit) if self.sacct is not None else None)))

    def _similar(self, user: str, name: str, since: float, limit: int) -> History | None:
        try:
            with self._reading() as db:
                runs = queries.similar_jobs(db, user, name, since, limit)
        except (sqlite3.Error, LedgerError) as e:
            log.warning("%s: history query failed: %s", self._where(), e)
            return None
        jobs = []
        for r in runs:
            elapsed = max(r.stop - r.start, 0.0)
            if elapsed <= 0 or not r.it_energy_uj:
                continue
            cpus = r.cpus or 1.0
            mem_mb = r.mem_bytes / MB
            modelled = modelled_j(power_of(self.site, r.cluster), elapsed, cpus, mem_mb, r.gpus)
            jobs.append(PastJob(r.cluster, r.job_id, elapsed, cpus, mem_mb, r.gpus, r.cpu_time_ns / 1e9,
                                r.it_energy_uj / 1e6, r.gpu_uj / 1e6, r.max_mem_bytes / MB, modelled))
        if not jobs:
            return None
        return summarise(self.site, user, name, jobs, jobs)

    def usage(self, account: str, since: float) -> Usage | None:
        if self.sacct is not None:
            return self._cached(("usage", account, since), lambda: self.sacct.usage(account, since))
        if not self.readable:
            return None
        return self._cached(("usage", account, since), lambda: self._usage(account, since))

    def _usage(self, account: str, since: float) -> Usage | None:
        try:
            with self._reading() as db:
                u = queries.account_usage(db, account, since)
        except (sqlite3.Error, LedgerError) as e:
            log.warning("%s: usage query failed: %s", self._where(), e)
            return None
        return u
