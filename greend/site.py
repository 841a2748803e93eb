"""Site mode: each node's greend sends its job records to one controller, which keeps the site's
ledger. The agent side queues records in an outbox written in the checkpoint's own transaction and
drains it over authenticated HTTP; the controller side validates, de-duplicates and stores them.

Records carry absolute totals, so a resend never double-counts; the controller keeps, per
(cluster, job, submit time, node), the record that is final, else the latest seen (docs/site-mode.md).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import platform
import random
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import __version__, decisions
from . import config as config_mod
from .exporter import LedgerMetrics
from .ledger import JobRow, Ledger, LedgerError, default_path

log = logging.getLogger(__name__)

RECORDS_PATH = "/api/v1/records"
TOKEN_MAX_BYTES = 4096
MAX_SERIES_PER_BATCH = 20000  # series buckets in one request (a long job after a long outage)
MAX_REQUEST_BYTES = 4 << 20  # an agent splits batches above this (the controller accepts 8 MiB)
BACKOFF_START_S = 1.0
DRAIN_ON_EXIT_S = 5.0
_JOB_COLS = [c for c in JobRow.__slots__ if c != "pk"]
_SERIES_COLS = ("t_start", "t_end", "factor_set", "cpu_uj", "dram_uj", "gpu_uj", "memory_uj",
                "cpu_time_ns", "carbon_g", "water_site_l", "water_offsite_l")
_FACTOR_COLS = ("id", "pue", "wue_site_l_per_kwh", "ewif_l_per_kwh", "carbon_intensity_g_per_kwh",
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


class SiteError(Exception):
    """Site mode cannot work as configured; the message is for the admin."""


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


# -- agent side -------------------------------------------------------------------------------------
class Outbox:
    """The checkpoint hook: queues the jobs just written (and the node's totals), in the
    checkpoint's transaction, so the books and the outbox commit together or not at all."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.backlog = 0  # job records queued, as of the last checkpoint or send

    def __call__(self, db: sqlite3.Connection, accounts: list) -> None:
        jobs = [(acc.row.pk, min((tb for tb, _ in acc.buckets), default=acc.row.last_seen))
                for acc in accounts]
        self.queue(db, jobs, node_from=min(self.monitor.node_bucket, default=time.time()))

    def queue(self, db: sqlite3.Connection, jobs: list[tuple[int, float]],
              node_from: float | None = None) -> None:
        """Queue jobs (pk, oldest series bucket to send) and, with node_from, the node's totals."""
        now = time.time()
        rows = [("job", pk, start, now) for pk, start in jobs]
        if node_from is not None:
            rows.append(("node", 0, node_from, now))
        db.executemany(
            "INSERT INTO outbox (kind, ref, seq, series_from, queued) VALUES (?, ?, 1, ?, ?) "
            "ON CONFLICT (kind, ref) DO UPDATE SET seq = outbox.seq + 1, "
            "series_from = MIN(outbox.series_from, excluded.series_from)", rows)
        self.backlog = db.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'job'").fetchone()[0]

    def queue_decision(self, db: sqlite3.Connection, ident: int) -> None:
        """Queue a routing decision (kind 'decision', ref = decisions.id), in the transaction
        that stored it."""
        db.execute("INSERT INTO outbox (kind, ref, seq, series_from, queued) VALUES ('decision', ?, 1, 0, ?) "
                   "ON CONFLICT (kind, ref) DO UPDATE SET seq = outbox.seq + 1", (ident, time.time()))


class _SendFailed(Exception):
    def __init__(self, reason: str, message: str, status: int = 0):
        super().__init__(message)
        self.reason = reason
        self.status = status


class Sender:
    """Drains the outbox to the controller from its own thread and its own ledger connection:
    bounded batches, back to back while there is a backlog, exponential backoff on failure."""

    def __init__(self, settings: config_mod.Controller, token: bytes, ledger_path: Path,
                 cluster: str, node: str, outbox: Outbox):
        self.settings = settings
        self.token = token
        self.ledger_path = ledger_path
        self.cluster = cluster
        self.node = node
        self.outbox = outbox
        self.db: Ledger | None = None
        self.conn: http.client.HTTPConnection | None = None
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.batch_limit = settings.batch_records
        self.started = time.time()
        self.sent_total = 0
        self.errors: dict[str, int] = {}
        self.last_success = 0.0
        self.last_attempt = 0.0
        self.last_error = ""
        self.last_reason = ""
        self.failing_since: float | None = None
        self.failures = 0
        self.timeout_cap = float("inf")
        self.stopping_stuck = False

    # -- settings -------------------------------------------------------------------------------
    def update(self, settings: config_mod.Controller, token: bytes) -> None:
        """A reload: new URL, token or limits take effect from the next send."""
        if (settings.url, settings.timeout_s) != (self.settings.url, self.settings.timeout_s):
            self._close_conn()
        self.settings, self.token = settings, token
        self.batch_limit = settings.batch_records
        self.failures = 0
        self.wake.set()

    # -- the loop -------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=self.settings.timeout_s + 5)
            if self.thread.is_alive():  # stuck in a request: leave its connection alone
                self.stopping_stuck = True
            self.thread = None

    def close(self) -> None:
        self._close_conn()
        if self.db is not None:
            self.db.close()
            self.db = None

    def _run(self) -> None:
        while not self.stopping.is_set():
            delay = self.settings.send_interval_s
            try:
                more = self.send_once()
            except _SendFailed:
                delay = self._backoff()
            except Exception as e:  # the sender must outlive any surprise; it is retried
                log.exception("outbox: unexpected error")
                self._failed(_SendFailed("http", f"{type(e).__name__}: {e}"))
                delay = self._backoff()
            else:
                if more:
                    delay = 0.0
            if delay:
                self.wake.wait(delay)
            self.wake.clear()

    def _backoff(self) -> float:
        d = min(self.settings.backoff_max_s, BACKOFF_START_S * 2 ** min(self.failures - 1, 30))
        return d * random.uniform(0.8, 1.2)

    def drain(self, seconds: float = DRAIN_ON_EXIT_S) -> bool:
        """At exit: try to send what is queued within `seconds`; what is left stays queued."""
        if self.stopping_stuck:
            return False
        deadline = time.monotonic() + seconds
        self._close_conn()
        self.timeout_cap = seconds  # a blackholed controller must not hold the exit for long
        try:
            while time.monotonic() < deadline:
                if not self.send_once():
                    return True
        except _SendFailed as e:
            log.warning("outbox: %d record(s) stay queued for the next start (%s)",
                        self.outbox.backlog, e)
        except Exception as e:
            log.warning("outbox: records stay queued for the next start (%s: %s)",
                        type(e).__name__, e)
        return False

    # -- one batch ------------------------------------------------------------------------------
    def _ledger(self) -> Ledger:
        if self.db is None:
            self.db = Ledger(self.ledger_path)
        return self.db

    def send_once(self) -> bool:
        """Send one batch; returns True if more is queued than that batch. Raises _SendFailed."""
        self.last_attempt = time.time()
        try:
            led = self._ledger()
            body, items, nrec, truncated = self._build(led)
        except (LedgerError, sqlite3.Error) as e:
            raise self._failed(_SendFailed("ledger", f"cannot read the outbox: {e}")) from None
        if not items:
            self.outbox.backlog = 0
            return False
        self._post(body)
        try:
            with led.transaction() as db:
                for kind, ref, seq, done, resend_from in items:
                    if done:
                        cur = db.execute("DELETE FROM outbox WHERE kind = ? AND ref = ? AND seq = ?",
                                         (kind, ref, seq))
                        if cur.rowcount:
                            continue
                    # Queued again meanwhile, or series left to send: keep it, skip what is final.
                    db.execute("UPDATE outbox SET series_from = MAX(series_from, ?) "
                               "WHERE kind = ? AND ref = ?", (resend_from, kind, ref))
                left = db.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'job'").fetchone()[0]
        except (LedgerError, sqlite3.Error) as e:
            # The controller has the records; a resend is harmless.
            raise self._failed(_SendFailed("ledger", f"cannot update the outbox: {e}")) from None
        self.sent_total += nrec
        self.outbox.backlog = left
        if self.last_error:
            log.info("outbox: controller %s reachable again", self.settings.url)
        self.last_success = time.time()
        self.last_error = self.last_reason = ""
        self.failing_since = None
        self.failures = 0
        return truncated

    def _build(self, led: Ledger) -> tuple[bytes, list[tuple], int, bool]:
        """(request body, [(kind, ref, seq, done, resend_from)], job records, more left)."""
        db = led.db
        db.execute("BEGIN")  # one consistent snapshot of outbox and books
        try:
            total = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            rows = db.execute(
                "SELECT kind, ref, seq, series_from FROM outbox ORDER BY queued, kind, ref LIMIT ?",
                (self.batch_limit + 1,)).fetchall()
            records, nodes, items, decided = [], [], [], []
            factor_ids: set[str] = set()
            budget = MAX_SERIES_PER_BATCH
            size = 0
            for r in rows:
                kind, ref, seq, start = r["kind"], r["ref"], r["seq"], r["series_from"]
                if kind == "decision":
                    row = db.execute("SELECT * FROM decisions WHERE id = ?", (ref,)).fetchone()
                    if row is not None:
                        out = decisions.decode(row)
                        del out["id"]
                        n = len(json.dumps(out, separators=(",", ":")))
                        if items and size + n > MAX_REQUEST_BYTES:
                            break
                        size += n
                        decided.append(out)
                    items.append((kind, ref, seq, True, start))
                    continue
                if kind == "job" and len(records) >= self.batch_limit:
                    break
                if kind == "job":
                    job = db.execute("SELECT * FROM jobs WHERE pk = ?", (ref,)).fetchone()
                    if job is None:  # gone from the books (should not happen): nothing to send
                        items.append((kind, ref, seq, True, start))
                        continue
                    series = db.execute(
                        "SELECT * FROM job_series WHERE job_pk = ? AND t_start >= ? "
                        "ORDER BY t_start LIMIT ?", (ref, start, budget + 1)).fetchall()
                    out = _job_record(job)
                    out["series"] = [{c: x[c] for c in _SERIES_COLS} for x in series[:budget]]
                else:
                    series = db.execute(
                        "SELECT t_start, t_end, energy_uj, unattributed_uj FROM node_series "
                        "WHERE node = ? AND t_start >= ? ORDER BY t_start LIMIT ?",
                        (self.node, start, budget + 1)).fetchall()
                    totals = db.execute(
                        "SELECT domain, source, provenance, energy_uj, unattributed_uj, idle_uj "
                        "FROM node_totals WHERE node = ?", (self.node,)).fetchall()
                    out = {"node": self.node, "totals": [dict(t) for t in totals],
                           "series": [dict(x) for x in series[:budget]]}
                sent = series[:budget]
                done = len(series) <= budget
                # What to send again next time: the rest, or the last (still open) bucket.
                resend_from = series[budget]["t_start"] if not done else (
                    sent[-1]["t_start"] if sent else start)
                n = len(json.dumps(out, separators=(",", ":")))
                if items and size + n > MAX_REQUEST_BYTES:
                    break
                size += n
                budget -= len(sent)
                if kind == "job":
                    factor_ids.update(x["factor_set"] for x in out["series"])
                    records.append(out)
                else:
                    nodes.append(out)
                items.append((kind, ref, seq, done, resend_from))
                if budget <= 0:
                    break
            factor_sets = []
            if factor_ids:
                marks = ",".join("?" * len(factor_ids))
                for f in db.execute(f"SELECT * FROM factor_sets WHERE id IN ({marks})",
                                    sorted(factor_ids)):
                    d = {c: f[c] for c in _FACTOR_COLS}
                    d["sources"] = json.loads(d["sources"])
                    factor_sets.append(d)
        finally:
            db.execute("COMMIT")
        truncated = len(items) < total or not all(it[3] for it in items)
        if not items:
            return b"", [], 0, False
        batch = {"agent": {"cluster": self.cluster, "node": self.node, "version": __version__},
                 "factor_sets": factor_sets, "records": records, "nodes": nodes}
        if decided:  # routing decisions; a controller older than them ignores the key
            batch["decisions"] = decided
        return json.dumps(batch, separators=(",", ":")).encode(), items, len(records), truncated

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            u = urlsplit(self.settings.url)
            cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
            self.conn = cls(u.hostname, u.port, timeout=min(self.settings.timeout_s, self.timeout_cap))
        return self.conn

    def _close_conn(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _post(self, body: bytes) -> None:
        base = urlsplit(self.settings.url).path.rstrip("/")
        headers = {"Authorization": f"Bearer {self.token.decode()}",
                   "Content-Type": "application/json", "User-Agent": f"greend/{__version__}"}
        for attempt in (1, 2):  # a kept-alive connection the controller closed: once more, fresh
            conn = self._connection()
            try:
                conn.request("POST", base + RECORDS_PATH, body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._close_conn()
                if attempt == 1:
                    continue
                raise self._failed(_SendFailed("unreachable", f"{self.settings.url}: {e}")) from None
            except (OSError, http.client.HTTPException) as e:
                self._close_conn()
                msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
                raise self._failed(_SendFailed("unreachable", f"{self.settings.url}: {msg}")) from None
            break
        if resp.will_close:
            self._close_conn()
        if 200 <= resp.status < 300:
            return
        try:
            detail = json.loads(payload).get("error", "")
        except (ValueError, AttributeError):
            detail = payload[:200].decode(errors="replace")
        if resp.status in (401, 403):
            raise self._failed(_SendFailed(
                "auth", f"controller {self.settings.url} rejects this node's token (HTTP "
                f"{resp.status}): check controller.token_file against the controller's",
                resp.status))
        if resp.status == 413 and self.batch_limit > 1:
            self.batch_limit = max(1, self.batch_limit // 2)
            log.warning("outbox: batch too large for the controller; now %d records a batch",
                        self.batch_limit)
        reason = "rejected" if 400 <= resp.status < 500 else "http"
        raise self._failed(_SendFailed(
            reason, f"controller {self.settings.url} answered HTTP {resp.status}: {detail}",
            resp.status))

    def _failed(self, e: _SendFailed) -> _SendFailed:
        now = time.time()
        self.errors[e.reason] = self.errors.get(e.reason, 0) + 1
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = now
        if str(e) != self.last_error:
            log.error("outbox: %s; records stay queued (%d)", e, self.outbox.backlog)
        self.last_error, self.last_reason = str(e), e.reason
        return e

    # -- views ----------------------------------------------------------------------------------
    def health_reasons(self) -> list[str]:
        if not self.last_error:
            return []
        if self.last_reason in ("auth", "rejected", "ledger"):
            return [f"site: {self.last_error}"]  # needs an admin, not patience
        down = time.time() - (self.failing_since or self.started)
        if down >= self.settings.unreachable_after_s:
            return [f"site: controller unreachable for {down:.0f} s ({self.last_error}); "
                    f"{self.outbox.backlog} record(s) queued in the outbox"]
        return []

    def status(self) -> dict:
        return {
            "controller": self.settings.url,
            "outbox_records": self.outbox.backlog,
            "sent_records": self.sent_total,
            "last_success": self.last_success or None,
            "last_attempt": self.last_attempt or None,
            "last_error": self.last_error or None,
            "send_errors": dict(self.errors),
        }

    def collect(self):
        g = GaugeMetricFamily
        yield g("greend_outbox_records", METRICS["greend_outbox_records"][1],
                value=self.outbox.backlog)
        yield CounterMetricFamily("greend_outbox_sent_records",
                                  METRICS["greend_outbox_sent_records_total"][1], value=self.sent_total)
        err = CounterMetricFamily("greend_outbox_send_errors",
                                  METRICS["greend_outbox_send_errors_total"][1], labels=["reason"])
        for reason in ("unreachable", "auth", "rejected", "http", "ledger"):
            err.add_metric([reason], self.errors.get(reason, 0))
        yield err
        yield g("greend_outbox_last_success_timestamp_seconds",
                METRICS["greend_outbox_last_success_timestamp_seconds"][1], value=self.last_success)
        yield g("greend_outbox_controller_up", METRICS["greend_outbox_controller_up"][1],
                value=0.0 if self.last_error else 1.0)


def _job_record(row: sqlite3.Row) -> dict:
    d = {c: row[c] for c in _JOB_COLS}
    d["provenance"] = json.loads(d["provenance"] or "{}")
    d["meta"] = json.loads(d["meta"] or "{}")
    return d


# -- controller side: what a batch may contain ------------------------------------------------------
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


# -- the controller -------------------------------------------------------------------------------
def _upsert_sql() -> str:
    cols = ", ".join(_JOB_COLS)
    marks = ", ".join(f":{c}" for c in _JOB_COLS)
    keep = ("cluster", "job_id", "submit_time", "node", "first_seen")
    updates = ", ".join(f"{c} = excluded.{c}" for c in _JOB_COLS if c not in keep)
    # A final record wins over any partial; among records of the same kind, the latest wins. An
    # equal one is a resend: rewriting it changes nothing.
    return (f"INSERT INTO jobs ({cols}) VALUES ({marks}) "
            f"ON CONFLICT (cluster, job_id, submit_time, node) DO UPDATE SET {updates} "
            "WHERE (excluded.state = 'ended', excluded.last_seen) >= (jobs.state = 'ended', jobs.last_seen) "
            "RETURNING pk")


_UPSERT_JOB = _upsert_sql()
_ADOPT_PROVISIONAL = (
    "UPDATE jobs SET submit_time = ?1 WHERE cluster = ?2 AND job_id = ?3 AND node = ?4 "
    "AND submit_time = 0 AND first_seen = ?5 AND NOT EXISTS (SELECT 1 FROM jobs WHERE "
    "cluster = ?2 AND job_id = ?3 AND node = ?4 AND submit_time = ?6)")
_UPSERT_SERIES = (
    f"INSERT INTO job_series (job_pk, {', '.join(_SERIES_COLS)}) "
    f"VALUES (?, {', '.join('?' * len(_SERIES_COLS))}) "
    "ON CONFLICT (job_pk, t_start, factor_set) DO UPDATE SET t_end = excluded.t_end, "
    "cpu_uj = excluded.cpu_uj, dram_uj = excluded.dram_uj, gpu_uj = excluded.gpu_uj, "
    "memory_uj = excluded.memory_uj, cpu_time_ns = excluded.cpu_time_ns, "
    "carbon_g = excluded.carbon_g, water_site_l = excluded.water_site_l, "
    "water_offsite_l = excluded.water_offsite_l WHERE excluded.t_end >= job_series.t_end")
_UPSERT_NODE_TOTAL = (
    "INSERT INTO node_totals VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node, domain) DO UPDATE SET "
    "source = excluded.source, provenance = excluded.provenance, energy_uj = excluded.energy_uj, "
    "unattributed_uj = excluded.unattributed_uj, idle_uj = excluded.idle_uj "
    "WHERE excluded.energy_uj >= node_totals.energy_uj")
_UPSERT_NODE_SERIES = (
    "INSERT INTO node_series VALUES (?, ?, ?, ?, ?) ON CONFLICT (node, t_start) DO UPDATE SET "
    "t_end = excluded.t_end, energy_uj = excluded.energy_uj, "
    "unattributed_uj = excluded.unattributed_uj WHERE excluded.t_end >= node_series.t_end")


def default_controller_socket(cfg: config_mod.Config, state_dir: Path) -> Path | None:
    s = cfg.controller.socket
    if s is not None:
        return None if str(s) in ("", ".") else s
    if os.geteuid() == 0:
        return Path("/run/greend/controller.sock")
    return state_dir / "api.sock"


def controller_state_dir(cfg: config_mod.Config) -> Path:
    return Path(cfg.controller.state_dir or Path(cfg.resolved_state_dir()) / "controller")


class Controller:
    """`greend controller`: receives agents' records and serves the site's ledger (an ApiHost)."""

    node = None

    def __init__(self, cfg: config_mod.Config, config_path: str | None = None,
                 listen: str | None = None, token_file: str | None = None,
                 socket_path: Path | None = None, state_dir: Path | None = None):
        from .daemon import DaemonError, parse_listen

        self.config_path = config_path
        # Command-line choices, which a reload of the file keeps.
        self.token_file_arg = Path(token_file) if token_file else None
        self.state_dir_arg = Path(state_dir) if state_dir else None
        self.cfg = cfg = self._with_args(cfg)
        try:
            self.token = self._read_token(cfg)
        except SiteError as e:
            raise DaemonError(str(e)) from None
        self.listen = parse_listen(listen or cfg.controller.listen)
        self.state_dir = controller_state_dir(cfg)
        self.ledger_path = default_path(self.state_dir)
        self.ledger = Ledger(self.ledger_path)
        self.socket_path = socket_path if socket_path is not None else default_controller_socket(
            cfg, self.state_dir)
        self.max_body = cfg.controller.max_body_bytes
        self.ledger_metrics = LedgerMetrics(self.ledger_path, lambda: self.cfg.policy.budgets)
        self.routes = {("POST", RECORDS_PATH): self.ingest,
                       ("POST", decisions.DECISIONS_PATH): self.post_decision}
        self.write_lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.stop_event = threading.Event()
        self.started = time.time()
        self.agents: dict[tuple[str, str], dict] = {}
        self.received = self.stale = self.batches = 0
        self.rejects: dict[str, int] = {}
        self.last_ingest_s = 0.0
        self.ledger_error = ""
        self.config_error = ""
        self.servers: list = []
        self.api = None

    # -- ingest ---------------------------------------------------------------------------------
    def count_reject(self, reason: str) -> None:
        with self.stats_lock:
            self.rejects[reason] = self.rejects.get(reason, 0) + 1

    def _reject(self, reason: str, status: int, message: str, errors: list | None = None):
        from .api import ApiError

        self.count_reject(reason)
        if errors is not None:
            return status, "application/json", (json.dumps(
                {"error": message, "errors": errors}) + "\n").encode()
        raise ApiError(status, message)

    def ingest(self, body: bytes, caller, headers) -> tuple[int, str, bytes]:
        from .api import bearer_ok

        if not bearer_ok(headers, self.token):
            how = "no" if not headers.get("Authorization") else "a wrong"
            return self._reject("auth", 401, f"{how} bearer token: agents send the site token "
                                             "from controller.token_file")
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype and ctype != "application/json":
            return self._reject("invalid", 415, f"Content-Type {ctype!r}: expected application/json")
        if not body:
            return self._reject("invalid", 400, "empty body: expected a JSON batch of records")
        t0 = time.perf_counter()
        try:
            batch = BatchIn.model_validate_json(body)
        except ValidationError as e:
            msg, errors = validation_message(e)
            return self._reject("invalid", 400, msg, errors)
        problem = self._check(batch)
        if problem:
            return self._reject("invalid", 400, problem, [{"field": problem.split(":", 1)[0],
                                                          "message": problem.split(": ", 1)[1]}])
        try:
            accepted, stale = self._store(batch)
        except (LedgerError, sqlite3.Error) as e:
            self.count_reject("ledger")
            if not self.ledger_error:
                log.error("controller: cannot store records (agents will resend): %s", e)
            self.ledger_error = str(e)
            return 503, "application/json", (json.dumps(
                {"error": f"ledger unavailable, retry later: {e}"}) + "\n").encode()
        if self.ledger_error:
            log.info("controller: ledger writable again")
            self.ledger_error = ""
        now = time.time()
        with self.stats_lock:
            self.received += len(batch.records)
            self.stale += stale
            self.batches += 1
            self.last_ingest_s = time.perf_counter() - t0
            a = self.agents.setdefault((batch.agent.cluster, batch.agent.node),
                                       {"records": 0, "first_seen": now})
            a["last_seen"] = now
            a["version"] = batch.agent.version
            a["records"] += len(batch.records)
        out = {"accepted": accepted, "stale": stale, "records": len(batch.records)}
        return 200, "application/json", (json.dumps(out) + "\n").encode()

    def _check(self, batch: BatchIn) -> str:
        limit = self.cfg.controller.max_batch_records
        if len(batch.records) > limit:
            return f"records: {len(batch.records)} records in one batch; at most {limit}"
        node = batch.agent.node
        known = {f.id for f in batch.factor_sets}
        for i, r in enumerate(batch.records):
            if r.node != node:
                return f"records[{i}].node: {r.node!r} is not the sending agent's node ({node!r})"
            for j, s in enumerate(r.series):
                if s.factor_set not in known:
                    return (f"records[{i}].series[{j}].factor_set: {s.factor_set!r} is not in "
                            "the batch's factor_sets")
        for i, n in enumerate(batch.nodes):
            if n.node != node:
                return f"nodes[{i}].node: {n.node!r} is not the sending agent's node ({node!r})"
        for i, d in enumerate(batch.decisions):
            try:
                decisions.validate(d)
            except decisions.DecisionInvalid as e:
                return f"decisions[{i}]: {e}"
        return ""

    def _store(self, batch: BatchIn) -> tuple[int, int]:
        accepted = stale = 0
        with self.write_lock, self.ledger.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO factor_sets VALUES (?, ?, ?, ?, ?, ?, ?)", [
                (f.id, f.pue, f.wue_site_l_per_kwh, f.ewif_l_per_kwh, f.carbon_intensity_g_per_kwh,
                 json.dumps(f.sources, sort_keys=True), f.first_used) for f in batch.factor_sets])
            for r in batch.records:
                if r.submit_time and r.kind == "slurm":
                    # The agent learnt the job's submit time after sending it with none (0): its
                    # record moves to the full identity, as it did in the agent's ledger.
                    db.execute(_ADOPT_PROVISIONAL, (r.submit_time, r.cluster, r.job_id, r.node,
                                                    r.first_seen, r.submit_time))
                vals = {c: getattr(r, c) for c in _JOB_COLS}
                vals["provenance"] = json.dumps(r.provenance, sort_keys=True)
                vals["meta"] = json.dumps(r.meta, sort_keys=True)
                row = db.execute(_UPSERT_JOB, vals).fetchone()
                if row is None:
                    stale += 1  # the controller holds a newer or final record
                    continue
                accepted += 1
                if r.series:
                    pk = row[0]
                    db.executemany(_UPSERT_SERIES, [
                        (pk, s.t_start, s.t_end, s.factor_set, s.cpu_uj, s.dram_uj, s.gpu_uj,
                         s.memory_uj, s.cpu_time_ns, s.carbon_g, s.water_site_l, s.water_offsite_l)
                        for s in r.series])
            for n in batch.nodes:
                db.executemany(_UPSERT_NODE_TOTAL, [
                    (n.node, t.domain, t.source, t.provenance, t.energy_uj, t.unattributed_uj,
                     t.idle_uj) for t in n.totals])
                db.executemany(_UPSERT_NODE_SERIES, [
                    (n.node, s.t_start, s.t_end, s.energy_uj, s.unattributed_uj) for s in n.series])
            for d in batch.decisions:
                decisions.store(db, decisions.validate(d))
        if batch.decisions:
            self.ledger_metrics.invalidate()
        return accepted, stale

    def post_decision(self, body: bytes, caller, headers) -> tuple[int, str, bytes]:
        """POST /api/v1/decisions from an agent (site token), into the site's ledger."""
        from .api import bearer_ok

        if not bearer_ok(headers, self.token):
            self.count_reject("auth")
        out = decisions.post(body, caller, headers, self.ledger, self.write_lock,
                             token_only=self.token or b"")
        self.ledger_metrics.invalidate()
        return out

    # -- views ----------------------------------------------------------------------------------
    def metric_collectors(self):
        return [self, self.ledger_metrics]

    def collect(self):
        now = time.time()
        stale_s = self.cfg.controller.agent_stale_s
        with self.stats_lock:
            agents = {k: v["last_seen"] for k, v in self.agents.items()}
            rejects = dict(self.rejects)
            received, stale, batches, dur = self.received, self.stale, self.batches, self.last_ingest_s
        info = InfoMetricFamily("greend_build", "greend version and Python version.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info
        c = CounterMetricFamily
        yield c("greend_controller_records_received",
                METRICS["greend_controller_records_received_total"][1], value=received)
        yield c("greend_controller_records_stale",
                METRICS["greend_controller_records_stale_total"][1], value=stale)
        yield c("greend_controller_batches", METRICS["greend_controller_batches_total"][1],
                value=batches)
        rej = c("greend_controller_rejects", METRICS["greend_controller_rejects_total"][1],
                labels=["reason"])
        for reason in ("auth", "invalid", "too_large", "ledger"):
            rej.add_metric([reason], rejects.get(reason, 0))
        yield rej
        yield GaugeMetricFamily("greend_controller_agents_reporting",
                                METRICS["greend_controller_agents_reporting"][1],
                                value=sum(1 for t in agents.values() if now - t <= stale_s))
        seen = GaugeMetricFamily("greend_controller_agent_last_seen_timestamp_seconds",
                                 METRICS["greend_controller_agent_last_seen_timestamp_seconds"][1],
                                 labels=["cluster", "node"])
        for (cluster, node), t in sorted(agents.items()):
            seen.add_metric([cluster, node], t)
        yield seen
        yield GaugeMetricFamily("greend_controller_ingest_duration_seconds",
                                METRICS["greend_controller_ingest_duration_seconds"][1], value=dur)

    def describe(self):
        return []

    def health(self) -> dict:
        now = time.time()
        stale_s = self.cfg.controller.agent_stale_s
        reasons = []
        if self.ledger_error:
            reasons.append(f"ledger: cannot store records: {self.ledger_error}")
        if self.config_error:
            reasons.append(self.config_error)
        with self.stats_lock:
            agents = [{"cluster": c, "node": n, "last_seen": a["last_seen"],
                       "age_s": round(now - a["last_seen"], 3),
                       "reporting": now - a["last_seen"] <= stale_s, "version": a["version"],
                       "records": a["records"]}
                      for (c, n), a in sorted(self.agents.items())]
            counts = {"records_received": self.received, "records_stale": self.stale,
                      "batches": self.batches, "rejects": dict(self.rejects)}
        return {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "role": "controller",
            "uptime_s": now - self.started,
            "agents_reporting": sum(1 for a in agents if a["reporting"]),
            "agents": agents,
            **counts,
        }

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        from . import api

        self.servers = api.start_servers(self, self.listen, self.socket_path,
                                         what="greend controller")
        where = [f"http://{self.listen[0]}:{self.servers[0].server_address[1]}"]
        if self.socket_path and len(self.servers) > 1:
            where.append(f"unix:{self.socket_path}")
        log.info("greend %s controller: %s; site ledger %s", __version__, ", ".join(where),
                    self.ledger_path)

    def _with_args(self, cfg: config_mod.Config) -> config_mod.Config:
        if self.state_dir_arg is None:
            return cfg
        return cfg.model_copy(update={"controller": cfg.controller.model_copy(
            update={"state_dir": self.state_dir_arg})})

    def _read_token(self, cfg: config_mod.Config) -> bytes:
        if self.token_file_arg is not None:
            return read_token(self.token_file_arg, "--token-file")
        return read_token(cfg.controller.token_file)

    def reload(self) -> None:
        """SIGHUP: re-read the config and the token (rotation); keep the running ones on error."""
        try:
            new = self._with_args(config_mod.load(self.config_path))
            if controller_state_dir(new) != self.state_dir:
                raise SiteError(f"controller.state_dir needs a restart (running: {self.state_dir})")
            token = self._read_token(new)
        except (config_mod.ConfigError, SiteError) as e:
            self.config_error = f"reload: {e}; kept the running config"
            log.error("%s", self.config_error)
            return
        self.cfg, self.token = new, token
        self.max_body = new.controller.max_body_bytes
        self.config_error = ""
        log.info("controller: config and token reloaded")

    def run_forever(self) -> None:
        from .service import run_until_signalled

        run_until_signalled(self, "exit")

    def shutdown(self) -> None:
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()
        if self.socket_path and len(self.servers) > 1:
            try:
                self.socket_path.unlink()
            except OSError:
                pass
        with self.write_lock:
            self.ledger.close()
