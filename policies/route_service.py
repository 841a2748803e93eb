"""The router behind POST /api/v1/route (greend/route_api.py): a long-lived `Router` whose cluster
states a background thread keeps warm, answering a `RouteQuery` with the decision `greend route
--json` prints, or with the key=value lines of `greend route --cli-filter`.

    service = RouteService(cfg, config_path, ledger_path)   # reader=...: a server's (see below)
    service.start()              # builds the router and its state refresh in the background
    daemon.router = service      # called from the HTTP workers: service(query) -> RouteAnswer
"""

from __future__ import annotations

import logging
import threading
import time

from greend.route_api import RouteAnswer, RouteFailed, RouteInvalid, RouteQuery

log = logging.getLogger(__name__)


def sbatch_options(data: dict) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(script, options) of a cli_filter's JSON: {"time": "00:10:00", "argv": ["job.sh"], ...}."""
    data = dict(data)
    argv = data.pop("argv", None) or []
    script = argv[0] if argv and isinstance(argv[0], str) else None
    options = []
    for k, v in data.items():
        if isinstance(v, bool | int | float):
            v = str(v)
        options.append((str(k), None if v in (None, "set") else str(v)))
    return script, options


def cli_filter_lines(d, here: str) -> list[str]:
    """A cli_filter's answer (examples/cli_filter.lua): verdict, cluster, message, then the
    options to set (`set OPTION=VALUE`) when the job is accepted on `here`."""
    from greend import quantities as q

    def line(key: str, value) -> str:
        return f"{key}={' '.join(str(value).split())}"

    if d.outcome == "no_cluster":
        return [line("verdict", "refuse"), line("message", f"greend: {d.summary()}")]
    if d.outcome == "refused":
        return [line("verdict", "refuse"), line("cluster", d.plan.cluster),
                line("message", f"greend: {d.plan.refused}")]
    out = [line("cluster", d.plan.cluster)]
    if d.plan.cluster != here:
        script = d.request.script or "SCRIPT"
        return [*out, line("verdict", "redirect"),
                line("message", f"greend: this job belongs on {d.plan.cluster}, not {here}: "
                     f"{d.summary()}. Submit it with: greend submit {script}")]
    out += [line("verdict", "accept"), line("message", f"greend: {d.summary()}")]
    if d.plan.partition:
        out.append(f"set partition={d.plan.partition}")
    if d.plan.begin is not None:
        out.append(f"set begin={q.slurm_time_point(d.plan.begin)}")
    if d.plan.nice is not None:
        out.append(f"set nice={d.plan.nice}")
    return out


class RouteService:
    """The injected router of a daemon or controller. Decisions are made one at a time (the
    engine and its ledger view are shared); the router is built once and rebuilt after reload().
    `reader`: a controller on a database server's reader factory (greend.sitedb.ServerSite.reader,
    injected by greend/daemon_cli.py): the history and usage come from there, not ledger_path."""

    def __init__(self, cfg, config_path: str | None, ledger_path=None, reader=None):
        self.cfg = cfg
        self.config_path = config_path
        self.ledger_path = ledger_path
        self.reader = reader
        self._router = None
        self._lock = threading.Lock()

    def _build(self):
        from greend.config import ConfigError

        from .router import Router

        try:
            r = Router.from_config(self.cfg, self.config_path, self.ledger_path)
        except ConfigError as e:
            raise RouteFailed(str(e)) from None
        if self.reader is not None:
            from .history import LedgerView

            local = r.engine.ledger
            r.engine.ledger = LedgerView(None, r.site, reader=self.reader)
            if local is not None:
                local.close()
        if self.cfg.policy.history_from == "sacct":
            from .cli import _sacct_history

            r.engine.ledger.sacct = _sacct_history(r.site, self.cfg.cluster)
        r.start()
        return r

    def router(self):
        with self._lock:
            if self._router is None:
                self._router = self._build()
            return self._router

    def start(self) -> None:
        """Build the router and fetch the clusters' state in the background: the daemon serves at
        once, and the first sbatch finds the state warm."""

        def warm():
            try:
                self.router()
            except Exception as e:
                log.error("route: cannot set up the policy router: %s", e)

        threading.Thread(target=warm, name="greend-route-warm", daemon=True).start()

    def reload(self, cfg) -> None:
        """A new configuration (SIGHUP): the next request builds a router from it."""
        with self._lock:
            old, self._router, self.cfg = self._router, None, cfg
        if old is not None:
            old.stop()

    def close(self) -> None:
        with self._lock:
            old, self._router = self._router, None
        if old is not None:
            old.stop()

    def __call__(self, query: RouteQuery) -> RouteAnswer:
        from greend.config import ConfigError
        from greend.ledger import LedgerError

        from .request import RequestError, build_request

        router = self.router()
        script, options = sbatch_options(query.options)
        script = query.script or script
        now = time.time()
        try:
            req = build_request(script, options, user=query.user, now=now,
                                script_text=query.script_text if query.script_text is not None else "")
            with self._lock:
                d = router.route(req, now=now)
        except RequestError as e:
            raise RouteInvalid(str(e)) from None
        except (ConfigError, LedgerError, OSError) as e:
            raise RouteFailed(str(e)) from None
        return RouteAnswer(d.to_dict(), cli_filter_lines(d, query.cli_filter)
                           if query.cli_filter is not None else [])
