"""greend's configuration: one TOML file validated into typed objects, or the embedded default.

Errors name the file, the key and what was expected; `greend config check FILE` prints the result.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from . import config_env, refdata
from .config_env import (  # noqa: F401 - where the file is looked up; re-exported
    CONFIG_NAME,
    SYSCONFDIR_ENV,
    locate,
    system_config_path,
    user_config_path,
)
from .errors import ConfigError
from .policy_config import Partition, PolicyConfig, PowerModel, SlurmAccess

# The defaults for a site that has not measured its own factors (docs/methodology.md §3-4) and the
# factors in force at a time live in greend.site_factors, which the fast paths of `measure` and
# `route` use without pydantic; re-exported here.
from .site_factors import (  # noqa: F401
    DEFAULT_PUE,
    DEFAULT_PUE_SOURCE,
    DEFAULT_WUE,
    DEFAULT_WUE_SOURCE,
    CarbonSeries,
    ClusterFactors,
    FactorsCache,
    cluster_factors,
)

DEFAULT_PORT = 9471  # greend's documented default exporter/API port
DEFAULT_COUNTRY = "FRA"



class _Model(BaseModel):
    # defer_build: a model's validator is built when first used, not when greend.config is
    # imported: commands that use the embedded default never build one (see _defaults).
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class Sampling(_Model):
    interval_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """Daemon sampling period. Must stay below the RAPL wrap time (max_energy_range_uj / P_max)."""
    measure_interval_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    """Sampling period of `greend measure` (short commands need finer sampling)."""
    series_step_s: Annotated[int, Field(ge=1, le=86400)] = 60
    """Width of one point of a job's stored time series."""
    checkpoint_interval_s: Annotated[float, Field(gt=0, le=3600)] = 15.0
    """How often the daemon commits its books to the ledger (a crash loses no energy: counters
    resume from the last checkpoint, but metadata seen after it is re-read)."""


class Paths(_Model):
    procfs: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    cgroupfs: Path = Path("/sys/fs/cgroup")


class Attribution(_Model):
    idle_power: Literal["allocated", "unattributed"] = "allocated"
    """allocated: a node's idle power is shared among running jobs by allocated cores (the node is
    powered for them; HPC practice). unattributed: idle power stays in the remainder (Kepler)."""
    jobs_from: Literal["auto", "cgroup", "procscan"] = "auto"
    """Where per-job CPU time comes from: Slurm job cgroups, a process scan, or auto (cgroups
    when a Slurm cgroup tree exists, else the scan)."""


class Power(_Model):
    rapl: bool = True
    cpu_model: str = ""
    """Override the CPU model name used to look up the TDP (default: /proc/cpuinfo)."""
    cpu_tdp_w: Annotated[float, Field(ge=0)] = 0.0
    """Override the node's total CPU TDP in watts (0: look it up in CodeCarbon's table)."""
    unknown_cpu_w_per_core: Annotated[float, Field(gt=0)] = 12.0
    memory_w_per_gb: Annotated[float, Field(ge=0)] = 0.3725
    gpu_tdp_w: Annotated[float, Field(ge=0)] = 200.0


Switch = Literal["auto", "on", "off"]


class Collectors(_Model):
    """[collectors]: one switch per collector of collectors/registry.py. auto: used when its source
    exists; on: required (greend refuses to start without it); off: never opened."""

    rapl: Switch = "auto"
    nvml: Switch = "auto"
    cgroups: Switch = "auto"
    procscan: Switch = "auto"

    @model_validator(mode="after")
    def _a_job_source(self) -> Collectors:
        if self.cgroups == "off" and self.procscan == "off":
            raise ValueError("cgroups and procscan are both off: greend needs a job source "
                             "(switch one to auto or on)")
        return self


def _http_url(v: str):
    """urlsplit(v), refusing a bad port (ValueError, as pydantic validators raise)."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(v)
        u.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"bad URL: {e}") from None
    return u


def _check_listen(v: str) -> str:
    from .errors import DaemonError
    from .http import parse_listen

    try:
        parse_listen(v, "")
    except DaemonError as e:
        raise ValueError(str(e).strip()) from None
    return v


class Daemon(_Model):
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    """HOST:PORT of the HTTP exporter and API (/metrics, /healthz, /api/v1). Loopback by default."""
    socket: Path | None = None
    """Unix socket of the API for local users, whose identity comes from the socket (SO_PEERCRED).
    Default: /run/greend/api.sock as root, else <state_dir>/api.sock. Empty string: no socket."""
    private_jobs: bool = False
    """Like Slurm's PrivateData=jobs: a user sees only their own jobs' details."""
    admins: list[str] = Field(default_factory=lambda: ["root"])
    """Users (or @group) who see every job even with private_jobs."""
    user_label: bool = True
    """Put the user name on per-job metrics (switch off for privacy)."""
    finished_job_grace_s: Annotated[float, Field(ge=0, le=7 * 86400)] = 300.0
    """How long a finished job stays on /metrics; its record stays in the ledger and the API."""
    factor_refresh_s: Annotated[float, Field(gt=0)] = 300.0
    """How often a changed carbon intensity series file is re-read."""
    decision_max_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 64 << 10
    """Largest routing decision accepted on POST /api/v1/decisions (larger: 413)."""
    decisions_per_minute: Annotated[int, Field(ge=1, le=100000)] = 60
    """Routing decisions one user may post in any minute (more: 429); admins are not limited."""
    route_per_minute: Annotated[int, Field(ge=1, le=100000)] = 600
    """Route requests (POST /api/v1/route, a cli_filter's at each sbatch) one user may make in any
    minute (more: 429, and the cli_filter lets the job go as asked); admins are not limited."""
    route_warm: bool = False
    """Set up the policy router for POST /api/v1/route at start and keep the clusters' state
    fresh from then on (login nodes, where sbatch runs); otherwise at the first route request,
    so compute nodes never poll Slurm for it."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _check_listen(v)


class Slurm(_Model):
    """How this node's greend reaches its cluster's Slurm for job metadata (docs/slurm.md)."""

    enabled: bool | Literal["auto"] = "auto"
    """Read job metadata from Slurm; auto: when squeue is found (bin_dir or PATH) and Slurm's
    configuration too (conf, $SLURM_CONF, a default slurm.conf or slurmd's configless copy)."""
    conf: Path | None = None
    """The cluster's slurm.conf (SLURM_CONF for the commands); unset: the commands' default."""
    bin_dir: Path | None = None
    """Directory of squeue and scontrol; unset: looked up in PATH."""
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    """Limit for one Slurm command; a controller that does not answer in time is reported."""
    refresh_s: Annotated[float, Field(gt=0, le=86400)] = 30.0
    """How often the job metadata is re-read (and at once, at most once per sample, when a job
    appears that is not known yet)."""
    write_back: Literal["none", "admin_comment", "comment"] = "none"
    """Write jobs' footprints into their AdminComment (needs root or SlurmUser) or Comment."""
    write_back_interval_s: Annotated[float, Field(ge=0, le=86400)] = 300.0
    """While a job runs, its footprint so far is written this often (0: only when it ends), since
    Slurm refuses to update a job that has finished; one scontrol call per job each time."""
    pyslurm: bool = True
    """Use pyslurm when it is installed and built for the running Slurm release (else commands)."""
    discovery: Literal["local", "squeue"] = "local"
    """How the node learns its jobs. local: from slurmd's Prolog/Epilog hook (`greend slurmd-hook`)
    and the job cgroups or process environments, asking slurmctld about one job at a time by id
    (`scontrol show job`), at most lookups_per_minute; squeue: the whole queue (`squeue --json`, or
    pyslurm) every refresh_s, one full dump per node, which a large cluster's slurmctld feels."""
    spool_dir: Path = Path("/run/greend/slurm-jobs")
    """Where `greend slurmd-hook prolog|epilog` leaves its records (root-owned, mode 700)."""
    lookups_per_minute: Annotated[float, Field(gt=0, le=6000)] = 12.0
    """Local discovery: by-id questions to slurmctld per minute on average (a token bucket)."""
    lookup_burst: Annotated[int, Field(ge=1, le=10000)] = 30
    """Local discovery: by-id questions allowed at once (when many jobs start together)."""


class Controller(_Model):
    """Site mode (docs/site-mode.md): every node's greend sends its job records to one controller,
    `greend controller`, which keeps the site's ledger. Agents read url and token_file and the
    send_* keys; the controller reads token_file, listen, state_dir, socket and the limits."""

    url: str | list[str] = ""
    """Agents: base URL of the site controller, e.g. "http://ctl.example.org:9472", or a list of
    the URLs of several controllers sharing one site database (controller.database), tried in
    order: a connection error, a timeout or an HTTP 5xx moves on to the next. Empty: this node
    keeps its records to itself (no site mode)."""
    token_file: Path | None = None
    """Both sides: file holding the site's shared secret; must be readable by its owner only
    (chmod 600), owned by root or greend's user. Required with url, and for the controller."""
    send_interval_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """Agents: how often queued records are sent when the outbox is drained."""
    batch_records: Annotated[int, Field(ge=1, le=10000)] = 500
    """Agents: most job records in one request (a backlog drains in batches, back to back)."""
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    """Agents: timeout of one request to the controller."""
    backoff_max_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """Agents: longest wait between retries while the controller is unreachable (the wait
    doubles from 1 s up to this)."""
    unreachable_after_s: Annotated[float, Field(ge=0, le=86400)] = 120.0
    """Agents: /healthz says degraded once the controller has been unreachable this long."""
    listen: str = "127.0.0.1:9472"
    """Controller: HOST:PORT it serves on (records from agents, the read API, /metrics). Loopback
    by default: set e.g. "0.0.0.0:9472" so that agents can reach it."""
    state_dir: Path | None = None
    """Controller: where the site ledger lives (default: <state_dir>/controller)."""
    socket: Path | None = None
    """Controller: unix socket of its read API (default: /run/greend/controller.sock as root, else
    <controller state_dir>/api.sock). Empty string: no socket."""
    max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 8 << 20
    """Controller: largest request body accepted (larger: 413)."""
    max_batch_records: Annotated[int, Field(ge=1, le=100000)] = 10000
    """Controller: most records accepted in one request (more: 400)."""
    agent_stale_s: Annotated[float, Field(gt=0)] = 300.0
    """Controller: an agent not heard from for this long no longer counts as reporting."""
    tls_cert_file: Path | None = None
    """Controller: PEM certificate (chain) of its HTTPS listener; with tls_key_file. Unset: plain
    HTTP, meant for loopback (docs/security.md)."""
    tls_key_file: Path | None = None
    """Controller: PEM private key of tls_cert_file (readable by greend only)."""
    ca_file: Path | None = None
    """Agents: PEM CA certificate(s) that an https:// url's certificate must chain to (default:
    the system's trusted CAs)."""
    # Records across sites (docs/site-mode.md, "An institute controller"; greend/forward.py).
    site: str = ""
    """Controller: this site's name. With upstream_url, forwarded cluster and node names become
    "SITE:NAME", so that two sites' clusters (both "local", say) stay apart upstream."""
    upstream_url: str = ""
    """Controller: base URL of an institute controller this one forwards what it stores to, as an
    agent does (same batches, token, outbox, retries; send_interval_s, batch_records, timeout_s,
    backoff_max_s apply). Empty: no forwarding."""
    upstream_token_file: Path | None = None
    """Controller: the institute's token (required with upstream_url); same rules as token_file."""
    upstream_ca_file: Path | None = None
    """Controller: PEM CA certificate(s) for an https:// upstream_url (default: the system's)."""
    database: str = "sqlite"
    """Controller: where the site ledger lives. "sqlite" (default): a file in state_dir, one
    controller. A database server shared by several controllers: "mysql+pymysql://USER@HOST:PORT/DB"
    (MariaDB/MySQL) or "postgresql+psycopg://USER@HOST:PORT/DB", with greend's `sitedb` extra
    installed. No password in the URL: see database_password_file (docs/site-mode.md)."""
    database_password_file: Path | None = None
    """Controller: file holding the database user's password (chmod 600, like token_file)."""

    @property
    def urls(self) -> list[str]:
        """The controllers' URLs, in the order agents try them ([] without site mode)."""
        if isinstance(self.url, list):
            return list(self.url)
        return [self.url] if self.url else []

    @field_validator("database")
    @classmethod
    def _database(cls, v: str) -> str:
        if v == "sqlite":
            return v
        from .sitedb import check_url

        return check_url(v)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _check_listen(v)

    @field_validator("url", "upstream_url")
    @classmethod
    def _url(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError('expected at least one URL, or "" for no site mode')
            out = []
            for i, u in enumerate(v):
                try:
                    out.append(cls._one_url(u))
                except ValueError as e:
                    raise ValueError(f"url[{i}] {u!r}: {e}") from None
                if not out[-1]:
                    raise ValueError(f"url[{i}]: empty")
            if len(set(out)) != len(out):
                raise ValueError("a URL is listed twice")
            return out
        return cls._one_url(v)

    @staticmethod
    def _one_url(v: str) -> str:
        if not v:
            return v
        u = _http_url(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError('expected http://HOST:PORT or https://HOST:PORT, e.g. "http://ctl:9472"')
        if u.query or u.fragment:
            raise ValueError("expected a base URL without ?query or #fragment")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _token_with_url(self) -> Controller:
        if self.url and self.token_file is None:
            raise ValueError("controller.url is set but controller.token_file is not: agents "
                             "authenticate to the controller with the site's token")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("controller.tls_cert_file and controller.tls_key_file go together: "
                             "set both (HTTPS) or neither (plain HTTP)")
        if self.upstream_url:
            if self.upstream_token_file is None:
                raise ValueError("controller.upstream_url is set but controller.upstream_token_file "
                                 "is not: the institute controller authenticates with its token")
            if not self.site:
                raise ValueError('controller.upstream_url is set but controller.site is not: name '
                                 'this site (e.g. site = "lyon"); forwarded records carry it')
            if self.database != "sqlite":
                raise ValueError("controller.upstream_url with controller.database on a server: "
                                 "forwarding reads its outbox from the SQLite site ledger, so a "
                                 "forwarding site controller keeps database = \"sqlite\" (the "
                                 "institute controller it forwards to may use a server)")
        if self.site and (":" in self.site or len(self.site) > 64 or not self.site.isprintable()
                          or self.site != self.site.strip()):
            raise ValueError(f"controller.site {self.site!r}: expected a short name without ':' "
                             "or surrounding spaces (it prefixes cluster and node names upstream)")
        return self


class CarbonSignal(_Model):
    """A live carbon intensity signal for a cluster (docs/configuration.md, "Carbon signal")."""

    provider: Literal["rte-eco2mix", "electricitymaps", "uk-carbon-intensity"]
    zone: str = ""
    """Grid zone: FR for rte-eco2mix, GB for uk-carbon-intensity (their defaults), an Electricity
    Maps zone (e.g. "FR", "DE") for electricitymaps (required)."""
    url: str = ""
    """Base URL of the provider's API (default: the provider's public one)."""
    token_file: Path | None = None
    """electricitymaps: file holding the API token (sent as the auth-token header)."""
    timeout_s: Annotated[float, Field(gt=0, le=30)] = 2.0
    """Longest a decision waits for the provider when the cached signal is stale."""
    refresh_s: Annotated[float, Field(ge=60, le=86400)] = 900.0
    """A cached signal younger than this is used without asking the provider."""
    retry_s: Annotated[float, Field(ge=0, le=86400)] = 120.0
    """After a failed fetch, the provider is not asked again for this long (the fallback stands)."""
    max_age_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 6 * 3600.0
    """A cached signal older than this is not used; the series or the static value is."""
    forecast: Literal["provider", "persistence-24h"] = "provider"
    """provider: the provider's forecast only (eCO2mix has none). persistence-24h: when the provider
    gives no forecast, the last 24 h observed are repeated as the next 24 h (a naive baseline)."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v:
            return v
        u = _http_url(v)
        if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
            raise ValueError('expected the base URL of the provider\'s API, http(s)://HOST[:PORT][/PATH] '
                             'without ?query, e.g. "https://api.carbonintensity.org.uk"')
        return v.rstrip("/")

    @model_validator(mode="after")
    def _zone_and_token(self) -> CarbonSignal:
        zone = self.zone.upper()
        if self.provider == "rte-eco2mix" and zone not in ("", "FR"):
            raise ValueError(f"carbon_signal.zone {self.zone!r}: rte-eco2mix covers France only "
                             '(zone "FR")')
        if self.provider == "uk-carbon-intensity" and zone not in ("", "GB"):
            raise ValueError(f"carbon_signal.zone {self.zone!r}: uk-carbon-intensity reads the GB "
                             'national series (zone "GB")')
        if self.provider == "electricitymaps":
            if not zone:
                raise ValueError('carbon_signal.zone is required for electricitymaps, e.g. "FR"')
            if self.token_file is None:
                raise ValueError("carbon_signal.token_file is required for electricitymaps (the "
                                 "API token, sent as the auth-token header)")
        return self


class Cluster(_Model):
    tier: Literal["local", "site", "national"] = "local"
    country: str = DEFAULT_COUNTRY
    """ISO 3166-1 alpha-3 code; picks the default carbon intensity and EWIF from CodeCarbon's data."""
    pue: Annotated[float, Field(ge=1.0, le=5.0)] = DEFAULT_PUE
    wue_site_l_per_kwh: Annotated[float, Field(ge=0, le=20)] = DEFAULT_WUE
    ewif_l_per_kwh: Annotated[float, Field(ge=0, le=50)] | None = None
    carbon_intensity_g_per_kwh: Annotated[float, Field(ge=0, le=2000)] | None = None
    carbon_intensity_series: Path | None = None
    """CSV of `timestamp,g_per_kwh` rows (ISO 8601, e.g. hourly); the static value fills the gaps."""
    carbon_signal: CarbonSignal | None = None
    """Live intensity and forecast from a provider, cached; the series, then the static value, stand
    in when it cannot be read (greend.carbon_feed)."""
    hds: bool = False
    open: bool = True
    sources: dict[str, str] = Field(default_factory=dict)
    """Where each factor comes from, by factor name (pue, wue_site_l_per_kwh, ...)."""
    slurm: SlurmAccess = Field(default_factory=SlurmAccess)
    """How to reach this cluster's Slurm controller (SLURM_CONF, commands, timeouts)."""
    partitions: dict[str, Partition] = Field(default_factory=dict)
    """Partitions and their limits, in order of preference; empty: one unnamed, unlimited."""
    accounts: list[str] = Field(default_factory=list)
    """Projects (Slurm accounts) allowed to run here; empty: any."""
    gpu_types: list[str] = Field(default_factory=list)
    data_stores: list[str] = Field(default_factory=list)
    """Data stores (file systems, object stores) local to this cluster, for the data_locality rule."""
    power_model: PowerModel = Field(default_factory=PowerModel)
    """Power model of this cluster's nodes for estimates before a job runs."""

    @field_validator("country")
    @classmethod
    def _known_country(cls, v: str) -> str:
        v = v.upper()
        if v not in refdata.known_countries():
            raise ValueError(
                f"unknown country code {v!r}: expected an ISO 3166-1 alpha-3 code present in "
                "CodeCarbon's energy mix data (e.g. FRA, DEU, USA)"
            )
        return v


class Config(_Model):
    cluster: str = "local"
    """The cluster this node belongs to (a key of [clusters])."""
    node: str = ""
    """This node's name (default: the short hostname)."""
    state_dir: Path | None = None
    """Where the ledger lives (default: /var/lib/greend as root, else $XDG_STATE_HOME/greend)."""
    sampling: Sampling = Field(default_factory=Sampling)
    paths: Paths = Field(default_factory=Paths)
    attribution: Attribution = Field(default_factory=Attribution)
    power: Power = Field(default_factory=Power)
    collectors: Collectors = Field(default_factory=Collectors)
    daemon: Daemon = Field(default_factory=Daemon)
    slurm: Slurm = Field(default_factory=Slurm)
    controller: Controller = Field(default_factory=Controller)
    clusters: dict[str, Cluster] = Field(default_factory=lambda: {"local": _defaults(Cluster)})
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """Routing rules, budgets and live-state settings (docs/policy.md)."""

    @model_validator(mode="after")
    def _cluster_exists(self) -> Config:
        if self.cluster not in self.clusters:
            raise ValueError(
                f"cluster {self.cluster!r} is not defined: expected one of "
                f"{sorted(self.clusters)} (a [clusters.{self.cluster}] table)"
            )
        return self

    # The members that depend on the machine are computed by greend.config_env, for the model and
    # for its cached view (greend.config_cache) alike.
    @property
    def node_name(self) -> str:
        return config_env.node_name_of(self.node)

    # `--state-dir` on the command line: beats $GREEND_STATE_DIR, which beats state_dir.
    _state_dir_flag: Path | None = PrivateAttr(default=None)

    def resolved_state_dir(self) -> Path:
        return config_env.state_dir_of(self._state_dir_flag, self.state_dir)


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid configuration:"]
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        loc = ".".join(str(p) for p in e["loc"])
        if not loc:  # model-level checks name their key first ("cluster 'x' is not defined")
            loc = msg.split(" ", 1)[0] if msg.split(" ", 1)[0].isidentifier() else "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; docs/configuration.md lists every key)"
        got = e.get("input")
        if isinstance(got, str):  # a URL's password (controller.database) is never echoed
            got = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", got)
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else (
            f" (got {got!r})"
        )
        lines.append(f"  key '{loc}': {msg}{shown}")
    return "\n".join(lines)


def parse(data: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from None


_M = TypeVar("_M", bound=BaseModel)


def _defaults(cls: type[_M]) -> _M:
    """`cls()` without running validation: every field at its default, sub-models built the same
    way. The embedded default is what `greend measure` loads on most runs, and validating it would
    first build every model's validator (the models defer that: ~30 ms at each start,
    docs/performance.md). The defaults are valid; tests/test_cli_startup.py checks the result equals
    `Config()`."""
    values = {}
    for name, field in cls.model_fields.items():
        factory = field.default_factory
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            values[name] = _defaults(factory)
    return cls.model_construct(_fields_set=set(), **values)


def load(path: str | os.PathLike | None) -> Config:
    """Load and validate a config file; None gives the embedded default."""
    if path is None:
        return _defaults(Config)
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    cfg = parse(data, str(p))
    # Relative series paths are relative to the config file, as a reader of the file expects.
    clusters = {}
    for name, c in cfg.clusters.items():
        if c.carbon_intensity_series is not None and not c.carbon_intensity_series.is_absolute():
            c = c.model_copy(update={"carbon_intensity_series": p.parent / c.carbon_intensity_series})
        sig = c.carbon_signal
        if sig is not None and sig.token_file is not None and not sig.token_file.is_absolute():
            sig = sig.model_copy(update={"token_file": p.parent / sig.token_file})
            c = c.model_copy(update={"carbon_signal": sig})
        clusters[name] = c
    cfg = cfg.model_copy(update={"clusters": clusters})
    for name in cfg.clusters:
        cluster_factors(cfg, name)  # fail now on a bad series, not at first sample
    return cfg


def to_toml(cfg: Config) -> str:
    """The effective configuration as TOML (defaults filled in), for `greend config check`."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    return _dump_toml(data)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _toml_value(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()
                                if x is not None) + " }"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def _is_table_array(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _dump_toml(data: dict, prefix: str = "") -> str:
    """TOML text of plain data: scalars first, then [tables], then [[arrays of tables]]."""
    out = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items()
           if v is not None and not isinstance(v, dict) and not _is_table_array(v)]
    for k, v in data.items():
        name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
        if isinstance(v, dict):
            body = _dump_toml(v, name)
            out.append(f"\n[{name}]" + (f"\n{body}" if body.strip() else ""))
        elif _is_table_array(v):
            for item in v:
                body = _dump_toml(item, name)
                out.append(f"\n[[{name}]]" + (f"\n{body}" if body.strip() else ""))
    text = "\n".join(out)
    return text.strip("\n") + "\n" if prefix == "" else text.strip("\n")
