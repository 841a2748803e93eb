"""greend's HTTP layer, shared by the node daemon and the site controller: the server (TCP, with
TLS when configured, and a unix socket whose callers are known by SO_PEERCRED), caller identity,
the bearer-token check, --listen parsing, the one rule for API socket paths, and the one unix-socket
client with its connect retry. It receives the API object (greend.api.Api, or anything with its
`handle`) instead of building it, so it imports nothing of the daemon or the controller.

The server is an asyncio loop reading requests with the h11 protocol library: an idle or slow
client costs a coroutine, not a thread. Each request must arrive whole within READ_TIMEOUT_S,
kept-alive connections close after IDLE_TIMEOUT_S, at most MAX_CONNECTIONS are open, and complete
requests are handled by a bounded pool of WORKERS threads (the handlers do blocking SQLite).
docs/security.md says what each limit defends against.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import grp
import hmac
import ipaddress
import json
import logging
import math
import os
import pwd
import re
import socket
import ssl
import stat
import struct
import threading
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h11

from .errors import ApiError, DaemonError, LedgerError, SiteError
from .httpclient import RUN_DIR

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_ANONYMOUS_BODY = 64 << 10  # a request without the site token sends no more than this
MAX_TARGET = 8192
MAX_HEADER_BYTES = 16384
LINGER_S = 2.0  # after an early refusal, how long the unread rest of a request is read and dropped
LINGER_BYTES = 1 << 20  # ... and how much of it at most

__all__ = ["ApiError", "Caller", "Limits", "Server", "bearer_ok", "default_socket", "dumps",
           "parse_json", "parse_listen", "serve"]


# -- listen addresses and socket paths ------------------------------------------------------------
def parse_listen(value: str, key: str = "--listen") -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) -> (host, port); DaemonError naming `key` otherwise."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 <= int(port) <= 65535:
        raise DaemonError(f"{key} {value!r}: expected HOST:PORT, e.g. 127.0.0.1:9471")
    host = host.strip("[]") or "127.0.0.1"
    if any(c.isspace() for c in host) or "/" in host:
        raise DaemonError(f"{key} {value!r}: {host!r} is not a host name or address")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_socket(setting: Path | str | None, state_dir: Path, run_name: str = "api.sock") -> Path | None:
    """The one rule for where an API unix socket lives: the configured path ('' or '.': none),
    else /run/greend/<run_name> for root, else <state_dir>/api.sock. The node daemon uses
    (daemon.socket, its state dir, 'api.sock'); the controller (controller.socket, its state dir,
    'controller.sock')."""
    if setting is not None:
        return None if str(setting) in ("", ".") else Path(setting)
    if os.geteuid() == 0:
        return RUN_DIR / run_name
    return Path(state_dir) / "api.sock"


# -- identity ---------------------------------------------------------------------------------------
class Caller:
    """Who asks: a uid (unix socket, SO_PEERCRED) or nobody known (TCP); admin by daemon.admins,
    by being root, or by presenting the site token."""

    def __init__(self, uid: int | None, admins: list[str], token_admin: bool = False):
        self.uid = uid
        self.user = None
        self.admin = token_admin
        if uid is None:
            return
        try:
            pw = pwd.getpwuid(uid)
            self.user = pw.pw_name
        except KeyError:
            self.user = str(uid)
            pw = None
        for a in admins:
            if a.startswith("@"):
                try:
                    g = grp.getgrnam(a[1:])
                except KeyError:
                    continue
                if self.user in g.gr_mem or (pw and pw.pw_gid == g.gr_gid):
                    self.admin = True
            elif a == self.user:
                self.admin = True
        if uid == 0:
            self.admin = True


def bearer_ok(headers, token: bytes | None) -> bool:
    """True if the request carries `Authorization: Bearer <token>` with the site token."""
    if not token:
        return False
    auth = headers.get("Authorization") or ""
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "replace"), token)


class Headers:
    """A request's headers, looked up without regard to case (as http.client's message does)."""

    def __init__(self, items: list[tuple[bytes, bytes]]):
        self._d: dict[str, str] = {}
        for k, v in items:
            self._d[k.decode("latin-1").lower()] = v.decode("latin-1")

    def get(self, name: str, default=None):
        return self._d.get(name.lower(), default)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._d


# -- strict JSON ------------------------------------------------------------------------------------
def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (RFC 8259 has no NaN or Infinity)")


def parse_json(body: bytes | str, what: str = "body"):
    """Strict JSON (RFC 8259) in: no NaN/Infinity, no lone surrogates, bounded nesting; ApiError
    400 naming `what` otherwise."""
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"{what}: JSON nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ApiError(400, f"{what}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise ApiError(400, f"{what}: not JSON: {e}") from None
    return obj


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj) -> bytes:
    """Strict JSON out: a non-finite number (which JSON cannot carry) is written as null."""
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False)
    return (text + "\n").encode()


def _error_body(message: str, extra: dict | None = None) -> bytes:
    return dumps({"error": message, **(extra or {})})


# -- one request ------------------------------------------------------------------------------------
GZIP_MIN_BYTES = 1024  # smaller answers gain nothing from compression


def accepts_gzip(headers: Headers) -> bool:
    """Whether Accept-Encoding names gzip (or *) without q=0."""
    for item in (headers.get("Accept-Encoding") or "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.replace(" ", "").lower()
            return not (q.startswith("q=0") and q.strip("q=0.") == "")
    return False


def compressed(reply: tuple, headers: Headers) -> tuple:
    """The reply gzipped when the client accepts it and it is worth it (a /metrics page of 1,000
    jobs: 1.3 MiB -> about 50 KiB), with Content-Encoding; else as it is. Runs in the worker
    thread, not on the event loop."""
    status, ctype, payload = reply[:3]
    if len(payload) < GZIP_MIN_BYTES or not accepts_gzip(headers):
        return reply
    import gzip

    return status, ctype, gzip.compress(payload, compresslevel=5), [
        ("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")]


def respond(api, method: str, target: str, headers: Headers, body: bytes,
            uid: int | None) -> tuple:
    """Run one complete request through api.handle: (status, content type, payload[, extra
    headers]). Never raises: an unexpected error is logged with its traceback and answered 500."""
    try:
        if len(target) > MAX_TARGET:
            raise ApiError(414, f"request target over {MAX_TARGET} bytes")
        parts = urlsplit(target)
        try:
            query = parse_qs(parts.query, keep_blank_values=False, strict_parsing=False,
                             errors="strict", max_num_fields=100)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"bad query string: {e}") from None
        host = api.host
        caller = Caller(uid, host.cfg.daemon.admins, token_admin=bearer_ok(headers, host.token))
        return compressed(api.handle(method, parts.path, query, body, caller, headers), headers)
    except ApiError as e:
        return e.status, "application/json", _error_body(str(e))
    except LedgerError as e:
        return 503, "application/json", _error_body(f"ledger unavailable: {e}")
    except Exception:
        log.exception("API error on %s %s", method, target[:200])
        return 500, "application/json", _error_body("internal error (see greend log)")


# -- the server -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    read_timeout_s: float = 10.0  # a request (head and body) must arrive whole within this
    idle_timeout_s: float = 30.0  # a kept-alive connection with no request is closed after this
    write_timeout_s: float = 30.0  # a client that does not read its answer is dropped after this
    max_connections: int = 4096  # open at once, TCP and unix together; more are refused (503)
    max_per_uid: int = 256  # open at once on the unix socket by one uid (root: not limited)
    workers: int = 8  # threads handling complete requests
    backlog: int = 128  # the listen queue: connects beyond it fail (clients retry)


class Server:
    """The daemon's or the controller's listeners, served by one asyncio loop in a thread."""

    def __init__(self, api, listen: tuple[str, int], socket_path: Path | None, *,
                 what: str = "greend", tls: ssl.SSLContext | None = None,
                 limits: Limits = Limits()):
        self.api = api
        self.what = what
        self.tls = tls
        self.limits = limits
        self.socket_path = socket_path
        self.pool = concurrent.futures.ThreadPoolExecutor(limits.workers, thread_name_prefix="http")
        self.connections = 0
        self.per_uid: dict[int, int] = {}
        self.max_connections = _fd_budget(limits.max_connections)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task] = set()
        self.tcp = self._bind_tcp(listen)
        self.unix = None
        if socket_path:
            try:
                self.unix = self._bind_unix(socket_path)
            except BaseException:
                self.tcp.close()
                raise
        self.address = self.tcp.getsockname()[:2]

    @property
    def port(self) -> int:
        return self.address[1]

    def urls(self) -> list[str]:
        host = self.address[0]
        host = f"[{host}]" if ":" in host else host
        out = [f"{'https' if self.tls else 'http'}://{host}:{self.port}"]
        if self.unix is not None:
            out.append(f"unix:{self.socket_path}")
        return out

    def _bind_tcp(self, listen: tuple[str, int]) -> socket.socket:
        host, port = listen
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return socket.create_server((host, port), family=family, backlog=self.limits.backlog,
                                        reuse_port=False)
        except OSError as e:
            hint = (f" (another {self.what} running? choose another address with --listen)"
                    if e.errno == errno.EADDRINUSE else "")
            raise DaemonError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None

    def _bind_unix(self, path: Path) -> socket.socket:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise DaemonError(f"{path} exists and is not a socket: not touching it")
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(path))
                    raise DaemonError(f"{path} is in use by another {self.what}")
                except (ConnectionRefusedError, FileNotFoundError):
                    path.unlink()  # stale socket of a crashed greend
                finally:
                    probe.close()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(path))
                os.chmod(path, 0o666)  # everyone may ask; identity comes from SO_PEERCRED
                sock.listen(self.limits.backlog)
            except BaseException:
                sock.close()
                raise
            return sock
        except OSError as e:
            raise DaemonError(f"cannot create API socket {path}: {e.strerror or e}") from None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Server:
        self.thread = threading.Thread(target=self._thread, name="http-loop", daemon=True)
        self.thread.start()
        self._ready.wait(10)
        return self

    def _thread(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        servers = [await asyncio.start_server(
            lambda r, w: self._accept(r, w, False), sock=self.tcp, ssl=self.tls,
            ssl_handshake_timeout=self.limits.read_timeout_s if self.tls else None,
            limit=MAX_HEADER_BYTES * 2, backlog=self.limits.backlog)]
        if self.unix is not None:
            servers.append(await asyncio.start_unix_server(
                lambda r, w: self._accept(r, w, True), sock=self.unix, limit=MAX_HEADER_BYTES * 2,
                backlog=self.limits.backlog))
        self._ready.set()
        await self._stop.wait()
        for s in servers:
            s.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for s in servers:
            await s.wait_closed()

    def close(self) -> None:
        """Stop accepting, drop open connections, wait for the handlers in progress; idempotent."""
        if self.loop is not None and self._stop is not None and self.thread is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(15)
        self.thread = None
        self.pool.shutdown(wait=True)
        for s in (self.tcp, self.unix):
            if s is not None:
                s.close()
        if self.unix is not None and self.socket_path:
            try:
                if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                    self.socket_path.unlink()
            except OSError:
                pass
            self.unix = None

    # -- connections ----------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      unix: bool) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        peer = None
        try:
            uid = None
            if unix:
                sock = writer.get_extra_info("socket")
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _pid, uid, _gid = struct.unpack("3i", creds)
                peer = uid
                self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
            if self.connections > self.max_connections:
                await self._refuse(writer, f"too many connections (over {self.max_connections})")
                return
            if uid and self.per_uid[uid] > self.limits.max_per_uid:
                # One local user cannot take every connection from the others.
                await self._refuse(writer, f"too many connections from uid {uid} "
                                           f"(over {self.limits.max_per_uid})")
                return
            await self._serve(reader, writer, uid)
        except (ConnectionError, asyncio.CancelledError, ssl.SSLError, OSError, TimeoutError):
            pass
        except Exception:
            log.exception("http: connection handler failed")
        finally:
            self.connections -= 1
            if peer is not None:
                n = self.per_uid.get(peer, 1) - 1
                if n > 0:
                    self.per_uid[peer] = n
                else:
                    self.per_uid.pop(peer, None)
            self._tasks.discard(task)
            writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter, why: str) -> None:
        body = _error_body(f"{why}: retry later")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                     b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await asyncio.wait_for(writer.drain(), self.limits.write_timeout_s)

    async def _serve(self, reader, writer, uid: int | None) -> None:
        lim = self.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        loop = asyncio.get_running_loop()
        while True:
            deadline = None  # set at the first byte of a request
            idle_deadline = loop.time() + lim.idle_timeout_s
            request = None
            max_body = 0
            body = bytearray()
            status = 0
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        if conn.they_are_waiting_for_100_continue:  # curl, for bodies over 1 KiB
                            writer.write(conn.send(h11.InformationalResponse(status_code=100,
                                                                             headers=[])))
                        if deadline is None and conn.their_state is h11.IDLE \
                                and not conn.trailing_data[0]:
                            wait = idle_deadline - loop.time()
                            idle = True
                        else:
                            if deadline is None:
                                deadline = loop.time() + lim.read_timeout_s
                            wait = deadline - loop.time()
                            idle = False
                        try:
                            data = await asyncio.wait_for(reader.read(65536), max(wait, 0))
                        except TimeoutError:
                            if idle:
                                return  # an idle kept-alive connection: close it quietly
                            raise ApiError(408, f"request not received whole within "
                                                f"{lim.read_timeout_s:g} s") from None
                        if deadline is None:
                            deadline = loop.time() + lim.read_timeout_s
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    if isinstance(event, h11.Request):
                        request = event
                        max_body = self._check_head(event)
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > max_body:
                            raise ApiError(413, f"request body over {max_body} bytes")
                    elif isinstance(event, h11.EndOfMessage):
                        break
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint or 400
                reply = (status, "application/json",
                         _error_body(f"{status}: malformed request: {e}"))
            except ApiError as e:
                status = e.status
                reply = (status, "application/json", _error_body(str(e)))
            if status:  # refused before the handler: answer and close (the rest is unread)
                if status == 413 and request is not None:
                    count = getattr(self.api.host, "count_reject", None)
                    path = urlsplit(request.target.decode("latin-1")).path
                    if count and (request.method.decode(), path) in self.api.host.routes:
                        count("too_large")
                await self._reply(conn, writer, request, reply, close=True)
                await self._linger(reader, writer)
                return
            method = request.method.decode("ascii", "replace")
            target = request.target.decode("latin-1")
            reply = await loop.run_in_executor(
                self.pool, respond, self.api, method, target, Headers(request.headers),
                bytes(body), uid)
            await self._reply(conn, writer, request, reply, close=False)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _linger(self, reader, writer) -> None:
        """After answering a request refused before its body was read (413, 400, ...): stop
        writing, then read and drop what the client is still sending, for LINGER_S and
        LINGER_BYTES at most, before closing. Closing with unread data makes the client's own
        writes fail before it reads the answer (curl: "Send failure: Broken pipe" instead of the
        413); web servers linger the same way (nginx's lingering_close)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + LINGER_S
        dropped = 0
        try:
            if writer.can_write_eof():
                writer.write_eof()
            while dropped < LINGER_BYTES and (left := end - loop.time()) > 0:
                data = await asyncio.wait_for(reader.read(65536), left)
                if not data:
                    return
                dropped += len(data)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass

    def _check_head(self, req: h11.Request) -> int:
        """Refuse what can be refused from the head alone; the largest body this request may
        send: host.max_body with the site token, else at most MAX_ANONYMOUS_BODY (so that
        anonymous clients cannot make the controller buffer max_body_bytes per connection)."""
        if len(req.target) > MAX_TARGET:
            raise ApiError(414, f"request target over {MAX_TARGET} bytes")
        host = self.api.host
        max_body = host.max_body
        if max_body > MAX_ANONYMOUS_BODY and not bearer_ok(Headers(req.headers), host.token):
            max_body = MAX_ANONYMOUS_BODY
        for k, v in req.headers:
            if k == b"transfer-encoding":
                raise ApiError(411, "chunked requests are not accepted: send a Content-Length")
            if k == b"content-length" and int(v) > max_body:
                raise ApiError(413, f"request body over {max_body} bytes"
                               + ("" if max_body == host.max_body else " without the site token"))
        return max_body

    async def _reply(self, conn: h11.Connection, writer, request, reply, close: bool) -> None:
        status, ctype, payload, *extra = reply
        headers = [("Content-Type", ctype), ("Content-Length", str(len(payload))),
                   ("Server", "greend"), *(extra[0] if extra else [])]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="greend"'))
        if status == 429:
            headers.append(("Retry-After", "60"))
        if close:
            headers.append(("Connection", "close"))
        head = request is not None and request.method == b"HEAD"
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            out = conn.send(h11.Response(status_code=status, headers=headers,
                                         reason=HTTPStatus(status).phrase.encode()))
            out += conn.send(h11.Data(data=b"" if head else payload)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            # h11 cannot frame an answer to what it could not parse: write it by hand.
            out = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {ctype}\r\n"
                   f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
            close = True
        writer.write(out)
        await asyncio.wait_for(writer.drain(), self.limits.write_timeout_s)


def _fd_budget(wanted: int) -> int:
    """How many connections this process can hold: raise the soft limit on open files to the hard
    one (a shell's default 1024 would cap a daemon that runs as root) and keep 256 for the rest."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted + 256)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (ValueError, OSError):
        pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - 256))


def serve(api, listen: tuple[str, int], socket_path: Path | None, *, what: str = "greend",
          tls: ssl.SSLContext | None = None, limits: Limits = Limits()) -> Server:
    """Bind the listeners (DaemonError if one cannot be had) and serve `api` from a thread."""
    return Server(api, listen, socket_path, what=what, tls=tls, limits=limits).start()


def server_tls(cert_file: Path, key_file: Path, key: str = "controller") -> ssl.SSLContext:
    """The TLS context of a listener from a PEM certificate (chain) and its key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as e:
        raise SiteError(f"{key}.tls_cert_file/tls_key_file: {e.filename}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise SiteError(f"{key}.tls_cert_file {cert_file} / tls_key_file {key_file}: cannot load "
                        f"the certificate and key: {e}") from None
    return ctx


def client_tls(ca_file: Path | None, key: str = "controller.ca_file") -> ssl.SSLContext:
    """The context that verifies a controller's certificate: against ca_file, else the system's
    trusted CAs."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except FileNotFoundError:
        raise SiteError(f"{key} {ca_file}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise SiteError(f"{key} {ca_file}: not a PEM certificate file: {e}") from None


