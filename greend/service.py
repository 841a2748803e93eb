"""The main-thread loop shared by `greend run` and `greend controller`: start, serve until SIGTERM or
SIGINT, reload on SIGHUP, shut down cleanly."""

from __future__ import annotations

import logging
import signal
import threading

from . import sdnotify
from .api import Api
from .http import serve

log = logging.getLogger(__name__)


def run_until_signalled(service, stop_message: str) -> None:
    """Drive `service` (start(), reload(), shutdown()) from the main thread until told to stop."""
    stop = threading.Event()
    reload_requested = threading.Event()

    def on_stop(signum, _frame):
        log.info("received %s: %s", signal.Signals(signum).name, stop_message)
        stop.set()

    def on_hup(_signum, _frame):
        reload_requested.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    service.stop_event = stop
    service.start()
    sdnotify.ready()  # systemd Type=notify: the listeners are up
    # A service whose periodic work pings the watchdog itself (the node daemon's sampling) says so.
    ping_here = not getattr(service, "pings_watchdog", False)
    try:
        while True:
            # A signal delivered to another thread runs its handler only when the main thread
            # wakes up: never block it indefinitely.
            while not stop.wait(0.5):
                if ping_here:
                    sdnotify.watchdog()
            if reload_requested.is_set():
                reload_requested.clear()
                stop.clear()
                service.reload()
                continue
            break
    finally:
        sdnotify.stopping()
        service.shutdown()


class Service:
    """The lifecycle the node daemon and the controller share: build the API over the service
    (an ApiHost), serve it with greend.http, run until signalled, stop serving and close every
    read connection. Subclasses set cfg, listen, socket_path and `what`, and implement start(),
    reload() and shutdown() around serve() and stop_serving()."""

    what = "greend"
    api = None
    server = None
    stop_event: threading.Event

    def serve(self, tls=None):
        self.api = Api(self)
        self.server = serve(self.api, self.listen, self.socket_path, what=self.what, tls=tls)
        return self.server

    def stop_serving(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.api is not None:
            self.api.close()

    def _close_ledger_metrics(self) -> None:
        lm = getattr(self, "ledger_metrics", None)
        if lm is not None and getattr(lm, "db", None) is not None:
            lm.db.close()
            lm.db = None

    def run_forever(self, stop_message: str = "exit") -> None:
        run_until_signalled(self, stop_message)
