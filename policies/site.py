"""The site as the engine sees it: clusters with partitions, power model, factors and Slurm access,
compiled once from the validated configuration into plain objects that are quick to read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from greend import carbon_feed
from greend import quantities as q
from greend.errors import ConfigError
from greend.footprint import Factors
from greend.site_factors import cluster_factors

from .carbon import CarbonWindow
from .records import Record

if TYPE_CHECKING:  # compiled from a Config or its cached view (greend.config_cache)
    from greend import config as config_mod


class PartitionSpec(Record):
    name: str
    default: bool
    max_walltime_s: int | None
    default_walltime_s: int | None
    max_cpus: int | None
    max_nodes: int | None
    cpus_per_node: int | None
    mem_per_node_mb: float | None
    def_mem_per_cpu_mb: float | None
    max_gpus: int | None
    gpus_per_node: int | None
    gpu_types: frozenset[str] | None

    __slots__ = (
        "cpus_per_node", "def_mem_per_cpu_mb", "default", "default_walltime_s", "gpu_types", "gpus_per_node",
        "max_cpus", "max_gpus", "max_nodes", "max_walltime_s", "mem_per_node_mb", "name",
    )

    def __init__(
        self,
        name: str,
        default: bool = False,
        max_walltime_s: int | None = None,
        default_walltime_s: int | None = None,
        max_cpus: int | None = None,
        max_nodes: int | None = None,
        cpus_per_node: int | None = None,
        mem_per_node_mb: float | None = None,
        def_mem_per_cpu_mb: float | None = None,
        max_gpus: int | None = None,
        gpus_per_node: int | None = None,
        gpu_types: frozenset[str] | None = None,
    ):
        self.name = name
        self.default = default
        self.max_walltime_s = max_walltime_s
        self.default_walltime_s = default_walltime_s
        self.max_cpus = max_cpus
        self.max_nodes = max_nodes
        self.cpus_per_node = cpus_per_node
        self.mem_per_node_mb = mem_per_node_mb
        self.def_mem_per_cpu_mb = def_mem_per_cpu_mb
        self.max_gpus = max_gpus
        self.gpus_per_node = gpus_per_node
        self.gpu_types = gpu_types


class SlurmSpec(Record):
    conf: Path | None
    bin_dir: Path | None
    timeout_s: float
    submit_timeout_s: float
    transport: str
    cluster_name: str | None
    rest_url: str | None
    rest_api: str
    token_env: str
    token_file: Path | None
    ssh_host: str | None
    ssh_user: str | None
    ssh_port: int | None
    ssh_options: tuple[str, ...]
    key: str

    __slots__ = ("bin_dir", "cluster_name", "conf", "key", "rest_api", "rest_url", "ssh_host", "ssh_options",
                 "ssh_port", "ssh_user", "submit_timeout_s", "timeout_s", "token_env", "token_file",
                 "transport")

    def __init__(self, conf: Path | None, bin_dir: Path | None, timeout_s: float, submit_timeout_s: float,
                 transport: str = "conf", cluster_name: str | None = None, rest_url: str | None = None,
                 rest_api: str = "v0.0.38", token_env: str = "SLURM_JWT", token_file: Path | None = None,
                 ssh_host: str | None = None, ssh_user: str | None = None, ssh_port: int | None = None,
                 ssh_options: tuple[str, ...] = (), key: str = "clusters.?.slurm"):
        self.conf = conf
        self.bin_dir = bin_dir
        self.timeout_s = timeout_s
        self.submit_timeout_s = submit_timeout_s
        self.transport = transport
        self.cluster_name = cluster_name
        self.rest_url = rest_url.rstrip("/") if rest_url else None
        self.rest_api = rest_api
        self.token_env = token_env
        self.token_file = token_file
        self.ssh_host = ssh_host
        self.ssh_user = ssh_user
        self.ssh_port = ssh_port
        self.ssh_options = tuple(ssh_options)
        self.key = key  # where these settings are in the configuration, for error messages

    def command(self, name: str) -> str:
        return str(self.bin_dir / name) if self.bin_dir else name

    def argv(self, argv: list[str]) -> list[str]:
        """A Slurm command line for this cluster: with multi-cluster, `--clusters=NAME` after the
        command (sbatch, squeue, sinfo, sacct, scancel all take it)."""
        if self.transport == "multi-cluster" and self.cluster_name:
            return [self.command(argv[0]), f"--clusters={self.cluster_name}", *argv[1:]]
        return [self.command(argv[0]), *argv[1:]]

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        if self.conf is not None:
            env["SLURM_CONF"] = str(self.conf)
        return env

    def describe(self) -> dict:
        """The transport and why (for the decision JSON and its explanation)."""
        if self.transport == "multi-cluster":
            return {"transport": "multi-cluster", "cluster_name": self.cluster_name,
                    "why": f"registered in the same slurmdbd as this site: sbatch/squeue/sinfo "
                           f"-M {self.cluster_name}" + (f" through {self.conf}" if self.conf else "")}
        if self.transport == "ssh":
            who = f"{self.ssh_user}@" if self.ssh_user else ""
            port = f" port {self.ssh_port}" if self.ssh_port else ""
            return {"transport": "ssh", "ssh_host": self.ssh_host, "ssh_user": self.ssh_user,
                    "ssh_port": self.ssh_port,
                    "why": f"another administrative domain: its login node {who}{self.ssh_host}{port} "
                           "through the user's own ssh (their keys, agent and known_hosts; never "
                           "root's): sbatch/squeue/sinfo run there"}
        if self.transport == "rest":
            return {"transport": "rest", "rest_url": self.rest_url,
                    "why": f"another administrative domain: its slurmrestd at {self.rest_url}, "
                           f"with the user's own token (${self.token_env}"
                           + (f" or {self.token_file}" if self.token_file else "") + ")"}
        return {"transport": "conf",
                "why": "same munge domain: Slurm commands with SLURM_CONF="
                       + (str(self.conf) if self.conf else "(default)")}


class PowerSpec(Record):
    cpu_w_per_core: float
    cpu_usage: float
    memory_w_per_gb: float
    gpu_tdp_w: dict[str, float]
    default_gpu_w: float
    gpu_usage: float
    sources: dict[str, str]

    __slots__ = (
        "cpu_usage", "cpu_w_per_core", "default_gpu_w", "gpu_tdp_w", "gpu_usage", "memory_w_per_gb",
        "sources",
    )

    def __init__(
        self,
        cpu_w_per_core: float,
        cpu_usage: float,
        memory_w_per_gb: float,
        gpu_tdp_w: dict[str, float],
        default_gpu_w: float,
        gpu_usage: float,
        sources: dict[str, str],
    ):
        self.cpu_w_per_core = cpu_w_per_core
        self.cpu_usage = cpu_usage
        self.memory_w_per_gb = memory_w_per_gb
        self.gpu_tdp_w = gpu_tdp_w
        self.default_gpu_w = default_gpu_w
        self.gpu_usage = gpu_usage
        self.sources = sources

    def gpu_w(self, gpu_type: str | None) -> float:
        if gpu_type and gpu_type in self.gpu_tdp_w:
            return self.gpu_tdp_w[gpu_type]
        return self.default_gpu_w


class ClusterSpec(Record):
    name: str
    index: int
    tier: str
    hds: bool
    open: bool
    accounts: frozenset[str] | None
    gpu_types: frozenset[str]
    data_stores: frozenset[str]
    partitions: tuple[PartitionSpec, ...]
    slurm: SlurmSpec
    power: PowerSpec
    factors: Factors
    """Static factors (carbon intensity without the series), with sources."""
    carbon: CarbonWindow
    config: config_mod.Cluster

    __slots__ = (
        "accounts", "carbon", "config", "data_stores", "factors", "gpu_types", "hds", "index", "name", "open",
        "partitions", "power", "slurm", "tier",
    )

    def __init__(
        self,
        name: str,
        index: int,
        tier: str,
        hds: bool,
        open: bool,
        accounts: frozenset[str] | None,
        gpu_types: frozenset[str],
        data_stores: frozenset[str],
        partitions: tuple[PartitionSpec, ...],
        slurm: SlurmSpec,
        power: PowerSpec,
        factors: Factors,
        carbon: CarbonWindow,
        config: config_mod.Cluster,
    ):
        self.name = name
        self.index = index
        self.tier = tier
        self.hds = hds
        self.open = open
        self.accounts = accounts
        self.gpu_types = gpu_types
        self.data_stores = data_stores
        self.partitions = partitions
        self.slurm = slurm
        self.power = power
        self.factors = factors
        self.carbon = carbon
        self.config = config

    def partition(self, name: str) -> PartitionSpec | None:
        for p in self.partitions:
            if p.name == name:
                return p
        return None

    @property
    def default_partition(self) -> PartitionSpec | None:
        for p in self.partitions:
            if p.default:
                return p
        return self.partitions[0] if self.partitions else None

    def factors_for(self, start: float, end: float) -> Factors:
        """Factors with the mean carbon intensity over [start, end] and its source."""
        if not self.carbon.has_series:
            return self.factors
        ci = self.carbon.mean(start, end)
        src = dict(self.factors.sources)
        gap = self.carbon.coverage_note(start, end)
        src["carbon_intensity_g_per_kwh"] = (
            f"mean of {self.carbon.source} over the job's run"
            + (f"; WARNING: {gap}" if gap else "")
        )
        return Factors(self.factors.pue, self.factors.wue_site_l_per_kwh, self.factors.ewif_l_per_kwh,
                       ci, src)


class Settings(Record):
    live_state: bool
    state_max_age_s: float
    state_cache: Path | None
    default_walltime_s: int
    default_mem_per_cpu_mb: float
    history_days: float
    history_max_jobs: int
    ledger: Path | None

    __slots__ = (
        "default_mem_per_cpu_mb", "default_walltime_s", "history_days", "history_max_jobs", "ledger",
        "live_state", "state_cache", "state_max_age_s",
    )

    def __init__(
        self,
        live_state: bool,
        state_max_age_s: float,
        state_cache: Path | None,
        default_walltime_s: int,
        default_mem_per_cpu_mb: float,
        history_days: float,
        history_max_jobs: int,
        ledger: Path | None,
    ):
        self.live_state = live_state
        self.state_max_age_s = state_max_age_s
        self.state_cache = state_cache
        self.default_walltime_s = default_walltime_s
        self.default_mem_per_cpu_mb = default_mem_per_cpu_mb
        self.history_days = history_days
        self.history_max_jobs = history_max_jobs
        self.ledger = ledger


class Site(Record):
    clusters: tuple[ClusterSpec, ...]
    by_name: dict[str, ClusterSpec]
    settings: Settings
    config: config_mod.Config
    config_path: Path | None

    __slots__ = ("by_name", "clusters", "config", "config_path", "settings")

    def __init__(
        self,
        clusters: tuple[ClusterSpec, ...],
        by_name: dict[str, ClusterSpec],
        settings: Settings,
        config: config_mod.Config,
        config_path: Path | None = None,
    ):
        self.clusters = clusters
        self.by_name = by_name
        self.settings = settings
        self.config = config
        self.config_path = config_path

    def cluster(self, name: str) -> ClusterSpec:
        try:
            return self.by_name[name]
        except KeyError:
            raise ConfigError(
                f"unknown cluster {name!r}: the configuration defines {', '.join(self.by_name)}"
            ) from None


def _rel(path: Path | None, base: Path | None) -> Path | None:
    if path is None or path.is_absolute() or base is None:
        return path
    return base / path


def _secs(v) -> int | None:
    return None if v is None else q.parse_duration(v)


def _mb(v) -> float | None:
    return None if v is None else q.parse_memory_mb(v)


def _carbon(cfg: config_mod.Config, name: str, fetch: bool) -> tuple[Factors, CarbonWindow]:
    """A cluster's static factors and carbon window: its live signal (or the fallback it names,
    greend.carbon_feed, cached in the state dir), else its series, else the static value."""
    c = cfg.clusters[name]
    cf = cluster_factors(cfg, name)
    static = cf.at(-math.inf)  # before any series point: the static factors
    live = carbon_feed.resolve(name, c, static, cf.series,
                               cfg.resolved_state_dir() if c.carbon_signal is not None else None, fetch=fetch)
    window = CarbonWindow(static.carbon_intensity_g_per_kwh, live.times, live.values, live.max_gap_s,
                          live.source)
    if not live.times and live.note:
        static = carbon_feed.with_source(static, live.source)
    return static, window


def refresh_carbon(site: Site, fetch: bool = True) -> None:
    """Re-read the live carbon signals of a compiled site (a long-lived router: the daemon calls this
    periodically, e.g. every carbon_signal.refresh_s). Clusters without a signal are left alone."""
    for spec in site.clusters:
        if spec.config.carbon_signal is not None:
            spec.factors, spec.carbon = _carbon(site.config, spec.name, fetch)


def compile_site(cfg: config_mod.Config, config_path: str | Path | None = None, *,
                 carbon_fetch: bool = True) -> Site:
    """Plain, precomputed objects of the configuration. Relative paths (slurm.conf, bin_dir, the
    ledger, the state cache) are relative to the configuration file. A cluster's carbon_signal is
    read from its cache, or fetched (bounded by its timeout_s) when the cache is stale and
    carbon_fetch is true."""
    base = Path(config_path).resolve().parent if config_path else None
    pw = cfg.power
    clusters = []
    for i, (name, c) in enumerate(cfg.clusters.items()):
        parts = []
        for pname, p in c.partitions.items():
            parts.append(PartitionSpec(
                name=pname, default=p.default, max_walltime_s=_secs(p.max_walltime),
                default_walltime_s=_secs(p.default_walltime), max_cpus=p.max_cpus,
                max_nodes=p.max_nodes, cpus_per_node=p.cpus_per_node,
                mem_per_node_mb=_mb(p.mem_per_node), def_mem_per_cpu_mb=_mb(p.def_mem_per_cpu),
                max_gpus=p.max_gpus, gpus_per_node=p.gpus_per_node,
                gpu_types=frozenset(p.gpu_types) if p.gpu_types is not None else None,
            ))
        pm = c.power_model
        src = dict(pm.sources)
        if pm.cpu_w_per_core is None:
            src.setdefault("cpu_w_per_core", f"Green Algorithms 'Any' CPU, {pw.unknown_cpu_w_per_core:g} "
                           "W/core (power.unknown_cpu_w_per_core)")
        else:
            src.setdefault("cpu_w_per_core", "site configuration")
        if pm.memory_w_per_gb is None:
            src.setdefault("memory_w_per_gb", f"Green Algorithms, {pw.memory_w_per_gb:g} W/GB "
                           "(power.memory_w_per_gb)")
        src.setdefault("gpu_tdp_w", "site configuration" if pm.gpu_tdp_w else
                       f"Green Algorithms 'Any' GPU, {pw.gpu_tdp_w:g} W (power.gpu_tdp_w)")
        power = PowerSpec(
            cpu_w_per_core=pm.cpu_w_per_core or pw.unknown_cpu_w_per_core, cpu_usage=pm.cpu_usage,
            memory_w_per_gb=pw.memory_w_per_gb if pm.memory_w_per_gb is None else pm.memory_w_per_gb,
            gpu_tdp_w=dict(pm.gpu_tdp_w), default_gpu_w=pw.gpu_tdp_w, gpu_usage=pm.gpu_usage,
            sources=src,
        )
        static, window = _carbon(cfg, name, carbon_fetch)
        s = c.slurm
        clusters.append(ClusterSpec(
            name=name, index=i, tier=c.tier, hds=c.hds, open=c.open,
            accounts=frozenset(c.accounts) if c.accounts else None,
            gpu_types=frozenset(c.gpu_types), data_stores=frozenset(c.data_stores),
            partitions=tuple(parts),
            slurm=SlurmSpec(_rel(s.conf, base), _rel(s.bin_dir, base), s.timeout_s, s.submit_timeout_s,
                            transport=s.transport,
                            cluster_name=(s.cluster_name or name) if s.transport == "multi-cluster" else None,
                            rest_url=s.rest_url, rest_api=s.rest_api, token_env=s.token_env,
                            token_file=s.token_file, ssh_host=s.ssh_host, ssh_user=s.ssh_user,
                            ssh_port=s.ssh_port, ssh_options=tuple(s.ssh_options),
                            key=f"clusters.{name}.slurm"),
            power=power, factors=static, carbon=window, config=c,
        ))
    pol = cfg.policy
    settings = Settings(
        live_state=pol.live_state, state_max_age_s=pol.state_max_age_s,
        state_cache=_rel(pol.state_cache, base),
        default_walltime_s=q.parse_duration(pol.default_walltime) or 3600,
        default_mem_per_cpu_mb=q.parse_memory_mb(pol.default_mem_per_cpu),
        history_days=pol.history_days, history_max_jobs=pol.history_max_jobs,
        ledger=_rel(pol.ledger, base),
    )
    return Site(tuple(clusters), {c.name: c for c in clusters}, settings, cfg,
                Path(config_path) if config_path else None)
