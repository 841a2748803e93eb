"""Site mode, the agent's side (docs/site-mode.md): the outbox, written in the checkpoint's own
transaction, and the sender that drains it to the controller over authenticated HTTP(S)."""

from __future__ import annotations

import http.client
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import __version__, decisions
from . import config as config_mod
from .errors import GreendError
from .http import client_tls
from .httpclient import RetryingHTTPConnection, RetryingHTTPSConnection, connect_retrying
from .ledger import Ledger, LedgerError
from .wire import FACTOR_COLS, JOB_COLS, METRICS, RECORDS_PATH, SERIES_COLS

log = logging.getLogger(__name__)

MAX_SERIES_PER_BATCH = 20000  # series buckets in one request (a long job after a long outage)
MAX_REQUEST_BYTES = 4 << 20  # an agent splits batches above this (the controller accepts 8 MiB)
BACKOFF_START_S = 1.0
FAILOVER_CONNECT_S = 2.0  # with other controllers to try, a refused connect is retried this long
DRAIN_ON_EXIT_S = 5.0


def check_tls(settings: config_mod.Controller):
    """The TLS context that verifies the controllers (controller.ca_file, else the system's CAs)
    when a url is https://; None when all are http://. SiteError when the CA file is unusable."""
    if not any(u.startswith("https://") for u in settings.urls):
        return None
    return client_tls(settings.ca_file)


class Outbox:
    """The checkpoint hook: queues the jobs just written (and the node's totals), in the
    checkpoint's transaction, so the books and the outbox commit together or not at all."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.backlog = 0  # job records queued, as of the last checkpoint or send

    def __call__(self, db: sqlite3.Connection, accounts: list) -> None:
        jobs = [(acc.row.pk, min((tb for tb, _ in acc.buckets), default=acc.row.last_seen))
                for acc in accounts]
        self.queue(db, jobs, {"node": min(self.monitor.node_bucket, default=time.time())})

    def queue(self, db: sqlite3.Connection, jobs: list[tuple[int, float]],
              nodes: dict[str, float] | None = None) -> None:
        """Queue jobs (pk, oldest series bucket to send) and node totals (outbox kind -> oldest
        node series bucket to send; ref 0): "node" on an agent, "node:<name>" on a forwarder."""
        now = time.time()
        rows = [("job", pk, start, now) for pk, start in jobs]
        rows += [(kind, 0, start, now) for kind, start in (nodes or {}).items()]
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


class _HTTP(RetryingHTTPConnection):
    connect_s: float | None = None

    def connect(self) -> None:
        connect_retrying(super(RetryingHTTPConnection, self).connect, self.connect_s or self.timeout)


class _HTTPS(RetryingHTTPSConnection):
    connect_s: float | None = None

    def connect(self) -> None:
        connect_retrying(super(RetryingHTTPSConnection, self).connect, self.connect_s or self.timeout)


class _SendFailed(GreendError):
    def __init__(self, reason: str, message: str, status: int = 0):
        super().__init__(message)
        self.reason = reason
        self.status = status


class Sender:
    """Drains the outbox to the controller from its own thread and its own ledger connection:
    bounded batches, back to back while there is a backlog, exponential backoff on failure.
    With several controllers (controller.url as a list), a batch that one cannot take (no
    connection, timeout, HTTP 5xx) goes to the next at once; the sender stays with the one that
    answered. The backoff starts when every controller has failed the batch."""

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
        self.current = 0  # index in settings.urls of the controller in use
        self.failovers = 0

    # -- settings -------------------------------------------------------------------------------
    def update(self, settings: config_mod.Controller, token: bytes) -> None:
        """A reload: new URL, token or limits take effect from the next send."""
        if (settings.urls, settings.timeout_s, settings.ca_file) != (
                self.settings.urls, self.settings.timeout_s, self.settings.ca_file):
            self._close_conn()
            self.current = 0
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
            log.info("outbox: controller %s reachable again", self.url)
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
            packed = pack(db, rows, self.node, self.batch_limit)
        finally:
            db.execute("COMMIT")
        items = packed.items
        truncated = len(items) < total or not all(it[3] for it in items)
        if not items:
            return b"", [], 0, False
        batch = {"agent": {"cluster": self.cluster, "node": self.node, "version": __version__},
                 "factor_sets": packed.factor_sets, "records": packed.records,
                 "nodes": packed.nodes}
        if packed.decided:  # routing decisions; a controller older than them ignores the key
            batch["decisions"] = packed.decided
        return (json.dumps(batch, separators=(",", ":")).encode(), items, len(packed.records),
                truncated)

    @property
    def url(self) -> str:
        """The controller in use."""
        urls = self.settings.urls
        return urls[self.current % len(urls)] if urls else ""

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            u = urlsplit(self.url)
            timeout = min(self.settings.timeout_s, self.timeout_cap)
            if u.scheme == "https":
                self.conn = _HTTPS(u.hostname, u.port, timeout=timeout,
                                   context=check_tls(self.settings))
            else:
                self.conn = _HTTP(u.hostname, u.port, timeout=timeout)
            if len(self.settings.urls) > 1:  # another controller may answer at once
                self.conn.connect_s = min(timeout, FAILOVER_CONNECT_S)
        return self.conn

    def _close_conn(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _post(self, body: bytes) -> None:
        """POST the batch to the controller in use, else to the next ones in turn; a controller
        that died mid-batch may or may not have stored it: the next one stores it once (the
        upserts are idempotent). Raises the last _SendFailed when none took it."""
        n = len(self.settings.urls)
        for i in range(n):
            try:
                self._post_one(body)
                return
            except _SendFailed as e:
                if i == n - 1 or not (e.reason == "unreachable" or e.status >= 500):
                    raise
                failed = self.url
                self._close_conn()
                self.current = (self.current + 1) % n
                self.failovers += 1
                log.warning("outbox: controller %s failed (%s); sending to %s", failed, e, self.url)

    def _post_one(self, body: bytes) -> None:
        base = urlsplit(self.url).path.rstrip("/")
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
                raise self._failed(_SendFailed("unreachable", f"{self.url}: {e}")) from None
            except (OSError, http.client.HTTPException) as e:
                self._close_conn()
                msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
                raise self._failed(_SendFailed("unreachable", f"{self.url}: {msg}")) from None
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
                "auth", f"controller {self.url} rejects this node's token (HTTP "
                f"{resp.status}): check controller.token_file against the controller's",
                resp.status))
        if resp.status == 413 and self.batch_limit > 1:
            self.batch_limit = max(1, self.batch_limit // 2)
            log.warning("outbox: batch too large for the controller; now %d records a batch",
                        self.batch_limit)
        reason = "rejected" if 400 <= resp.status < 500 else "http"
        raise self._failed(_SendFailed(
            reason, f"controller {self.url} answered HTTP {resp.status}: {detail}",
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
            "controller": self.url,
            "controllers": self.settings.urls,
            "failovers": self.failovers,
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


@dataclass
class Packed:
    """One batch's content, read from the outbox rows in order (greend.agent.pack)."""

    records: list = field(default_factory=list)
    nodes: list = field(default_factory=list)
    decided: list = field(default_factory=list)
    items: list = field(default_factory=list)  # (kind, ref, seq, done, resend_from)
    factor_sets: list = field(default_factory=list)


def pack(db: sqlite3.Connection, rows, node: str, batch_limit: int,
         rename: Callable[[str], str] = lambda name: name) -> Packed:
    """The records, node books and decisions of outbox rows, in one transaction's snapshot, within
    the batch bounds (batch_limit job records, MAX_SERIES_PER_BATCH series buckets,
    MAX_REQUEST_BYTES). A node row ("node" or "node:NAME") stands for `node`'s books. rename: the
    cluster and node names as the receiver keys them (a site controller forwarding upstream
    prefixes its site, greend/forward.py)."""
    p = Packed()
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
                if p.items and size + n > MAX_REQUEST_BYTES:
                    break
                size += n
                p.decided.append(out)
            p.items.append((kind, ref, seq, True, start))
            continue
        if kind == "job" and len(p.records) >= batch_limit:
            break
        if kind == "job":
            job = db.execute("SELECT * FROM jobs WHERE pk = ?", (ref,)).fetchone()
            if job is None:  # gone from the books (should not happen): nothing to send
                p.items.append((kind, ref, seq, True, start))
                continue
            series = db.execute(
                "SELECT * FROM job_series WHERE job_pk = ? AND t_start >= ? "
                "ORDER BY t_start LIMIT ?", (ref, start, budget + 1)).fetchall()
            out = _job_record(job)
            out["cluster"], out["node"] = rename(out["cluster"]), rename(out["node"])
            out["series"] = [{c: x[c] for c in SERIES_COLS} for x in series[:budget]]
        else:
            series = db.execute(
                "SELECT t_start, t_end, energy_uj, unattributed_uj FROM node_series "
                "WHERE node = ? AND t_start >= ? ORDER BY t_start LIMIT ?",
                (node, start, budget + 1)).fetchall()
            totals = db.execute(
                "SELECT domain, source, provenance, energy_uj, unattributed_uj, idle_uj "
                "FROM node_totals WHERE node = ?", (node,)).fetchall()
            out = {"node": rename(node), "totals": [dict(t) for t in totals],
                   "series": [dict(x) for x in series[:budget]]}
        sent = series[:budget]
        done = len(series) <= budget
        # What to send again next time: the rest, or the last (still open) bucket.
        resend_from = series[budget]["t_start"] if not done else (
            sent[-1]["t_start"] if sent else start)
        n = len(json.dumps(out, separators=(",", ":")))
        if p.items and size + n > MAX_REQUEST_BYTES:
            break
        size += n
        budget -= len(sent)
        if kind == "job":
            factor_ids.update(x["factor_set"] for x in out["series"])
            p.records.append(out)
        else:
            p.nodes.append(out)
        p.items.append((kind, ref, seq, done, resend_from))
        if budget <= 0:
            break
    if factor_ids:
        marks = ",".join("?" * len(factor_ids))
        for f in db.execute(f"SELECT * FROM factor_sets WHERE id IN ({marks})",
                            sorted(factor_ids)):
            d = {c: f[c] for c in FACTOR_COLS}
            d["sources"] = json.loads(d["sources"])
            p.factor_sets.append(d)
    return p


def _job_record(row: sqlite3.Row) -> dict:
    d = {c: row[c] for c in JOB_COLS}
    d["provenance"] = json.loads(d["provenance"] or "{}")
    d["meta"] = json.loads(d["meta"] or "{}")
    return d
