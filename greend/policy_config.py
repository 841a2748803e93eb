"""Configuration models of the routing policy: a cluster's Slurm access, partitions and power model,
and the [policy] table (rules in order, budgets, live-state and history settings).

Part of the configuration layer (greend/config.py builds on it). A rule's own parameters are the
policy engine's to check: the composition root (greend.cli.install_policy_checks) hands that check
down through greend.wiring, so that the core never imports the policies (docs/architecture.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from . import quantities as q
from . import wiring

TIERS = ("local", "site", "national")



class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


def _duration(v: str | int) -> str | int:
    try:
        q.parse_duration(v)
    except ValueError:
        raise ValueError(f"expected {q.DURATION_HELP}") from None  # the key and value are shown
    return v


def _memory(v: str | int | float) -> str | int | float:
    try:
        q.parse_memory_mb(v)
    except ValueError:
        raise ValueError(f"expected {q.MEMORY_HELP}") from None
    return v


Duration = Annotated[str | int, AfterValidator(_duration)]
"""A Slurm time string ("2-00:00:00", "30:00"), a short form ("90m", "2h") or minutes (int)."""
Memory = Annotated[str | int | float, AfterValidator(_memory)]
"""A size: MB as a number, or "512M", "8G", "1T"."""


class SlurmAccess(_Model):
    """How greend reaches one cluster's controller: the Slurm commands run with SLURM_CONF=conf."""

    conf: Path | None = None
    """The cluster's slurm.conf (SLURM_CONF); unset: the commands' own default."""
    bin_dir: Path | None = None
    """Directory holding sbatch, squeue, sinfo for this cluster; unset: looked up in PATH."""
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 3.0
    """Limit for squeue/sinfo; a controller that does not answer in time is reported as down."""
    submit_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    """Limit for sbatch; after it, greend checks squeue for the job before trying elsewhere."""
    transport: Literal["conf", "multi-cluster", "rest", "ssh"] = "conf"
    """How the cluster is reached (docs/slurm.md): conf, its own slurm.conf (one munge domain);
    multi-cluster, Slurm's `-M cluster_name` through `conf` (clusters sharing one slurmdbd);
    rest, the cluster's slurmrestd at rest_url with the user's own token (another domain);
    ssh, the Slurm commands of its login node ssh_host through the user's own ssh (another domain)."""
    cluster_name: str | None = None
    """Slurm's ClusterName for multi-cluster; unset: the cluster's key in [clusters]."""
    rest_url: str | None = None
    """slurmrestd's base URL for rest, e.g. "https://hpc.example.org:6820"."""
    rest_api: str = "v0.0.38"
    """The slurmrestd API version in its paths (/slurm/<rest_api>/...; Slurm 22.05: v0.0.38)."""
    token_env: str = "SLURM_JWT"
    """Environment variable holding the user's own token from that centre (rest)."""
    token_file: Path | None = None
    """File holding the user's own token, read when token_env is not set ("~" is the user's
    home); greend reads it for the one request and never stores it."""
    ssh_host: str | None = None
    """The centre's login node for ssh (a host name, address or the user's ~/.ssh/config alias)."""
    ssh_user: str | None = None
    """The account there; unset: ssh's own choice (the user's ~/.ssh/config User, else their name)."""
    ssh_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """sshd's port there; unset: ssh's own choice (~/.ssh/config Port, else 22)."""
    ssh_options: list[str] = Field(default_factory=list)
    """Extra ssh options as "Key=value" (ssh -o), e.g. "IdentityFile=~/.ssh/id_hpc"; greend's own
    BatchMode=yes and ConnectTimeout come first and win."""

    @model_validator(mode="after")
    def _transport(self) -> SlurmAccess:
        if self.transport == "rest":
            if not self.rest_url or not self.rest_url.startswith(("http://", "https://")):
                raise ValueError("transport = \"rest\" needs rest_url, the cluster's slurmrestd URL "
                                 "(http:// or https://)")
        else:
            for key in ("rest_url", "token_file"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is only used with transport = \"rest\" "
                                     f"(transport is \"{self.transport}\")")
        if self.transport == "ssh":
            self._check_ssh()
        else:
            for key in ("ssh_host", "ssh_user", "ssh_port"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is only used with transport = \"ssh\" "
                                     f"(transport is \"{self.transport}\")")
            if self.ssh_options:
                raise ValueError(f"ssh_options is only used with transport = \"ssh\" "
                                 f"(transport is \"{self.transport}\")")
        if self.cluster_name is not None and self.transport != "multi-cluster":
            raise ValueError("cluster_name is only used with transport = \"multi-cluster\"")
        if self.cluster_name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.cluster_name):
            raise ValueError(f"cluster_name {self.cluster_name!r}: expected Slurm's ClusterName "
                             "(letters, digits, _ . -)")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.token_env):
            raise ValueError(f"token_env {self.token_env!r}: expected an environment variable name")
        if not re.fullmatch(r"v\d+\.\d+\.\d+", self.rest_api):
            raise ValueError(f"rest_api {self.rest_api!r}: expected a version like \"v0.0.38\"")
        return self

    def _check_ssh(self) -> None:
        if not self.ssh_host:
            raise ValueError("transport = \"ssh\" needs ssh_host, the centre's login node (a host name "
                             "or your ~/.ssh/config alias)")
        # Values that ssh would read as options, or that a shell would split, are refused.
        if not re.fullmatch(r"[A-Za-z0-9_.:\[\]][A-Za-z0-9_.:\[\]-]*", self.ssh_host):
            raise ValueError(f"ssh_host {self.ssh_host!r}: expected a host name, address or ssh alias "
                             "(letters, digits, . _ : -; not starting with -)")
        if self.ssh_user is not None and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*", self.ssh_user):
            raise ValueError(f"ssh_user {self.ssh_user!r}: expected a user name (letters, digits, . _ -)")
        for opt in self.ssh_options:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*=\S.*", opt):
                raise ValueError(f"ssh_options entry {opt!r}: expected \"Key=value\" as ssh -o takes it, "
                                 "e.g. \"IdentityFile=~/.ssh/id_hpc\"")
        if self.conf is not None:
            raise ValueError("conf is not used with transport = \"ssh\": the login node's own Slurm "
                             "configuration is")


class Partition(_Model):
    """A partition and the limits a job must fit (unset: no limit)."""

    default: bool = False
    max_walltime: Duration | None = None
    default_walltime: Duration | None = None
    """Slurm's DefaultTime: what a job without --time gets (else max_walltime)."""
    max_cpus: Annotated[int, Field(ge=1)] | None = None
    """CPUs per job."""
    max_nodes: Annotated[int, Field(ge=1)] | None = None
    cpus_per_node: Annotated[int, Field(ge=1)] | None = None
    mem_per_node: Memory | None = None
    def_mem_per_cpu: Memory | None = None
    """Memory a job gets per CPU when it asks for none (Slurm's DefMemPerCPU)."""
    max_gpus: Annotated[int, Field(ge=0)] | None = None
    """GPUs per job; 0 for a CPU-only partition."""
    gpus_per_node: Annotated[int, Field(ge=0)] | None = None
    gpu_types: list[str] | None = None
    """GPU types of this partition; unset: the cluster's gpu_types."""


class PowerModel(_Model):
    """The cluster's power model for estimates (Green Algorithms); unset values: the [power] table."""

    cpu_w_per_core: Annotated[float, Field(gt=0)] | None = None
    """Power of one core at full load; unset: power.unknown_cpu_w_per_core (12 W, GA 'Any')."""
    cpu_usage: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Core usage factor u_c assumed before any history of the job is known."""
    memory_w_per_gb: Annotated[float, Field(ge=0)] | None = None
    gpu_tdp_w: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    """TDP by GPU type (keys as in --gres=gpu:TYPE:N); other types: power.gpu_tdp_w."""
    gpu_usage: Annotated[float, Field(gt=0, le=1)] = 1.0
    sources: dict[str, str] = Field(default_factory=dict)
    """Where each number comes from (cpu_w_per_core, gpu_tdp_w, ...)."""


class RuleSpec(BaseModel):
    """One entry of policy.rules: `rule` names it; `weight` is for score rules; the other keys are
    the rule's own parameters, checked against the rule when the configuration is loaded."""

    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)

    rule: str
    weight: Annotated[float, Field(ge=0)] | None = None
    enabled: bool = True

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _check_rule(self) -> RuleSpec:
        if wiring.rule_checker is not None:
            wiring.rule_checker(self)
        return self


class Budget(_Model):
    """A project's (Slurm account's) allowance per period; usage is read from the ledger."""

    account: str
    period: Literal["day", "week", "month", "quarter", "year"] = "month"
    energy_kwh: Annotated[float, Field(ge=0)] | None = None
    """Facility energy (IT energy x PUE), what the site pays for."""
    carbon_kg: Annotated[float, Field(ge=0)] | None = None
    water_l: Annotated[float, Field(ge=0)] | None = None
    """On-site plus off-site water consumption."""
    action: Literal["warn", "nice", "defer", "refuse"] = "warn"
    """When exceeded: warn; nice (lower the job's priority with sbatch --nice); defer (--begin at
    the start of the next period); refuse (do not submit)."""
    nice: Annotated[int, Field(ge=1, le=2147483645)] = 1000
    include_estimate: bool = True
    """Count the job's own estimate: act when this job would cross the budget, not only after."""

    @model_validator(mode="after")
    def _has_limit(self) -> Budget:
        if self.energy_kwh is None and self.carbon_kg is None and self.water_l is None:
            raise ValueError("a budget needs at least one of energy_kwh, carbon_kg, water_l")
        return self


class PolicyConfig(_Model):
    rules: list[RuleSpec] | None = None
    """Rules in the order they run; unset: the default rule set (docs/policy.md)."""
    budgets: list[Budget] = Field(default_factory=list)
    ledger: Path | None = None
    """Ledger read for history and budgets and written with decisions; unset: the state directory's."""
    live_state: bool = True
    """Ask each cluster's Slurm for its queue (squeue/sinfo); false: decide without it."""
    state_max_age_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    """Cached cluster state younger than this is used as is."""
    state_cache: Path | None = None
    """File shared by successive commands; unset: $XDG_CACHE_HOME/greend/cluster-state.json."""
    default_walltime: Duration = "1:00:00"
    """Walltime assumed for a job that gives none when its partition has no limit either."""
    default_mem_per_cpu: Memory = "2G"
    """Memory per CPU assumed for a job that gives none when its partition sets no default."""
    history_days: Annotated[float, Field(gt=0)] = 90.0
    """How far back similar jobs are looked up in the ledger."""
    history_max_jobs: Annotated[int, Field(ge=1, le=10000)] = 50
    history_from: Literal["ledger", "sacct"] = "ledger"
    """Where history and budget usage come from: greend's ledger, or also Slurm's accounting
    (`sacct` with this cluster's Slurm access: the site's whole record, jobs greend never saw
    included): similar jobs from sacct where the ledger has none, budget usage from sacct."""

    @model_validator(mode="after")
    def _budget_rule(self) -> PolicyConfig:
        # The default rule set has the budget rule; an explicit list must name it to use budgets.
        if self.rules is not None and self.budgets and not any(
            r.rule == "budget" and r.enabled for r in self.rules
        ):
            raise ValueError("policy.budgets is set but policy.rules has no enabled 'budget' rule")
        return self
