"""A long-running router for a process that decides many jobs (the daemon's API, a submit gateway):
the engine, cluster states refreshed in a background thread, and the ledger view, built once.

    router = Router.from_config(cfg, config_path)
    router.start()                          # background refresh of squeue/sinfo
    d = router.route_script("job.sh", [("cpus-per-task", "4")], user="alice")
    print(d.summary()); json.dumps(d.to_dict())
    router.stop()
"""

from __future__ import annotations

import time

from .engine import Decision, Engine
from .history import LedgerView
from .request import JobRequest, build_request
from .site import Site, compile_site
from .state import StateCache


class Router:
    def __init__(self, site: Site, ledger: LedgerView | None, refresh_s: float = 30.0):
        self.site = site
        # Decisions never wait for Slurm: the refresher keeps states fresh, and a state older than
        # twice its period is still used (its age is in the explanation) rather than fetched inline.
        self.states = StateCache(site.clusters, max_age_s=float("inf"))
        self.refresh_s = refresh_s
        live = self.states if site.settings.live_state else None
        self.engine = Engine(site, ledger=ledger, states=live)

    @classmethod
    def from_config(cls, cfg, config_path=None, ledger_path=None, refresh_s: float | None = None) -> Router:
        from greend.ledger import default_path

        site = compile_site(cfg, config_path)
        path = ledger_path or site.settings.ledger or default_path(cfg.resolved_state_dir())
        return cls(site, LedgerView(path, site),
                   refresh_s if refresh_s is not None else max(site.settings.state_max_age_s, 1.0))

    def start(self) -> None:
        if self.site.settings.live_state:
            self.states.refresh()
            self.states.start(self.refresh_s)

    def stop(self) -> None:
        self.states.stop()

    def route(self, request: JobRequest, now: float | None = None) -> Decision:
        return self.engine.decide(request, now=now)

    def route_script(self, script, options=(), *, user: str, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        return self.route(build_request(script, list(options), user=user, now=now), now=now)
