"""`greend controller`, site mode's receiving end (docs/site-mode.md): validates agents' batches
(greend.wire), de-duplicates and stores them in the site's ledger, and serves the same read API
as a node."""

from __future__ import annotations

import contextlib
import logging
import platform
import sqlite3
import threading
import time
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from pydantic import ValidationError

from . import __version__, decisions, forward, route_api, sitedb
from . import config as config_mod
from .errors import ApiError, DaemonError, LedgerError, SiteError
from .exporter import LedgerMetrics
from .http import bearer_ok, default_socket, dumps, is_loopback, parse_json, parse_listen, server_tls
from .ledger import Ledger, default_path
from .service import Service
from .wire import METRICS, RECORDS_PATH, BatchIn, read_token, validation_message

log = logging.getLogger(__name__)
_NO_LOCK = contextlib.nullcontext()  # a server database orders concurrent writers itself


def default_controller_socket(cfg: config_mod.Config, state_dir: Path) -> Path | None:
    return default_socket(cfg.controller.socket, state_dir, "controller.sock")


def controller_state_dir(cfg: config_mod.Config) -> Path:
    return Path(cfg.controller.state_dir or Path(cfg.resolved_state_dir()) / "controller")


class Controller(Service):
    """`greend controller`: receives agents' records and serves the site's ledger (an ApiHost)."""

    node = None
    what = "greend controller"

    def __init__(self, cfg: config_mod.Config, config_path: str | None = None,
                 listen: str | None = None, token_file: str | None = None,
                 socket_path: Path | None = None, state_dir: Path | None = None):
        self.config_path = config_path
        # Command-line choices, which a reload of the file keeps.
        self.token_file_arg = Path(token_file) if token_file else None
        self.state_dir_arg = Path(state_dir) if state_dir else None
        self.cfg = cfg = self._with_args(cfg)
        try:
            self.token = self._read_token(cfg)
        except SiteError as e:
            raise DaemonError(str(e)) from None
        self.listen = parse_listen(listen or cfg.controller.listen,
                                   "--listen" if listen else "controller.listen")
        try:
            self.tls = self._tls(cfg)
        except SiteError as e:
            raise DaemonError(str(e)) from None
        self.state_dir = controller_state_dir(cfg)
        self.ledger_path = default_path(self.state_dir)
        # The site ledger (controller.database): greend.sitedb stores the batches. On a database
        # server, every read (the API, the ledger metrics, the policy engine's history) goes to
        # the server; the local SQLite ledger holds none of the site's records (docs/site-mode.md,
        # "Reads on a server database").
        try:
            self.site = sitedb.open_site(cfg.controller, self.state_dir)
        except (LedgerError, SiteError) as e:
            raise DaemonError(str(e)) from None
        self.ledger = self.site.ledger if isinstance(self.site, sitedb.SqliteSite) else Ledger(
            self.ledger_path)
        self.socket_path = socket_path if socket_path is not None else default_controller_socket(
            cfg, self.state_dir)
        self.max_body = cfg.controller.max_body_bytes
        self.server_reads = None if isinstance(self.site, sitedb.SqliteSite) else self.site.reader
        self.ledger_metrics = LedgerMetrics(self.ledger_path, lambda: self.cfg.policy.budgets,
                                            reader=self.server_reads)
        try:  # what is stored goes on to an institute controller ([controller] upstream_url)
            self.forwarder = forward.from_config(cfg.controller, self.ledger_path)
        except SiteError as e:
            raise DaemonError(str(e)) from None
        self.routes = {("POST", RECORDS_PATH): self.ingest,
                       ("POST", decisions.DECISIONS_PATH): self.post_decision,
                       ("POST", route_api.ROUTE_PATH): self.post_route}
        # The read API (greend.api) reads a server database through its pooled connections
        # (server_reads, above); never the local SQLite ledger, which holds none of the site's
        # records there.
        self.router = None  # POST /api/v1/route's policy router, injected by daemon_cli.py
        self.route_rate = decisions.RateLimit(cfg.daemon.route_per_minute)
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

    # -- ingest ---------------------------------------------------------------------------------
    def count_reject(self, reason: str) -> None:
        with self.stats_lock:
            self.rejects[reason] = self.rejects.get(reason, 0) + 1

    def _reject(self, reason: str, status: int, message: str, errors: list | None = None):
        self.count_reject(reason)
        if errors is not None:
            return status, "application/json", dumps({"error": message, "errors": errors})
        raise ApiError(status, message)

    def ingest(self, body: bytes, caller, headers) -> tuple[int, str, bytes]:
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
            return 503, "application/json", dumps({"error": f"ledger unavailable, retry later: {e}"})
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
        return 200, "application/json", dumps(out)

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
        return self.site.check(batch.records)

    def _store(self, batch: BatchIn) -> tuple[int, int]:
        decided = [decisions.validate(d) for d in batch.decisions]
        kw = {}
        if self.forwarder is not None:  # SQLite only (config: upstream_url needs database sqlite)
            def then(db, stored, nodes):
                self.forwarder.queue(db, stored, {
                    n.node: min((s.t_start for s in n.series), default=time.time()) for n in nodes})
            kw["then"] = then
        with self.write_lock if self.site.engine == sitedb.SQLITE else _NO_LOCK:
            accepted, stale = self.site.store(batch.factor_sets, batch.records, batch.nodes, decided,
                                              **kw)
        if decided:
            self.ledger_metrics.invalidate()
        return accepted, stale

    def post_decision(self, body: bytes, caller, headers) -> tuple[int, str, bytes]:
        """POST /api/v1/decisions from an agent (site token), into the site's ledger."""
        if not bearer_ok(headers, self.token):
            self.count_reject("auth")
        if not isinstance(self.site, sitedb.SqliteSite):
            return self._post_decision_server(body, headers)
        out = decisions.post(body, caller, headers, self.ledger, self.write_lock,
                             token_only=self.token or b"", max_bytes=self.cfg.daemon.decision_max_bytes)
        self.ledger_metrics.invalidate()
        return out

    def _post_decision_server(self, body: bytes, headers) -> tuple[int, str, bytes]:
        """As decisions.post with the site token, stored in the server database."""
        if not bearer_ok(headers, self.token):
            raise ApiError(401, "decisions are taken from agents presenting the site token")
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype and ctype != "application/json":
            raise ApiError(415, f"Content-Type {ctype!r}: expected application/json")
        limit = self.cfg.daemon.decision_max_bytes
        if len(body) > limit:
            raise ApiError(413, f"a decision is at most {limit} bytes (daemon.decision_max_bytes); "
                                f"this one is {len(body)}")
        try:
            row = decisions.validate(parse_json(body or b"null", "decision"))
        except decisions.DecisionInvalid as e:
            raise ApiError(400, f"invalid decision: {e}") from None
        except RecursionError:
            raise ApiError(400, "invalid decision: nested too deeply") from None
        stored, ident = self.site.store_decision(row)
        if not stored:
            raise ApiError(409, f"token {row['token']!r} is another user's decision")
        return 200, "application/json", dumps({"id": ident, "token": row["token"]})

    def post_route(self, body: bytes, caller, headers) -> tuple[int, str, bytes]:
        """POST /api/v1/route: where the policy engine sends a job, from the controller's own
        warm cluster state (socket callers, or agents and gateways with the site token)."""
        self.route_rate.per_minute = self.cfg.daemon.route_per_minute
        return route_api.post(body, caller, headers, self.router, token=self.token,
                              rate=self.route_rate)

    # -- views ----------------------------------------------------------------------------------
    def metric_collectors(self):
        extra = [self.forwarder] if self.forwarder is not None else []
        return [self, self.ledger_metrics, *extra]

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
        upstream = {}
        if self.forwarder is not None:
            reasons += [r.replace("site: ", "upstream: ", 1) for r in self.forwarder.health_reasons()]
            upstream = {"upstream": self.forwarder.status()}
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
            **upstream,
        }

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.serve(tls=self.tls)
        if self.forwarder is not None:
            self.forwarder.start()
        if self.tls is None and not is_loopback(self.listen[0]):
            log.warning("controller: listening on %s without TLS: the site token and the records "
                        "cross the network in clear; set controller.tls_cert_file and "
                        "controller.tls_key_file (docs/security.md)", self.listen[0])
        log.info("greend %s controller: %s; site ledger %s", __version__,
                    ", ".join(self.server.urls()), self.site.describe())

    @staticmethod
    def _tls(cfg: config_mod.Config):
        c = cfg.controller
        if c.tls_cert_file is None:
            return None
        return server_tls(c.tls_cert_file, c.tls_key_file)

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
            c = new.controller
            if (c.tls_cert_file is None) != (self.tls is None):
                raise SiteError("switching TLS on or off needs a restart")
            if bool(c.upstream_url) != (self.forwarder is not None):
                raise SiteError("switching controller.upstream_url on or off needs a restart")
            upstream = forward.upstream_token(c) if c.upstream_url else b""
            if c.tls_cert_file is not None:
                self._tls(new)  # loadable? (raises SiteError naming the file)
                # Renewed certificates: new handshakes use them, open connections keep theirs.
                self.tls.load_cert_chain(c.tls_cert_file, c.tls_key_file)
        except (config_mod.ConfigError, SiteError) as e:
            self.config_error = f"reload: {e}; kept the running config"
            log.error("%s", self.config_error)
            return
        self.cfg, self.token = new, token
        self.max_body = new.controller.max_body_bytes
        if self.forwarder is not None:
            self.forwarder.update(new.controller, upstream)
        if hasattr(self.router, "reload"):
            self.router.reload(new)
        self.config_error = ""
        log.info("controller: config, token%s reloaded",
                    " and TLS certificate" if self.tls is not None else "")

    def run_forever(self) -> None:
        super().run_forever("exit")

    def shutdown(self) -> None:
        self.stop_serving()
        if self.forwarder is not None:  # what is not sent stays in the outbox for the next start
            self.forwarder.stop()
            self.forwarder.drain()
            self.forwarder.close()
        if hasattr(self.router, "close"):
            self.router.close()
        self._close_ledger_metrics()
        with self.write_lock:
            if self.ledger is not getattr(self.site, "ledger", None):
                self.ledger.close()
            self.site.close()
