"""The Slurm job lifecycle on a node: a job's identity and metadata from Slurm's cache, a new job
under a reused id, the provisional identity until Slurm answers, Slurm's end time and final state
for a closed job, and the write-back of footprints (docs/slurm.md).

The monitor calls sync() at every tick and closed() when a job leaves the node; nothing here waits
for Slurm: the metadata comes from collectors/slurm.py's cache, refreshed off the sampling path.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Protocol

from greend.collectors.base import JobUsage
from greend.collectors.slurm import SlurmJob, SlurmMetadata, footprint_comment

from .footprint import UJ_PER_J
from .ledger import JobRow, Ledger

if TYPE_CHECKING:
    from .monitor import Account

log = logging.getLogger(__name__)

FINAL_WAIT_S = 300.0
"""How long a closed job waits for Slurm's final state before its record is made final anyway."""


class Books(Protocol):
    """What the lifecycle needs of the monitor's books."""

    accounts: dict[str, Account]
    finished: list[Account]
    ledger: Ledger | None
    cluster: str
    node: str

    def account_for(self, u: JobUsage, t: float) -> Account: ...

    def end(self, key: str, last_seen: float, t: float) -> None: ...


class SlurmLifecycle:
    """This cluster's Slurm jobs in the monitor's books, from the metadata cache `meta`."""

    def __init__(self, books: Books, meta: SlurmMetadata):
        self.books = books
        self.meta = meta
        self._gen = -1
        self._asked: set[str] = set()
        self._closing: list[Account] = []
        self._ended_ids: dict[tuple[str, int], float] = {}  # (job id, submit time) closed here
        self._written: dict[tuple[str, int], float] = {}  # last "so far" write-back

    def sync(self, jobs: list[JobUsage], t: float) -> None:
        """Give this cluster's Slurm jobs their identity and metadata from the cache. No Slurm call
        here: job ids the cache does not know ask for one background refresh (at most one a tick)."""
        meta = self.meta
        fresh = meta.generation != self._gen
        self._gen = meta.generation
        ask = False
        for u in jobs:
            if u.kind != "slurm" or (u.cluster or self.books.cluster) != self.books.cluster:
                continue
            info = meta.get(u.job_id)
            # Local discovery: what the node's Prolog hook said (identity, no submit time) until
            # slurmctld has been asked; the record keeps its provisional identity meanwhile.
            partial = info is not None and not info.submit_time
            acc = self.books.accounts.get(u.key)
            if acc is not None and info is not None and not partial and not _same_job(acc.row, info):
                # Another job under this id (ids restart when a controller loses its state): close
                # the old account; the new job's use never goes into it.
                log.info("job %s: Slurm shows another job under this id (submitted %s); closing "
                         "the account of the previous one", u.job_id, info.submit_time)
                self.books.end(u.key, acc.row.last_seen, acc.row.last_seen)
                acc = None
            if acc is None:
                if info is not None and not partial and self._was_ended(u.job_id, info.submit_time):
                    info = None  # a stale entry: that job was already closed here
                acc = self.books.account_for(u, t)
                if info is None or partial:
                    # Provisional identity until Slurm's metadata arrives (the row is then fixed
                    # by its pk): two jobs' footprints are never merged under an unknown identity.
                    acc.row.submit_time = int(acc.row.first_seen)
                    acc.row.meta = {**(acc.row.meta or {}), "provisional": "submit_time=first_seen"}
            if info is None:
                if u.job_id not in self._asked:
                    self._asked.add(u.job_id)
                    meta.want(u.job_id)
                    ask = True
                continue
            if partial:
                if fresh or acc.row.user != info.user:
                    self._apply(acc, info)
                continue
            if fresh or acc.row.submit_time != info.submit_time or "provisional" in (acc.row.meta or {}):
                self._apply(acc, info)
            if fresh and meta.write_back != "none" and meta.write_back_interval_s > 0 and not info.ended:
                self._progress(acc, t)  # (an ended job's cgroup can linger a moment)
            # Slurm's allocation wins over the cpuset's width (declared cores can map onto fewer).
            if info.alloc_cpus:
                u.alloc_cpus = info.alloc_cpus
            if info.alloc_mem_bytes:
                u.alloc_mem_bytes = info.alloc_mem_bytes
        if ask:
            meta.request()
        if self._closing:
            self._finish(t, fresh)

    def _apply(self, acc: Account, info: SlurmJob) -> None:
        row = acc.row
        partial = not info.submit_time  # the Prolog hook's identity: the submit time is not known
        meta = {k: v for k, v in (row.meta or {}).items() if partial or k != "provisional"}
        if info.state:
            meta["slurm_state"] = info.state
        if info.cluster:
            meta["slurm_cluster"] = info.cluster
        if info.start_time:
            meta["start_time"] = info.start_time
        new = {
            "submit_time": row.submit_time if partial else info.submit_time, "user": info.user or row.user,
            "uid": info.uid if info.uid is not None else row.uid,
            # the hook gives what slurmd passes on: keep what is known where it gives nothing
            "account": info.account or row.account if partial else info.account,
            "partition": info.partition or row.partition if partial else info.partition,
            "name": info.name or row.name if partial else info.name,
            "alloc_cpus": info.alloc_cpus or row.alloc_cpus,
            "alloc_mem_bytes": info.alloc_mem_bytes or row.alloc_mem_bytes,
            "alloc_gpus": info.alloc_gpus if info.alloc_gpus is not None else row.alloc_gpus,
        }
        if meta != row.meta or any(getattr(row, k) != v for k, v in new.items()):
            for k, v in new.items():
                setattr(row, k, v)
            row.meta = meta
            acc.dirty = True

    def _was_ended(self, job_id: str, submit_time: int) -> bool:
        if (job_id, submit_time) in self._ended_ids:
            return True
        if self.books.ledger is None:
            return False
        return any(r.submit_time == submit_time and r.state == "ended"
                   for r in self.books.ledger.get_job(self.books.cluster, job_id, self.books.node))

    def closed(self, acc: Account) -> None:
        row = acc.row
        if "provisional" not in (row.meta or {}):
            self._ended_ids[(row.job_id, row.submit_time)] = row.last_seen
        if len(self._ended_ids) > 20000:
            for k in sorted(self._ended_ids, key=self._ended_ids.__getitem__)[:10000]:
                del self._ended_ids[k]
        self._asked.discard(row.job_id)
        self.meta.ended_here(row.job_id)
        self._closing.append(acc)

    def _finish(self, t: float, fresh: bool) -> None:
        """Closed jobs take Slurm's end time and final state when it has them; the record is then
        final (written again by pk) and, if configured, written back to Slurm."""
        for acc in list(self._closing):
            row = acc.row
            info = self.meta.get(row.job_id) if fresh else None
            if info is not None and not _same_job(row, info):
                info = None
            if info is not None and info.ended:
                self._apply(acc, info)
                self._ended_ids[(row.job_id, row.submit_time)] = row.last_seen
                if info.end_time:
                    row.end_time = float(info.end_time)
                    row.meta = {**(row.meta or {}), "end_time_from": "slurm"}
                self._final(acc, write_back=True)
            elif t - row.last_seen > FINAL_WAIT_S:
                self._final(acc, write_back=False)

    def _progress(self, acc: Account, t: float) -> None:
        """Write a running job's footprint so far: Slurm refuses updates once a job has finished."""
        r = acc.row
        ident = (r.job_id, r.submit_time)
        if r.cpu_time_ns and t - self._written.get(ident, -math.inf) >= \
                self.meta.write_back_interval_s:
            self._written[ident] = t
            self.meta.queue_write_back(r.job_id, r.submit_time, footprint_comment(
                self.books.node, r.it_energy_uj / UJ_PER_J, r.carbon_g, r.water_site_l + r.water_offsite_l,
                r.cpu_time_ns / 1e9, final=False))

    def _final(self, acc: Account, write_back: bool) -> None:
        self._closing.remove(acc)
        self._written.pop((acc.row.job_id, acc.row.submit_time), None)
        acc.dirty = True
        if not any(a is acc for a in self.books.finished):
            self.books.finished.append(acc)
        if write_back and self.meta.write_back != "none":
            r = acc.row
            self.meta.queue_write_back(r.job_id, r.submit_time, footprint_comment(
                self.books.node, r.it_energy_uj / UJ_PER_J, r.carbon_g, r.water_site_l + r.water_offsite_l,
                r.cpu_time_ns / 1e9))



def _same_job(row: JobRow, info: SlurmJob) -> bool:
    """Whether Slurm's job `info` is the job `row` accounts for."""
    if "provisional" in (row.meta or {}):
        # Only first_seen is known: the job had started by then, and had not ended long before.
        return ((info.start_time is None or info.start_time <= row.first_seen + 2)
                and (info.end_time is None or info.end_time >= row.first_seen - 60))
    return row.submit_time == info.submit_time
