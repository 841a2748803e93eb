"""greend's HTTP clients (the TUI, `greend submit`'s report, the agents' sender): http.client over
a unix socket or TCP/TLS, with one connect retry for a refused or would-block connect. Light to
import (no asyncio, no h11): the TUI loads it before its first paint."""

from __future__ import annotations

import errno
import http.client
import random
import socket
import time
from pathlib import Path

RUN_DIR = Path("/run/greend")  # where root's daemon and controller put their API sockets


def daemon_sockets(setting: Path | str | None, state_dir: Path) -> list[Path]:
    """Where a client looks for the node daemon's API socket, in order: the configured path alone
    ('' or '.': none), else the system daemon's (RUN_DIR/api.sock) then the one a daemon run by
    this user would make (<state_dir>/api.sock). The server's side of the same rule is
    greend.http.default_socket."""
    if setting is not None:
        return [] if str(setting) in ("", ".") else [Path(setting)]
    out = [RUN_DIR / "api.sock"]
    mine = Path(state_dir) / "api.sock"
    return out if mine == out[0] else [*out, mine]

_RETRY_CONNECT = (errno.EAGAIN, errno.ECONNREFUSED, errno.EINTR)


def connect_retrying(connect, timeout: float) -> None:
    """Call connect() until it succeeds, retrying a refused or would-block connect (a listen
    queue momentarily full, a daemon restarting) with jittered backoff for up to `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            connect()
            return
        except OSError as e:
            if e.errno not in _RETRY_CONNECT or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 0.5)


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket, with the connect retry."""

    def __init__(self, path: Path | str, timeout: float = 5.0):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        def once():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except BaseException:
                sock.close()
                raise
            self.sock = sock

        connect_retrying(once, self.timeout)


class RetryingHTTPConnection(http.client.HTTPConnection):
    """http.client over TCP, with the connect retry."""

    def connect(self) -> None:
        connect_retrying(super().connect, self.timeout)


class RetryingHTTPSConnection(http.client.HTTPSConnection):
    """http.client over TLS, with the connect retry."""

    def connect(self) -> None:
        connect_retrying(super().connect, self.timeout)


def unix_request(path: Path | str, method: str, target: str, body: bytes | None = None,
                 headers: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """One request on a unix socket: (status, body). OSError or http.client.HTTPException when
    there is no answer."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()
