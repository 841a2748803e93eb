"""A job's footprint before it runs, on one cluster (docs/methodology.md §6, Green Algorithms):

    E_IT = t x (n_c x P_c x u_c + n_m x P_m + n_g x P_g x u_g)      (n_m: GB of memory requested)

then facility energy, carbon and water with that cluster's factors (greend.footprint). When the
ledger holds ended jobs of the same user with the same name, two corrections apply and are stated:
the power ratio measured / modelled of those jobs, and their median run time instead of the walltime
asked (never more than it).
"""

from __future__ import annotations

from greend import quantities as q
from greend.footprint import Factors, Footprint, footprint

from .history import History
from .records import Record
from .request import JobRequest, Resolved


class PowerDraw(Record):
    cpu_w: float
    memory_w: float
    gpu_w: float

    __slots__ = ("cpu_w", "gpu_w", "memory_w")

    def __init__(self, cpu_w: float, memory_w: float, gpu_w: float):
        self.cpu_w = cpu_w
        self.memory_w = memory_w
        self.gpu_w = gpu_w

    @property
    def total_w(self) -> float:
        return self.cpu_w + self.memory_w + self.gpu_w


class Estimate(Record):
    cluster: str
    start: float
    runtime_s: float
    runtime_from: str
    walltime_s: int
    power: PowerDraw
    tasks: int
    model_it_energy_j: float
    """The plain model over the whole walltime, before any correction."""
    correction: float
    """Applied to the power: measured / modelled of similar jobs (1.0 without history)."""
    correction_from: str
    it_energy_j: float
    factors: Factors
    footprint: Footprint

    __slots__ = (
        "cluster", "correction", "correction_from", "factors", "footprint", "it_energy_j",
        "model_it_energy_j", "power", "runtime_from", "runtime_s", "start", "tasks", "walltime_s",
    )

    def __init__(
        self,
        cluster: str,
        start: float,
        runtime_s: float,
        runtime_from: str,
        walltime_s: int,
        power: PowerDraw,
        tasks: int,
        model_it_energy_j: float,
        correction: float,
        correction_from: str,
        it_energy_j: float,
        factors: Factors,
        footprint: Footprint,
    ):
        self.cluster = cluster
        self.start = start
        self.runtime_s = runtime_s
        self.runtime_from = runtime_from
        self.walltime_s = walltime_s
        self.power = power
        self.tasks = tasks
        self.model_it_energy_j = model_it_energy_j
        self.correction = correction
        self.correction_from = correction_from
        self.it_energy_j = it_energy_j
        self.factors = factors
        self.footprint = footprint

    @property
    def carbon_g(self) -> float:
        return self.footprint.carbon_g

    @property
    def water_l(self) -> float:
        return self.footprint.water_l

    def to_dict(self) -> dict:
        f = self.footprint
        return {
            "cluster": self.cluster, "start": q.iso(self.start),
            "runtime_s": round(self.runtime_s, 1), "runtime_from": self.runtime_from,
            "walltime_s": self.walltime_s, "array_tasks": self.tasks,
            "power_w": {"cpu": round(self.power.cpu_w, 2), "memory": round(self.power.memory_w, 2),
                        "gpu": round(self.power.gpu_w, 2), "total": round(self.power.total_w, 2)},
            "model_it_energy_j": round(self.model_it_energy_j, 1),
            "correction": round(self.correction, 4), "correction_from": self.correction_from,
            "it_energy_j": round(f.it_energy_j, 1), "facility_energy_j": round(f.facility_energy_j, 1),
            "energy_kwh": round(f.facility_energy_j / 3.6e6, 6),
            "carbon_g": round(f.carbon_g, 3), "water_site_l": round(f.water_site_l, 4),
            "water_offsite_l": round(f.water_offsite_l, 4), "water_l": round(f.water_l, 4),
            "factors": self.factors.to_dict(),
        }


def power_draw(power, cpus: int, mem_mb: float, gpus: int, gpu_type: str | None) -> PowerDraw:
    """The request's power on a cluster's model (power: site.PowerSpec)."""
    return PowerDraw(
        cpu_w=cpus * power.cpu_w_per_core * power.cpu_usage,
        memory_w=mem_mb / 1024 * power.memory_w_per_gb,
        gpu_w=gpus * power.gpu_w(gpu_type) * power.gpu_usage if gpus else 0.0,
    )


def estimate(cluster, r: JobRequest, res: Resolved, start: float, history: History | None) -> Estimate:
    """The footprint of request r on cluster (site.ClusterSpec) if it starts at `start`."""
    p = power_draw(cluster.power, r.cpus, res.mem_mb, r.gpus, r.gpu_type)
    tasks = max(r.array_tasks, 1)
    model_j = p.total_w * res.walltime_s * tasks
    correction, corr_from = 1.0, "no similar jobs in the ledger: model only"
    runtime, runtime_from = float(res.walltime_s), f"walltime ({res.walltime_from})"
    if history is not None and history.n:
        ratio = history.power_ratio
        if ratio is not None:
            correction = ratio
            corr_from = (f"{history.n} similar job(s) of {history.user} named {history.name!r}: measured "
                         f"{history.measured_j / 3.6e6:.4g} kWh / modelled {history.modelled_j / 3.6e6:.4g} "
                         f"kWh = x{ratio:.3g}")
        if history.median_elapsed_s < runtime:
            runtime = history.median_elapsed_s
            runtime_from = (f"median run time of {history.n} similar job(s) "
                            f"({q.human_duration(runtime)}, walltime {q.human_duration(res.walltime_s)})")
    it_j = p.total_w * correction * runtime * tasks
    factors = cluster.factors_for(start, start + runtime)
    return Estimate(cluster.name, start, runtime, runtime_from, res.walltime_s, p, tasks, model_j,
                    correction, corr_from, it_j, factors, footprint(it_j, factors))
