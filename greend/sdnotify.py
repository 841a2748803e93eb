"""systemd's readiness and watchdog protocol (sd_notify(3)), without a dependency: a datagram to
$NOTIFY_SOCKET. Every call is a no-op when greend does not run under systemd (Type=notify).

Hook points: service.run_until_signalled calls ready() once the service's listeners are up and
stopping() on the way out; the node daemon's sampling pings watchdog() each tick (a stuck sampler
then gets greend restarted), the controller's main loop does (it has no sampling)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)

_lock = threading.Lock()
_last_ping = 0.0


def notify(state: str) -> bool:
    """Send one notification ("READY=1", "WATCHDOG=1", ...); True if it was delivered."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.debug("sd_notify %r to %s failed: %s", state, addr, e)
        return False


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog_interval_s() -> float | None:
    """systemd's WatchdogSec for this process, or None when there is no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 or None
    except ValueError:
        return None


def watchdog() -> bool:
    """Tell systemd we are alive, at most every quarter of the watchdog interval (cheap to call on
    every tick)."""
    global _last_ping
    every = watchdog_interval_s()
    if every is None:
        return False
    now = time.monotonic()
    with _lock:
        if now - _last_ping < every / 4:
            return False
        _last_ping = now
    return notify("WATCHDOG=1")
