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

from .history import MB, History, PastJob, Usage, _median

log = logging.getLogger(__name__)


class SacctHistory:
    """sacct queries for one cluster's accounting (all clusters of that slurmdbd with cluster=None)."""

    def __init__(self, sacct: Sacct, site, cluster: str | None = None):
        self.sacct = sacct
        self.site = site
        self.cluster = cluster

    def _spec(self, cluster: str):
        spec = self.site.by_name.get(cluster)
        return spec if spec is not None else self.site.clusters[0]

    def _modelled_j(self, j: SacctJob, usage: float | None = None) -> float:
        power = self._spec(j.cluster).power
        u = power.cpu_usage if usage is None else usage
        return j.elapsed_s * (max(j.alloc_cpus, 1.0) * power.cpu_w_per_core * u
                              + (j.alloc_mem_bytes or 0) / MB / 1024 * power.memory_w_per_gb
                              + j.alloc_gpus * power.default_gpu_w * power.gpu_usage)

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
        cpu_den = sum(p.cpus * p.elapsed_s for p in past)
        mem_ratios = [p.max_mem_mb / p.mem_mb for p in past if p.mem_mb > 0 and p.max_mem_mb > 0]
        gpu_den = sum(p.gpus * self._spec(p.cluster).power.default_gpu_w * p.elapsed_s
                      for p in measured if p.gpus > 0)
        return History(
            user=user, name=name, jobs=tuple(past),
            measured_j=sum(p.it_energy_j for p in measured), modelled_j=sum(p.modelled_j for p in measured),
            median_elapsed_s=_median([p.elapsed_s for p in past]),
            cpu_efficiency=sum(p.cpu_time_s for p in past) / cpu_den if cpu_den > 0 else None,
            peak_cpus_used=max(p.cpu_time_s / p.elapsed_s for p in past),
            mem_efficiency=max(mem_ratios) if mem_ratios else None,
            peak_mem_mb=max(p.max_mem_mb for p in past),
            gpu_use=sum(p.gpu_energy_j for p in measured if p.gpus > 0) / gpu_den if gpu_den > 0 else None,
        )

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
            f = self._spec(j.cluster).factors
            usage = min(j.cpu_efficiency, 1.0) if j.cpu_efficiency is not None else None
            kwh = self._modelled_j(j, usage) / J_PER_KWH
            fac += kwh * f.pue * J_PER_KWH
            carbon += kwh * f.pue * f.carbon_intensity_g_per_kwh
            water += kwh * (f.wue_site_l_per_kwh + f.pue * f.ewif_l_per_kwh)
        return Usage(account, since, len(jobs), fac, carbon, water)
