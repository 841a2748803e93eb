"""Site mode's shared ground (docs/site-mode.md): the site token, the batch of records an agent
sends to the controller (RECORDS_PATH) as the controller validates it, and the metrics both sides
add. greend.agent sends batches; greend.controller receives them.

Records carry absolute totals, so a resend never double-counts; the controller keeps, per
(cluster, job, submit time, node), the record that is final, else the latest seen.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SiteError
from .http import client_tls, server_tls
from .ledger import JobRow

__all__ = ["METRICS", "RECORDS_PATH", "BatchIn", "SiteError", "read_token", "validation_message"]

RECORDS_PATH = "/api/v1/records"
TOKEN_MAX_BYTES = 4096
JOB_COLS = [c for c in JobRow.__slots__ if c != "pk"]
SERIES_COLS = ("t_start", "t_end", "factor_set", "cpu_uj", "dram_uj", "gpu_uj", "memory_uj",
               "cpu_time_ns", "carbon_g", "water_site_l", "water_offsite_l")
FACTOR_COLS = ("id", "pue", "wue_site_l_per_kwh", "ewif_l_per_kwh", "carbon_intensity_g_per_kwh",
               "sources", "first_used")


# name -> (type, help, labels): the metrics site mode adds (docs/site-mode.md lists them).
METRICS: dict[str, tuple[str, str, list[str]]] = {
    "greend_outbox_records": (
        "gauge", "Job records waiting in this node's outbox for the site controller.", []),
    "greend_outbox_sent_records_total": (
        "counter", "Job records the controller acknowledged.", []),
    "greend_outbox_send_errors_total": (
        "counter", "Failed sends to the controller, by reason (unreachable, auth, rejected, http).",
        ["reason"]),
    "greend_outbox_last_success_timestamp_seconds": (
        "gauge", "Unix time of the last send the controller acknowledged (0: none yet).", []),
    "greend_outbox_controller_up": (
        "gauge", "1 if the last send to the controller succeeded, else 0.", []),
    "greend_controller_records_received_total": (
        "counter", "Job records received in valid batches (stale ones included).", []),
    "greend_controller_records_stale_total": (
        "counter", "Job records older than the one the controller holds (resends), ignored.", []),
    "greend_controller_batches_total": ("counter", "Batches of records stored.", []),
    "greend_controller_rejects_total": (
        "counter", "Requests to /api/v1/records refused, by reason (auth, invalid, too_large, "
        "ledger).", ["reason"]),
    "greend_controller_agents_reporting": (
        "gauge", "Agents heard from within controller.agent_stale_s.", []),
    "greend_controller_agent_last_seen_timestamp_seconds": (
        "gauge", "Unix time of each agent's last accepted batch.", ["cluster", "node"]),
    "greend_controller_ingest_duration_seconds": (
        "gauge", "Time taken to validate and store the last batch.", []),
}



# -- the token --------------------------------------------------------------------------------------
def read_token(path: Path | str | None, key: str = "controller.token_file") -> bytes:
    """The site's shared secret. Refuses a file others could read: the token lets its holder write
    any node's records."""
    if path is None:
        raise SiteError(f"{key} is not set: site mode needs the site's token file")
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SiteError(f"{key} {p}: no such file") from None
    except OSError as e:
        raise SiteError(f"{key} {p}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SiteError(f"{key} {p}: not a regular file")
        if st.st_mode & 0o077:
            raise SiteError(
                f"{key} {p}: readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"the token must be readable by its owner only: chmod 600 {p}")
        if st.st_uid not in (0, os.geteuid()):
            raise SiteError(f"{key} {p}: owned by uid {st.st_uid}; expected root or uid "
                            f"{os.geteuid()} (greend's user): chown root {p}")
        raw = os.read(fd, TOKEN_MAX_BYTES + 1)
    except OSError as e:
        raise SiteError(f"{key} {p}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > TOKEN_MAX_BYTES:
        raise SiteError(f"{key} {p}: over {TOKEN_MAX_BYTES} bytes: not a token file")
    token = raw.strip()
    if not token:
        raise SiteError(f"{key} {p}: empty; put a random secret in it, e.g. "
                        f"`openssl rand -hex 32 > {p}`")
    if any(c < 0x21 or c > 0x7E for c in token):
        raise SiteError(f"{key} {p}: the token must be printable ASCII without spaces")
    return token


def check_files(cfg) -> None:
    """The files site mode needs, checked as `greend run` and `greend controller` check them at
    start (for `greend config check`): the token file when url or token_file is set, the TLS
    certificate and key, the CA file. SiteError naming the key otherwise."""
    c = cfg.controller
    if c.urls or c.token_file is not None:
        read_token(c.token_file)
    if c.tls_cert_file is not None:
        server_tls(c.tls_cert_file, c.tls_key_file)
    if any(u.startswith("https://") for u in c.urls):
        client_tls(c.ca_file)
    if c.database_password_file is not None:
        read_token(c.database_password_file, "controller.database_password_file")


# -- what a batch may contain -----------------------------------------------------------------------
_I64 = 2**63 - 1
Count = Annotated[int, Field(ge=0, le=_I64)]
Amount = Annotated[float, Field(ge=0)]
Name = Annotated[str, Field(max_length=256)]
Key = Annotated[str, Field(min_length=1, max_length=256)]
Time = Annotated[float, Field(ge=0)]


class _In(BaseModel):
    # Unknown fields are ignored so that a newer agent can talk to an older controller.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


class SeriesIn(_In):
    t_start: Time
    t_end: Time
    factor_set: Key
    cpu_uj: Count
    dram_uj: Count
    gpu_uj: Count
    memory_uj: Count
    cpu_time_ns: Count
    carbon_g: Amount
    water_site_l: Amount
    water_offsite_l: Amount


class RecordIn(_In):
    cluster: Key
    job_id: Key
    node: Key
    kind: Key
    state: Literal["running", "ended"]
    first_seen: Time
    last_seen: Time
    submit_time: Count = 0
    name: Annotated[str, Field(max_length=4096)] = ""
    user: Name = ""
    uid: Annotated[int, Field(ge=0, le=_I64)] | None = None
    account: Name = ""
    partition: Name = ""
    tier: Name = ""
    alloc_cpus: Amount | None = None
    alloc_mem_bytes: Count | None = None
    alloc_gpus: Count | None = None
    end_time: Time | None = None
    cpu_time_ns: Count = 0
    cpu_uj: Count = 0
    dram_uj: Count = 0
    gpu_uj: Count = 0
    memory_uj: Count = 0
    facility_j: Amount = 0.0
    carbon_g: Amount = 0.0
    water_site_l: Amount = 0.0
    water_offsite_l: Amount = 0.0
    max_mem_bytes: Count = 0
    provenance: dict[Name, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict)
    command: Annotated[str, Field(max_length=65536)] | None = None
    exit_code: Annotated[int, Field(ge=-(2**31), le=2**31)] | None = None
    meta: dict[Name, Any] = Field(default_factory=dict)
    series: Annotated[list[SeriesIn], Field(max_length=100000)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _times(self) -> RecordIn:
        if self.last_seen < self.first_seen:
            raise ValueError("last_seen is before first_seen")
        return self


class FactorSetIn(_In):
    id: Key
    pue: Annotated[float, Field(ge=1.0, le=10.0)]
    wue_site_l_per_kwh: Amount
    ewif_l_per_kwh: Amount
    carbon_intensity_g_per_kwh: Amount
    sources: dict[Name, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict)
    first_used: Time


class NodeTotalIn(_In):
    domain: Key
    source: Key
    provenance: Annotated[str, Field(max_length=4096)]
    energy_uj: Count
    unattributed_uj: Count
    idle_uj: Count


class NodeSeriesIn(_In):
    t_start: Time
    t_end: Time
    energy_uj: Count
    unattributed_uj: Count


class NodeIn(_In):
    node: Key
    totals: Annotated[list[NodeTotalIn], Field(max_length=1000)] = Field(default_factory=list)
    series: Annotated[list[NodeSeriesIn], Field(max_length=100000)] = Field(default_factory=list)


class AgentIn(_In):
    cluster: Key
    node: Key
    version: Name = ""


class BatchIn(_In):
    agent: AgentIn
    records: list[RecordIn] = Field(default_factory=list)
    factor_sets: Annotated[list[FactorSetIn], Field(max_length=10000)] = Field(default_factory=list)
    nodes: Annotated[list[NodeIn], Field(max_length=16)] = Field(default_factory=list)
    decisions: Annotated[list[dict], Field(max_length=10000)] = Field(default_factory=list)
    """Routing decisions taken by the agent (/api/v1/decisions), as greend.decisions.validate reads them."""


def _field(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(body)"


def validation_message(err: ValidationError) -> tuple[str, list[dict]]:
    errors = []
    for e in err.errors(include_url=False)[:20]:
        if e["type"] == "json_invalid":
            errors.append({"field": "(body)", "message": f"invalid JSON: {e['ctx']['error']}"})
            continue
        msg = e["msg"].removeprefix("Value error, ")
        errors.append({"field": _field(e["loc"]), "message": msg})
    first = errors[0] if errors else {"field": "(body)", "message": "invalid"}
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{first['field']}: {first['message']}{more}", errors
