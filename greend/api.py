"""greend's HTTP API: /metrics, /healthz and /api/v1 (JSON), on TCP and on a unix socket.

The read API works over any ledger: a node daemon's or the site controller's (`ApiHost`). On the
unix socket the caller's identity comes from the socket itself (SO_PEERCRED), so with
`private_jobs = true` a user sees only their own jobs' details while admins see all. TCP callers
have no identity (unless they present the site token, which makes them admins): with private_jobs
they get /metrics and /healthz only. docs/api.md describes every endpoint.
"""

from __future__ import annotations

import grp
import hmac
import json
import logging
import os
import pwd
import socket
import socketserver
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from . import budgets, queries, report
from . import config as config_mod
from .ledger import Ledger, LedgerError

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_LIMIT = 1000
MAX_QUERY = 8192


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# (method, path) -> handler(body, caller, headers) -> (status, content type, payload)
Route = Callable[[bytes, "Caller", object], tuple[int, str, bytes]]


class ApiHost(Protocol):
    """What the API serves: a node daemon (its monitor's ledger) or the site controller."""

    cfg: config_mod.Config  # daemon.private_jobs and daemon.admins apply; clusters are listed
    ledger_path: Path
    socket_path: Path | None
    node: str | None  # the node served, or None for the controller
    token: bytes | None  # the site token: a TCP caller presenting it is an admin
    max_body: int
    routes: dict[tuple[str, str], Route]

    def health(self) -> dict: ...

    def metric_collectors(self) -> Iterable: ...


class Caller:
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


def _int(q: dict, name: str, default: int | None = None, lo: int = 0, hi: int | None = None):
    if name not in q:
        return default
    try:
        v = int(q[name][-1])
    except ValueError:
        raise ApiError(400, f"query parameter {name!r}: expected an integer") from None
    if v < lo or (hi is not None and v > hi):
        raise ApiError(400, f"query parameter {name!r}: expected {lo}..{hi if hi else ''}")
    return v


def _float(q: dict, name: str) -> float | None:
    if name not in q:
        return None
    try:
        return float(q[name][-1])
    except ValueError:
        raise ApiError(400, f"query parameter {name!r}: expected a Unix time in seconds") from None


def _str(q: dict, name: str) -> str | None:
    return q[name][-1] if name in q else None


_TYPES = {"counter": ("_total", "counter"), "info": ("_info", "gauge"), "stateset": ("", "gauge"),
          "gaugehistogram": ("", "histogram"), "unknown": ("", "untyped")}
_NEEDS_ESCAPE = frozenset('\\"\n')


def _label_value(v: str) -> str:
    if _NEEDS_ESCAPE.isdisjoint(v):
        return v
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format (0.0.4) of a registry, as prometheus_client's generate_latest
    writes it but several times faster on thousands of per-job series: our label names are valid
    by construction, and a label set shared by a job's series is formatted once."""
    out: list[str] = []
    add = out.append
    cache: dict[tuple, str] = {}
    fmt = floatToGoString
    for metric in registry.collect():
        suffix, mtype = _TYPES.get(metric.type, ("", metric.type))
        mname = metric.name + suffix
        doc = metric.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        add(f"# HELP {mname} {doc}\n# TYPE {mname} {mtype}\n")
        text = getattr(metric, "text", None)
        if text is not None:  # a family that writes itself (exporter.JobFamily)
            add(text())
            continue
        extra: dict[str, list[str]] = {}
        for smp in metric.samples:
            labels = smp.labels
            if labels:
                key = tuple(labels.items())
                ls = cache.get(key)
                if ls is None:
                    ls = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
                    cache[key] = ls
                line = f"{smp.name}{{{ls}}} {fmt(smp.value)}"
            else:
                line = f"{smp.name} {fmt(smp.value)}"
            if smp.timestamp is not None:
                line += f" {int(float(smp.timestamp) * 1000):d}"
            sfx = smp.name[len(metric.name):]
            if sfx in ("_created", "_gsum", "_gcount"):
                extra.setdefault(sfx, []).append(line + "\n")
            else:
                add(line + "\n")
        for sfx, lines in sorted(extra.items()):
            add(f"# HELP {metric.name}{sfx} {doc}\n# TYPE {metric.name}{sfx} gauge\n")
            out.extend(lines)
    return "".join(out).encode()


class _HostMetrics:
    """Yields the host's collectors at each scrape, so that collectors added later (site mode
    switched on by a reload) appear without rebuilding the registry."""

    def __init__(self, host: ApiHost):
        self.host = host

    def describe(self):
        return []

    def collect(self):
        for c in self.host.metric_collectors():
            yield from c.collect()


class Api:
    """Routes requests to the host's state and its ledger (read through per-thread connections)."""

    def __init__(self, host: ApiHost):
        self.host = host
        self.local = threading.local()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_HostMetrics(host))
        self.registry.register(ProcessCollector(namespace="", registry=None))

    def ledger(self) -> Ledger:
        led = getattr(self.local, "ledger", None)
        if led is None:
            led = Ledger(self.host.ledger_path, readonly=True)
            self.local.ledger = led
        return led

    def handle(self, method: str, path: str, query: dict, body: bytes, caller: Caller,
               headers) -> tuple[int, str, bytes]:
        route = self.host.routes.get((method, path))
        if route is not None:
            return route(body, caller, headers)
        allowed = [m for m, p in self.host.routes if p == path]
        if allowed or method not in ("GET", "HEAD"):
            raise ApiError(405, f"{method} not allowed on {path} (allowed: "
                                f"{', '.join(allowed or ['GET'])})")
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, render_metrics(self.registry)
        if path == "/healthz":
            return self._json(self.host.health())
        if path.startswith("/api/v1/"):
            cfg = self.host.cfg
            if cfg.daemon.private_jobs and caller.uid is None and not caller.admin \
                    and path != "/api/v1/clusters":
                where = (f" ({self.host.socket_path})" if self.host.socket_path else "")
                raise ApiError(403, "private_jobs is on: job data is served on the unix socket"
                                    f"{where}, where greend knows who asks")
            if path == "/api/v1/jobs":
                return self._json(self.jobs(query, caller))
            if path.startswith("/api/v1/jobs/"):
                parts = [unquote(p) for p in path[len("/api/v1/jobs/"):].split("/")]
                if len(parts) != 2 or not all(parts):
                    raise ApiError(404, "expected /api/v1/jobs/{cluster}/{job_id}")
                return self._json(self.job(parts[0], parts[1], caller))
            if path == "/api/v1/clusters":
                return self._json(self.clusters())
            if path == "/api/v1/summary":
                return self._json(self.summary(query, caller))
        raise ApiError(404, f"no such endpoint: {path} (see docs/api.md)")

    @staticmethod
    def _json(obj, status: int = 200) -> tuple[int, str, bytes]:
        return status, "application/json", (json.dumps(obj, separators=(",", ":")) + "\n").encode()

    def _restrict(self, caller: Caller) -> str | None:
        """The only user whose jobs this caller may see, or None for all."""
        if self.host.cfg.daemon.private_jobs and not caller.admin:
            return caller.user or "\0nobody"
        return None

    def jobs(self, q: dict, caller: Caller) -> dict:
        limit = _int(q, "limit", 100, 1, MAX_LIMIT)
        offset = _int(q, "offset", 0, 0)
        state = _str(q, "state")
        if state not in (None, "running", "ended"):
            raise ApiError(400, "query parameter 'state': expected running or ended")
        order = _str(q, "order") or "desc"
        if order not in ("asc", "desc"):
            raise ApiError(400, "query parameter 'order': expected asc or desc")
        user = _str(q, "user")
        only = self._restrict(caller)
        if only is not None:
            if user not in (None, only):
                raise ApiError(403, f"private_jobs is on: you may only list your own jobs ({only})")
            user = only
        jq = queries.JobQuery(
            user=user, account=_str(q, "account"), cluster=_str(q, "cluster"), state=state,
            kind=_str(q, "kind"), outcome=_str(q, "outcome"), since=_float(q, "since"),
            until=_float(q, "until"), search=_str(q, "q") or "", sort=_str(q, "sort") or "recent",
            descending=order == "desc", limit=limit, offset=offset, per=_str(q, "per") or "record")
        try:
            page = queries.job_page(self.ledger().db, jq, time.time())
        except queries.QueryError as e:
            raise ApiError(400, f"query parameter {e}") from None
        return {"jobs": [r.to_dict() for r in page.jobs],
                "next_offset": offset + limit if offset + limit < page.total else None,
                "total": page.total, "running": page.running, "per": jq.per}

    def job(self, cluster: str, job_id: str, caller: Caller) -> dict:
        detail = queries.job_detail(self.ledger().db, cluster, job_id, user=self._restrict(caller),
                                    all_submissions=True)
        if detail is None:
            raise ApiError(404, f"no job {cluster}/{job_id}")
        records = []
        for r, factors, series in zip(detail.nodes, detail.node_factors, detail.node_series,
                                      strict=True):
            d = report.footprint_dict(r, factors)
            d["series"] = [p.to_dict() for p in series]
            if detail.decision is not None:  # the routing decision that submitted the job
                d["decision"] = detail.decision
            records.append(d)
        return {"records": records}

    def clusters(self) -> dict:
        cfg = self.host.cfg
        try:
            db = self.ledger().db
        except LedgerError:  # no ledger yet: the clusters still come from the configuration
            db = None
        # Live load and queue: the composition root gives the host a provider (the policy
        # engine's state cache), so the core does not import the policies.
        infos = queries.clusters(cfg, time.time(), db=db, live_load=getattr(self.host, "live_load", None))
        out = {}
        for c in infos:
            d = {"tier": c.tier, "hds": c.hds, "open": c.open, "country": c.country,
                 "factors": c.factors if c.factors is not None or not c.factors_error
                 else {"error": c.factors_error},
                 "running": c.running}
            if c.live:
                d["live"] = c.live
                if c.live.get("ok"):
                    d.update(load=c.load, queue=c.queue)
            if c.note:
                d["note"] = c.note
            out[c.name] = d
        return {"clusters": out, "this_cluster": cfg.cluster, "node": self.host.node}

    def summary(self, q: dict, caller: Caller) -> dict:
        by = _str(q, "by") or "account"
        if by not in queries.SUMMARY_BY:
            raise ApiError(400, "query parameter 'by': expected account, user, cluster or node")
        since = _float(q, "since")
        since = 0.0 if since is None else since
        until = _float(q, "until")
        until = time.time() + 1 if until is None else until
        only = self._restrict(caller)
        db = self.ledger().db
        s = queries.summary(db, by, since, until, user=only, order="energy", limit=100)
        if only is None:
            # Where each project stands in its own budget period (not the period asked for).
            queries.add_budgets(db, s, self.host.cfg.policy.budgets)
            if "budgets unavailable" in s.note:
                log.warning("%s", s.note)
        rows = []
        for r in s.rows:
            row = {"key": r.key, "jobs": r.jobs, "it_energy_j": r.it_energy_j, "carbon_g": r.carbon_g,
                   "water_l": r.water_l}
            if r.budget is not None:
                row["budget"] = budgets.to_json(r.budget)
            rows.append(row)
        return {
            "by": by, "since": since, "until": until, "rows": rows,
            "node_energy_j": s.node_energy_j or 0.0, "unattributed_j": s.unattributed_j or 0.0,
            "note": s.note,
        }


class Handler(BaseHTTPRequestHandler):
    server_version = "greend"
    protocol_version = "HTTP/1.1"
    api: Api

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, fmt, *args):
        log.debug("http %s: " + fmt, self.address_string(), *args)

    def _caller(self) -> Caller:
        uid = None
        host = self.api.host
        if self.request.family == socket.AF_UNIX:
            creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
        return Caller(uid, host.cfg.daemon.admins, token_admin=bearer_ok(self.headers, host.token))

    def _serve(self, method: str) -> None:
        try:
            if len(self.path) > MAX_QUERY:
                raise ApiError(414, f"request target over {MAX_QUERY} bytes")
            parts = urlsplit(self.path)
            try:
                query = parse_qs(parts.query, keep_blank_values=False, strict_parsing=False,
                                 errors="strict", max_num_fields=100)
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, f"bad query string: {e}") from None
            body = b""
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise ApiError(411, "chunked requests are not accepted: send a Content-Length")
            length = self.headers.get("Content-Length")
            if length:
                length = length.strip()
                if not length.isdigit():
                    self.close_connection = True
                    raise ApiError(400, "bad Content-Length")
                if int(length) > self.api.host.max_body:
                    self.close_connection = True  # the body is not read: the connection is unusable
                    count = getattr(self.api.host, "count_reject", None)
                    if count and (method, parts.path) in self.api.host.routes:
                        count("too_large")
                    raise ApiError(413, f"request body over {self.api.host.max_body} bytes")
                body = self.rfile.read(int(length))
                if len(body) != int(length):
                    self.close_connection = True
                    raise ApiError(400, "request body shorter than its Content-Length")
            status, ctype, payload = self.api.handle(method, parts.path, query, body,
                                                     self._caller(), self.headers)
        except ApiError as e:
            status, ctype = e.status, "application/json"
            payload = (json.dumps({"error": str(e)}) + "\n").encode()
        except LedgerError as e:
            status, ctype = 503, "application/json"
            payload = (json.dumps({"error": f"ledger unavailable: {e}"}) + "\n").encode()
        except Exception:
            log.exception("API error on %s %s", method, self.path)
            status, ctype = 500, "application/json"
            payload = b'{"error": "internal error (see greend log)"}\n'
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="greend"')
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away: nothing to tell it

    def send_error(self, code, message=None, explain=None):
        # Malformed requests (bad request line, header too long) get a JSON error, not HTML.
        self.close_connection = True
        try:
            payload = (json.dumps({"error": f"{code}: {message or HTTPStatus(code).phrase}"})
                       + "\n").encode()
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(payload)
        except OSError:
            pass

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        req, _ = super().get_request()
        return req, ("unix", 0)


class TcpHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def bearer_ok(headers, token: bytes | None) -> bool:
    """True if the request carries `Authorization: Bearer <token>` with the site token."""
    if not token:
        return False
    auth = headers.get("Authorization") or ""
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "replace"), token)


def start_servers(host: ApiHost, listen: tuple[str, int], socket_path: Path | None,
                  what: str = "greend") -> list:
    from .daemon import DaemonError

    api = Api(host)
    host.api = api
    handler = type("BoundHandler", (Handler,), {"api": api})
    servers = []
    host, port = listen
    try:
        tcp = TcpHTTPServer((host, port), handler)
    except OSError as e:
        hint = (f" (another {what} running? choose another address with --listen)"
                if e.errno == 98 else "")
        raise DaemonError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    servers.append(tcp)
    if socket_path:
        try:
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            if socket_path.exists() or socket_path.is_symlink():
                if not stat.S_ISSOCK(socket_path.lstat().st_mode):
                    raise DaemonError(f"{socket_path} exists and is not a socket: not touching it")
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(socket_path))
                    raise DaemonError(f"{socket_path} is in use by another {what}")
                except (ConnectionRefusedError, FileNotFoundError):
                    socket_path.unlink()  # stale socket of a crashed greend
                finally:
                    probe.close()
            unix = UnixHTTPServer(str(socket_path), handler)
            os.chmod(socket_path, 0o666)  # everyone may ask; identity comes from SO_PEERCRED
            servers.append(unix)
        except OSError as e:
            tcp.server_close()
            raise DaemonError(f"cannot create API socket {socket_path}: {e.strerror}") from None
    for srv in servers:
        threading.Thread(target=srv.serve_forever, name=f"http-{type(srv).__name__}",
                         daemon=True).start()
    return servers
