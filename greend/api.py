"""greend's HTTP API: /metrics, /healthz and /api/v1 (JSON), on TCP and on a unix socket.

On the unix socket the caller's identity comes from the socket itself (SO_PEERCRED), so with
`private_jobs = true` a user sees only their own jobs' details while admins see all. TCP callers
have no identity: with private_jobs they get /metrics and /healthz only.
"""

from __future__ import annotations

import grp
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
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from . import config as config_mod
from . import report
from .ledger import Ledger, LedgerError

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_LIMIT = 1000


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Caller:
    def __init__(self, uid: int | None, admins: list[str]):
        self.uid = uid
        self.user = None
        self.admin = False
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


class Api:
    """Routes requests to the daemon's state and its ledger (read through per-thread connections)."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.local = threading.local()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(daemon.exporter)
        self.registry.register(ProcessCollector(namespace="greend", registry=None))
        self.extra_routes = {}  # (method, prefix) -> handler, for the controller

    def ledger(self) -> Ledger:
        led = getattr(self.local, "ledger", None)
        if led is None:
            led = Ledger(self.daemon.ledger_path, readonly=True)
            self.local.ledger = led
        return led

    def handle(self, method: str, path: str, query: dict, body: bytes, caller: Caller,
               headers) -> tuple[int, str, bytes]:
        for (m, prefix), fn in self.extra_routes.items():
            if m == method and path.startswith(prefix):
                return fn(path, query, body, caller, headers)
        if method != "GET":
            raise ApiError(405, f"{method} not allowed on {path}")
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return self._json(self.daemon.health())
        if path.startswith("/api/v1/"):
            cfg = self.daemon.cfg
            if cfg.daemon.private_jobs and caller.uid is None and path != "/api/v1/clusters":
                raise ApiError(403, "private_jobs is on: job data is served on the unix socket "
                                    f"({self.daemon.socket_path}), where greend knows who asks")
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
        if self.daemon.cfg.daemon.private_jobs and not caller.admin:
            return caller.user or "\0nobody"
        return None

    def jobs(self, q: dict, caller: Caller) -> dict:
        limit = _int(q, "limit", 100, 1, MAX_LIMIT)
        offset = _int(q, "offset", 0, 0)
        state = _str(q, "state")
        if state not in (None, "running", "ended"):
            raise ApiError(400, "query parameter 'state': expected running or ended")
        user = _str(q, "user")
        only = self._restrict(caller)
        if only is not None:
            if user not in (None, only):
                raise ApiError(403, f"private_jobs is on: you may only list your own jobs ({only})")
            user = only
        rows = self.ledger().jobs(
            user=user, account=_str(q, "account"), cluster=_str(q, "cluster"), state=state,
            kind=_str(q, "kind"), since=_float(q, "since"), until=_float(q, "until"),
            limit=limit + 1, offset=offset)
        more = len(rows) > limit
        return {"jobs": [r.to_dict() for r in rows[:limit]],
                "next_offset": offset + limit if more else None}

    def job(self, cluster: str, job_id: str, caller: Caller) -> dict:
        led = self.ledger()
        rows = led.get_job(cluster, job_id)
        only = self._restrict(caller)
        if only is not None:
            rows = [r for r in rows if r.user == only]
        if not rows:
            raise ApiError(404, f"no job {cluster}/{job_id}")
        records = []
        for r in rows:
            d = report.footprint_dict(r, led.factor_sets_of(r.pk))
            d["series"] = [
                {k: s[k] for k in ("t_start", "t_end", "cpu_uj", "dram_uj", "gpu_uj", "memory_uj",
                                   "cpu_time_ns", "carbon_g", "water_site_l", "water_offsite_l")}
                for s in led.series(r.pk)
            ]
            records.append(d)
        return {"records": records}

    def clusters(self) -> dict:
        cfg = self.daemon.cfg
        now = time.time()
        out = {}
        for name, c in cfg.clusters.items():
            try:
                f = config_mod.cluster_factors(cfg, name).at(now).to_dict()
            except Exception as e:  # report, don't fail the whole listing
                f = {"error": str(e)}
            out[name] = {"tier": c.tier, "hds": c.hds, "open": c.open, "country": c.country,
                         "factors": f}
        return {"clusters": out, "this_cluster": cfg.cluster, "node": self.daemon.monitor.node}

    def summary(self, q: dict, caller: Caller) -> dict:
        by = _str(q, "by") or "account"
        if by not in ("account", "user", "cluster"):
            raise ApiError(400, "query parameter 'by': expected account, user or cluster")
        since = _float(q, "since") or 0.0
        until = _float(q, "until") or time.time() + 1
        only = self._restrict(caller)
        where = "last_seen >= ? AND first_seen <= ?"
        args: list = [since, until]
        if only is not None:
            where += " AND user = ?"
            args.append(only)
        db = self.ledger().db
        rows = db.execute(
            f"SELECT {by} AS key, COUNT(*) AS jobs, SUM(cpu_uj + dram_uj + gpu_uj + memory_uj) AS uj, "
            f"SUM(carbon_g) AS carbon_g, SUM(water_site_l + water_offsite_l) AS water_l "
            f"FROM jobs WHERE {where} GROUP BY {by} ORDER BY uj DESC LIMIT 100", args).fetchall()
        node = db.execute(
            "SELECT COALESCE(SUM(energy_uj), 0), COALESCE(SUM(unattributed_uj), 0) FROM node_series "
            "WHERE t_end >= ? AND t_start <= ?", (since, until)).fetchone()
        return {
            "by": by, "since": since, "until": until,
            "rows": [{"key": r["key"], "jobs": r["jobs"], "it_energy_j": (r["uj"] or 0) / 1e6,
                      "carbon_g": r["carbon_g"] or 0.0, "water_l": r["water_l"] or 0.0}
                     for r in rows],
            "node_energy_j": node[0] / 1e6, "unattributed_j": node[1] / 1e6,
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
        if self.request.family == socket.AF_UNIX:
            creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
        return Caller(uid, self.api.daemon.cfg.daemon.admins)

    def _serve(self, method: str) -> None:
        try:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query, keep_blank_values=False)
            body = b""
            length = self.headers.get("Content-Length")
            if length:
                if not length.isdigit():
                    raise ApiError(400, "bad Content-Length")
                if int(length) > MAX_BODY:
                    raise ApiError(413, f"request body over {MAX_BODY} bytes")
                body = self.rfile.read(int(length))
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
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def do_GET(self):
        self._serve("GET")

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


def start_servers(daemon, listen: tuple[str, int], socket_path: Path | None) -> list:
    from .daemon import DaemonError

    api = Api(daemon)
    daemon.api = api
    handler = type("BoundHandler", (Handler,), {"api": api})
    servers = []
    host, port = listen
    try:
        tcp = TcpHTTPServer((host, port), handler)
    except OSError as e:
        hint = " (another greend running? choose another with --listen)" if e.errno == 98 else ""
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
                    raise DaemonError(f"{socket_path} is in use by another greend")
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
