"""greend's API: /metrics, /healthz and /api/v1 (JSON), served by greend.http on TCP and on a
unix socket.

The read API works over any ledger: a node daemon's or the site controller's (`ApiHost`). On the
unix socket the caller's identity comes from the socket itself (SO_PEERCRED), so with
`private_jobs = true` a user sees only their own jobs' details while admins see all. TCP callers
have no identity (unless they present the site token, which makes them admins): with private_jobs
they get /metrics and /healthz only. docs/api.md describes every endpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from . import budgets, queries, report
from . import config as config_mod
from .errors import ApiError, LedgerError
from .http import Caller, dumps
from .ledger import Ledger

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
MAX_OFFSET = 1 << 53  # SQLite takes 64-bit integers; no listing is this long
_INT = re.compile(r"-?[0-9]{1,20}")


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
    # Optional: server_reads, a context of a greend.sitedb.ServerReader (the controller on a
    # database server): the reads go there instead of ledger_path (Api.reads).

    def health(self) -> dict: ...

    def metric_collectors(self) -> Iterable: ...


def _int(q: dict, name: str, default: int | None = None, lo: int = 0, hi: int = MAX_OFFSET):
    """An integer query parameter in lo..hi (ASCII digits only), or ApiError 400 naming it."""
    if name not in q:
        return default
    raw = q[name][-1].strip()
    if not _INT.fullmatch(raw):
        raise ApiError(400, f"query parameter {name!r}: expected an integer")
    v = int(raw)
    if not lo <= v <= hi:
        raise ApiError(400, f"query parameter {name!r}: expected {lo}..{hi}")
    return v


def _float(q: dict, name: str) -> float | None:
    """A Unix time query parameter (finite: JSON has no NaN or Infinity), or ApiError 400."""
    if name not in q:
        return None
    try:
        v = float(q[name][-1])
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or abs(v) > 1e11:
        raise ApiError(400, f"query parameter {name!r}: expected a Unix time in seconds")
    return v


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
    """Routes requests to the host's state and its ledger (read through per-thread connections,
    all closed by close())."""

    def __init__(self, host: ApiHost):
        self.host = host
        self.local = threading.local()
        self._open: list[Ledger] = []
        self._open_lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_HostMetrics(host))
        self.registry.register(ProcessCollector(namespace="", registry=None))

    def ledger(self) -> Ledger:
        led = getattr(self.local, "ledger", None)
        if led is None:
            led = Ledger(self.host.ledger_path, readonly=True)
            self.local.ledger = led
            with self._open_lock:
                self._open.append(led)
        return led

    @contextlib.contextmanager
    def reads(self):
        """The connection greend.queries reads through: the host's site database server when it
        has one (the controller's `server_reads`: a context of a greend.sitedb.ServerReader),
        else this thread's read-only connection to the host's SQLite ledger."""
        server = getattr(self.host, "server_reads", None)
        if server is not None:
            with server() as db:
                yield db
        else:
            yield self.ledger().db

    def close(self) -> None:
        """Close every read connection (at shutdown, after the server has stopped): SQLite
        removes the -wal and -shm files only when the last connection closes."""
        with self._open_lock:
            leds, self._open = self._open, []
        for led in leds:
            try:
                led.close()
            except Exception:
                pass

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
            if "application/openmetrics-text" in (headers.get("Accept") or ""):
                # Asked for by Prometheus (scrape_protocols) and OpenMetrics clients; the classic
                # text format stays the default, rendered by our fast writer.
                from prometheus_client.openmetrics import exposition as om

                return 200, om.CONTENT_TYPE_LATEST, om.generate_latest(self.registry)
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
        return status, "application/json", dumps(obj)

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
            with self.reads() as db:
                page = queries.job_page(db, jq, time.time())
        except queries.QueryError as e:
            raise ApiError(400, f"query parameter {e}") from None
        # The one job-footprint schema (docs/json.md); factors and series are in the job's record.
        return {"jobs": [report.footprint_dict(r, []) for r in page.jobs],
                "next_offset": offset + limit if offset + limit < page.total else None,
                "total": page.total, "running": page.running, "per": jq.per}

    def job(self, cluster: str, job_id: str, caller: Caller) -> dict:
        with self.reads() as db:
            detail = queries.job_detail(db, cluster, job_id, user=self._restrict(caller),
                                        all_submissions=True)
        if detail is None:
            raise ApiError(404, f"no job {cluster}/{job_id}")
        records = []
        for r, factors, series in zip(detail.nodes, detail.node_factors, detail.node_series,
                                      strict=True):
            d = report.footprint_dict(r, factors)
            d["series"] = [p.to_dict() for p in series]
            if detail.node_phases and detail.node_phases[len(records)]:
                d["phases"] = detail.node_phases[len(records)]  # greend.track's, in order
            if detail.decision is not None:  # the routing decision that submitted the job
                d["decision"] = detail.decision
            records.append(d)
        return {"records": records}

    def clusters(self) -> dict:
        cfg = self.host.cfg
        # Live load and queue: the composition root gives the host a provider (the policy
        # engine's state cache), so the core does not import the policies.
        live_load = getattr(self.host, "live_load", None)
        try:
            with self.reads() as db:
                infos = queries.clusters(cfg, time.time(), db=db, live_load=live_load)
        except LedgerError:  # no ledger yet: the clusters still come from the configuration
            infos = queries.clusters(cfg, time.time(), db=None, live_load=live_load)
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
        with self.reads() as db:
            s = queries.summary(db, by, since, until, user=only, order="energy", limit=100)
            if only is None:
                # Where each project stands in its own budget period (not the period asked for).
                budgets.add_budgets(db, s, self.host.cfg.policy.budgets)
        if only is None and "budgets unavailable" in s.note:
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
