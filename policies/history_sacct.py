"""History and usage from Slurm's accounting (sacct): the site's whole record, jobs greend never saw
included, for the engine's history (similar jobs) and the budgets (an account's usage).

A job counts as measured where its AdminComment holds greend's figures (`greend slurm epilog`);
otherwise it contributes its CPU and memory efficiency and elapsed time to the history, and the
model's estimate (Green Algorithms, docs/methodology.md §6, with the cluster's factors) to usage.
LedgerView consults this when its ledger has no similar jobs (LedgerView.sacct).
"""

from __future__ import annotations

import logging

from greend.collectors.sacct import Sacct, SacctError, SacctJob

from greend.slurm_acct import J_PER_KWH, decode

from .history import MB, History, PastJob, Usage, modelled_j, power_of, summarise

log = logging.getLogger(__name__)


class SacctHistory:
    """sacct queries for one cluster's accounting (all clusters of that slurmdbd with cluster=None)."""

    def __init__(self, sacct: Sacct, site, cluster: str | None = None):
        self.sacct = sacct
        self.site = site
        self.cluster = cluster

    def _modelled_j(self, j: SacctJob, usage: float | None = None) -> float:
        return modelled_j(power_of(self.site, j.cluster), j.elapsed_s, max(j.alloc_cpus, 1.0),
                          (j.alloc_mem_bytes or 0) / MB, j.alloc_gpus, usage)

    def _query(self, since: float, **kw) -> list[SacctJob]:
        try:
            return self.sacct.jobs(since, cluster=self.cluster, **kw)
        except SacctError as e:
            log.warning("sacct: %s", e)
            return []

    def similar(self, user: str, name: str, since: float, limit: int) -> History | None:
        jobs = [j for j in self._query(since, user=user, name=name) if j.elapsed_s > 0]
        jobs = sorted(jobs, key=lambda j: j.end_time or 0, reverse=True)[:limit]
        if not jobs:
            return None
        past = []
        for j in jobs:
            fig = decode(j.admin_comment)
            max_mem = j.max_rss_bytes or (fig.max_mem_bytes if fig and fig.max_mem_bytes else 0)
            past.append(PastJob(
                j.cluster, j.job_id, j.elapsed_s, max(j.alloc_cpus, 1.0), (j.alloc_mem_bytes or 0) / MB,
                j.alloc_gpus, j.cpu_time_s, fig.it_j if fig else 0.0, fig.gpu_j if fig else 0.0,
                max_mem / MB, self._modelled_j(j)))
        # Energy: only jobs greend measured, against their own model figures (the power ratio).
        measured = [p for p, j in zip(past, jobs, strict=True) if decode(j.admin_comment)]
        return summarise(self.site, user, name, past, measured)

    def usage(self, account: str, since: float) -> Usage | None:
        jobs = self._query(since, account=account)
        fac = carbon = water = 0.0
        for j in jobs:
            fig = decode(j.admin_comment)
            if fig is not None:
                fac += fig.facility_j
                carbon += fig.carbon_g
                water += fig.water_site_l + fig.water_offsite_l
                continue
            spec = self.site.by_name.get(j.cluster)
            f = (spec if spec is not None else self.site.clusters[0]).factors
            usage = min(j.cpu_efficiency, 1.0) if j.cpu_efficiency is not None else None
            kwh = self._modelled_j(j, usage) / J_PER_KWH
            fac += kwh * f.pue * J_PER_KWH
            carbon += kwh * f.pue * f.carbon_intensity_g_per_kwh
            water += kwh * (f.wue_site_l_per_kwh + f.pue * f.ewif_l_per_kwh)
        return Usage(account, since, len(jobs), fac, carbon, water)
