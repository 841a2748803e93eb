"""`greend run`: the node daemon. APScheduler drives sampling, checkpoints, expiry of finished jobs
from /metrics and refresh of time-varying factors; HTTP serves /metrics, /healthz and the API.

SIGTERM/SIGINT: final checkpoint and clean exit. SIGHUP: reload and validate the config; on an
error the running config stays and the reason is logged and shown in /healthz. With
[controller] url set, job records also go to the site controller through the outbox (agent.py).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from greend.collectors.slurm import from_config as slurm_metadata

from . import agent, decisions, phases, route_api, sdnotify
from . import config as config_mod
from .errors import DaemonError, LedgerError, SiteError
from .exporter import LedgerMetrics, NodeCollector, Snapshot
from .http import default_socket as socket_rule
from .http import parse_listen
from .ledger import Ledger, default_path
from .monitor import SOURCES, Monitor
from .service import Service
from .wire import read_token

log = logging.getLogger(__name__)

__all__ = ["Daemon", "DaemonError", "default_socket", "parse_listen"]


def default_socket(cfg: config_mod.Config) -> Path | None:
    """The node daemon's API socket (greend.http.default_socket's rule)."""
    return socket_rule(cfg.daemon.socket, Path(cfg.resolved_state_dir()), "api.sock")


class Daemon(Service):
    pings_watchdog = True  # from sample(), not from the service loop (greend/sdnotify.py)
    def __init__(self, cfg: config_mod.Config, config_path: str | None = None,
                 listen: str | None = None, socket_path: Path | None = None,
                 overrides: dict | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides or {}  # from the command line (--state-dir): kept on reload
        self.lock = threading.RLock()
        self.stop_event = threading.Event()
        self.ledger_path = default_path(cfg.resolved_state_dir())
        self.ledger = Ledger(self.ledger_path)
        # Jobs the ledger says are running: the monitor's resume closes them after a reboot, in
        # a transaction of its own, and site mode must still send those final records.
        running_before = {r.pk for r in self.ledger.running_jobs(cfg.node_name)}
        # None: no Slurm on this node
        self.slurm = slurm_metadata(cfg.slurm, cfg.node_name, cfg.paths.cgroupfs, cfg.paths.procfs)
        self.monitor = Monitor(cfg, self.ledger, slurm=self.slurm)
        self.ended: dict[str, tuple[float, object]] = {}  # key -> (ended at, Account), for /metrics
        self.checkpoint_errors = 0
        self.last_checkpoint = 0.0
        self.last_checkpoint_error = ""
        self.config_error = ""
        self.started = time.time()
        self.listen = parse_listen(listen or cfg.daemon.listen, "--listen" if listen else "daemon.listen")
        self.socket_path = socket_path if socket_path is not None else default_socket(cfg)
        self.scheduler = None
        self.exporter = NodeCollector(self.snapshot, user_label=cfg.daemon.user_label)
        self.factors_cache = config_mod.FactorsCache()  # other clusters' factors, for snapshot()
        self._series_mtime = self._series_mtimes()
        self.node = self.monitor.node
        self.max_body = cfg.daemon.decision_max_bytes  # the one body a node takes: a decision
        # The writes a node takes over HTTP: routing decisions from their own users, and phase
        # boundaries of a user's own running job (greend.track, greend/phases.py).
        self.routes: dict = {("POST", decisions.DECISIONS_PATH): self.post_decision,
                             ("POST", route_api.ROUTE_PATH): self.post_route,
                             ("POST", phases.PHASES_PATH): phases.Endpoint(self).post}
        self.decision_rate = decisions.RateLimit(cfg.daemon.decisions_per_minute)
        # POST /api/v1/route's policy router, injected by the composition root (daemon_cli.py).
        self.router = None
        self.route_rate = decisions.RateLimit(cfg.daemon.route_per_minute)
        self.ledger_metrics = LedgerMetrics(self.ledger_path, lambda: self.cfg.policy.budgets)
        self.token: bytes | None = None
        self.outbox: agent.Outbox | None = None
        self.sender: agent.Sender | None = None
        try:
            self._site(cfg)
        except DaemonError:
            self.monitor.close()
            self.ledger.close()
            raise
        if self.outbox is not None and running_before:
            self._queue_closed(running_before)

    # -- site mode ------------------------------------------------------------------------------
    def _site(self, cfg: config_mod.Config) -> None:
        """Start, change or stop sending records to the controller as cfg.controller says."""
        c = cfg.controller
        if not c.url:
            if self.sender is not None:
                self.sender.stop()
                self.sender.close()
                self.monitor.on_checkpoint.remove(self.outbox)
                self.sender = self.outbox = None
                log.info("site mode off: records are no longer sent to a controller")
            self.token = None
            return
        try:
            token = read_token(c.token_file)
            agent.check_tls(c)
        except SiteError as e:
            raise DaemonError(str(e)) from None
        self.token = token
        if self.sender is not None:
            self.sender.update(c, token)
            return
        self.outbox = agent.Outbox(self.monitor)
        self.monitor.on_checkpoint.append(self.outbox)
        self.sender = agent.Sender(c, token, self.ledger_path, self.monitor.cluster, self.monitor.node,
                                  self.outbox)
        try:
            self.outbox.backlog = self.ledger.db.execute(
                "SELECT COUNT(*) FROM outbox WHERE kind = 'job'").fetchone()[0]
        except Exception:
            pass
        if self.scheduler is not None:  # switched on by a reload
            self.sender.start()

    def _queue_closed(self, pks: set[int]) -> None:
        marks = ",".join("?" * len(pks))
        with self.ledger.transaction() as db:
            closed = db.execute(f"SELECT pk, last_seen FROM jobs WHERE state = 'ended' AND pk IN "
                                f"({marks})", sorted(pks)).fetchall()
            if closed:
                self.outbox.queue(db, [(r[0], r[1]) for r in closed])
                log.info("site: queued %d job(s) closed at start", len(closed))

    def metric_collectors(self) -> list:
        out = [self.exporter, self.ledger_metrics]
        return [*out, self.sender] if self.sender is not None else out

    def post_decision(self, body: bytes, caller, headers) -> tuple[int, str, bytes]:
        """POST /api/v1/decisions: a user's routing decision (`greend submit`), into this node's
        ledger."""
        def forward(db, ident: int) -> None:  # site mode: to the controller, through the outbox
            if self.outbox is not None:
                self.outbox.queue_decision(db, ident)

        d = self.cfg.daemon
        self.decision_rate.per_minute = d.decisions_per_minute
        out = decisions.post(body, caller, headers, self.ledger, self.lock, after=forward,
                             max_bytes=d.decision_max_bytes, rate=self.decision_rate,
                             clusters=set(self.cfg.clusters) | {self.cfg.cluster})
        self.ledger_metrics.invalidate()
        return out

    def post_route(self, body: bytes, caller, headers) -> tuple[int, str, bytes]:
        """POST /api/v1/route: where the policy engine sends a job (a cli_filter asks at sbatch)."""
        self.route_rate.per_minute = self.cfg.daemon.route_per_minute
        return route_api.post(body, caller, headers, self.router, token=self.token,
                              rate=self.route_rate)

    # -- periodic work --------------------------------------------------------------------------
    def sample(self) -> None:
        with self.lock:
            ended_before = {id(a) for a in self.monitor.finished}
            self.monitor.tick()
            sdnotify.watchdog()  # systemd WatchdogSec: a stuck sampler gets greend restarted
            now = time.time()
            for acc in self.monitor.finished:
                if id(acc) not in ended_before:
                    self.ended[acc.key] = (now, acc)

    def checkpoint(self) -> None:
        with self.lock:
            try:
                self.monitor.checkpoint()
            except (LedgerError, OSError) as e:
                self.checkpoint_errors += 1
                if not self.last_checkpoint_error:
                    log.error("checkpoint failed (books kept in memory, retrying): %s", e)
                self.last_checkpoint_error = str(e)
            except Exception as e:  # sqlite3 errors (disk full, I/O) must not kill the scheduler
                self.checkpoint_errors += 1
                if not self.last_checkpoint_error:
                    log.error("checkpoint failed (books kept in memory, retrying): %s", e)
                self.last_checkpoint_error = f"{type(e).__name__}: {e}"
            else:
                if self.last_checkpoint_error:
                    log.info("checkpoint works again")
                self.last_checkpoint_error = ""
                self.last_checkpoint = time.time()

    def expire(self) -> None:
        grace = self.cfg.daemon.finished_job_grace_s
        now = time.time()
        with self.lock:
            for key in [k for k, (t, _) in self.ended.items() if now - t > grace]:
                del self.ended[key]

    def refresh_factors(self) -> None:
        if self.cfg.clusters[self.monitor.cluster].carbon_signal is not None:
            # A live carbon signal (greend/carbon_feed.py): ask the provider at most every
            # carbon_signal.refresh_s, within its timeout_s, outside the daemon's lock; an outage
            # falls back to the cache, the series, then the static value, and the factors name
            # what is used.
            from . import carbon_feed

            self._install_factors(carbon_feed.live_factors,
                                  "carbon signal: keeping the factors in force")
            return
        mt = self._series_mtimes()
        if mt != self._series_mtime and self._install_factors(
                config_mod.cluster_factors,
                "carbon intensity series changed but is invalid, keeping the old"):
            self._series_mtime = mt
            log.info("carbon intensity series re-read")

    def _install_factors(self, make, keeping: str) -> bool:
        """Put make(cfg) in force under the lock; a ConfigError keeps the factors in force and
        logs `keeping` with the error."""
        try:
            factors = make(self.cfg)
        except config_mod.ConfigError as e:
            log.error("%s: %s", keeping, e)
            return False
        with self.lock:
            self.monitor.factors = factors
        return True

    def _series_mtimes(self) -> dict:
        out = {}
        for name, c in self.cfg.clusters.items():
            if c.carbon_intensity_series:
                try:
                    out[name] = c.carbon_intensity_series.stat().st_mtime
                except OSError:
                    out[name] = None
        return out

    def _schedule_slurm(self, sch) -> None:
        """Slurm job metadata is refreshed by the scheduler, never inside a sample: at start, every
        slurm.refresh_s, and at once when a sample meets a job id the cache does not know (the
        refresh also writes finished jobs' footprints back to Slurm when configured)."""
        sl = self.slurm
        sch.add_job(sl.refresh, "interval", seconds=self.cfg.slurm.refresh_s, id="slurm",
                    next_run_time=datetime.now())
        sl.on_request = lambda: sch.add_job(sl.refresh, id="slurm-now", replace_existing=True)

    def reload(self) -> None:
        """SIGHUP: validate the file again; apply what can change without losing the books."""
        try:
            new = config_mod.load(self.config_path)
        except config_mod.ConfigError as e:
            self.config_error = f"reload: {e}; kept the running config"
            log.error("config reload failed, keeping the running config: %s", e)
            return
        if self.overrides:
            new = new.model_copy(update=self.overrides)
        new._state_dir_flag = self.cfg._state_dir_flag  # --state-dir still beats the environment
        if (new.cluster, new.node_name, new.paths, new.resolved_state_dir()) != (
                self.cfg.cluster, self.cfg.node_name, self.cfg.paths, self.cfg.resolved_state_dir()):
            self.config_error = ("reload: cluster, node, paths and state_dir need a restart; "
                                 "kept the running values")
            log.error("%s", self.config_error)
            return
        with self.lock:
            try:
                self._site(new)
            except DaemonError as e:
                self.config_error = f"reload: {e}; kept the running config"
                log.error("%s", self.config_error)
                return
            self.cfg = new
            self.monitor.cfg = new
            if hasattr(self.router, "reload"):
                self.router.reload(new)
            self.monitor.factors = config_mod.cluster_factors(new)
            self.exporter.user_label = new.daemon.user_label
        self.config_error = ""
        log.info("config reloaded from %s", self.config_path or "the embedded default")

    # -- views ----------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """What /metrics shows: the monitor's typed views, copied under the lock; the factors of the
        other clusters come from a cache rebuilt only when their configuration or series change."""
        m = self.monitor
        with self.lock:
            cfg = self.cfg
            domains = m.domain_totals()
            jobs = m.job_totals()
            jobs.extend(acc.totals(False, 0.0) for _, acc in self.ended.values())
            own = m.factors
            collectors = [copy.copy(s) for s in m.status.values() if s.present]
            snap = Snapshot(m.cluster, m.node, domains, jobs, {}, collectors, m.last_tick_s,
                            m.ticks, self.checkpoint_errors, self.last_checkpoint, m.gauges())
        now = time.time()
        others = self.factors_cache.get(cfg)
        for name in cfg.clusters:
            cf = own if name == m.cluster else others.get(name)
            if cf is None:
                continue
            try:
                snap.factors[name] = cf.at(now)
            except Exception:  # a bad series of another cluster must not break a scrape
                continue
        return snap

    def health(self) -> dict:
        reasons = []
        with self.lock:
            for s in self.monitor.status.values():
                if s.present and not s.ok:
                    reasons.append(f"collector {s.name} failing: {s.error}")
            if self.last_checkpoint_error:
                reasons.append(f"ledger checkpoint failing: {self.last_checkpoint_error}")
            if self.config_error:
                reasons.append(self.config_error)
            age = time.time() - (self.monitor.prev.t if self.monitor.prev else self.started)
            if age > max(3 * self.cfg.sampling.interval_s, 30):
                reasons.append(f"no sample for {age:.0f} s")
            if self.sender is not None:
                reasons.extend(self.sender.health_reasons())
            collectors = {
                s.name: {"present": s.present, "ok": s.ok, "error": s.error,
                         "errors_total": s.errors_total, "detail": s.detail}
                for s in self.monitor.status.values()
            }
            return {
                "status": "degraded" if reasons else "ok",
                "reasons": reasons,
                "node": self.monitor.node,
                "cluster": self.monitor.cluster,
                "uptime_s": time.time() - self.started,
                "samples": self.monitor.ticks,
                "jobs_running": len(self.monitor.accounts),
                "last_checkpoint": self.last_checkpoint or None,
                "collectors": collectors,
                "cpu_power_model": asdict(self.monitor.cpu_model),
                "sources": list(SOURCES),
                "site": self.sender.status() if self.sender is not None else None,
            }

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.serve()
        self.sample()  # baseline (or the catch-up interval after a restart) before serving data
        self.checkpoint()
        sch = BackgroundScheduler(daemon=True, job_defaults={"coalesce": True, "max_instances": 1,
                                                             "misfire_grace_time": 30})
        s = self.cfg.sampling
        sch.add_job(self.sample, "interval", seconds=s.interval_s, id="sample")
        sch.add_job(self.checkpoint, "interval", seconds=s.checkpoint_interval_s, id="checkpoint")
        # Often enough that a finished job leaves /metrics close to finished_job_grace_s after it
        # ended, whatever a reload sets it to.
        sch.add_job(self.expire, "interval", seconds=1.0, id="expire")
        # A live carbon signal is read at start too (bounded by its timeout_s), not only after a
        # first factor_refresh_s.
        signal = self.cfg.clusters[self.monitor.cluster].carbon_signal is not None
        sch.add_job(self.refresh_factors, "interval", seconds=self.cfg.daemon.factor_refresh_s,
                    id="factors", **({"next_run_time": datetime.now()} if signal else {}))
        if self.slurm is not None:
            self._schedule_slurm(sch)
        sch.start()
        self.scheduler = sch
        if self.sender is not None:
            self.sender.start()
        log.info("greend %s monitoring node %s (cluster %s): %s; ledger %s",
                    __import__("greend").__version__, self.monitor.node, self.monitor.cluster,
                    ", ".join(self.server.urls()), self.ledger_path)

    def run_forever(self) -> None:
        super().run_forever("final checkpoint and exit")

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
        with self.lock:
            self.sample()
            # Users' processes outside jobs: nobody watches them once we stop, so their records
            # end as last seen (a restart continues them); Slurm jobs stay running as of last_seen.
            self.monitor.end_user_records()
            self.checkpoint()
        if self.sender is not None:
            self.sender.stop()
            self.sender.drain()  # the final records, if the controller answers quickly
            self.sender.close()
        self.stop_serving()
        if hasattr(self.router, "close"):
            self.router.close()
        self._close_ledger_metrics()
        self.monitor.close()
        self.ledger.close()
