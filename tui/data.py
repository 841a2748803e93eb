"""Where the TUI's figures come from: one interface, three sources (a ledger file read-only, the local
daemon's API over its unix socket, a site controller's API over HTTP).

The ledger source is a thin adapter over the core's read model (greend.queries), which the API
serves too: both answer the same queries the same way. Every method may raise `SourceError`, whose
message is shown to the person as it is; nothing here imports Textual, so the layer is tested and
benchmarked on its own.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from greend import budgets, queries
from greend.ledger import JobRow, Ledger, LedgerError
from greend.queries import (  # noqa: F401 - the screens import the read model's types from here
    RUNNING,
    SLURM_FAILED,
    SLURM_OK,
    SORT_KEYS,
    ClusterInfo,
    JobDetail,
    JobPage,
    JobQuery,
    LiveLoad,
    SeriesPoint,
    Summary,
    SummaryRow,
    elapsed_s,
    group_jobs,
    job_key,
    merge_rows,
    merge_series,
    outcome_of,
    slurm_state,
    water_l,
)

if TYPE_CHECKING:  # http.client (with email) is imported where an API source connects: ~7 ms of
    import http.client  # every `greend tui` start on a ledger

SOURCES = ("cpu", "gpu", "dram", "memory")

# Load and queue of the clusters for the ledger source, when none is given to it: set by the
# composition root (greend.cli) so that the TUI does not import the policy engine.
live_load_provider: LiveLoad | None = None

class SourceError(Exception):
    """The data cannot be read; the message says from where and why, phrased for a person."""


# -- the interface ----------------------------------------------------------------------------
class DataSource(ABC):
    """What the TUI reads. Implementations are used from worker threads, one call at a time."""

    label: str

    @abstractmethod
    def jobs(self, q: JobQuery, now: float) -> JobPage: ...

    @abstractmethod
    def job(self, cluster: str, job_id: str) -> JobDetail | None: ...

    @abstractmethod
    def clusters(self, now: float) -> list[ClusterInfo]: ...

    @abstractmethod
    def summary(self, since: float | None, until: float | None, by: str) -> Summary: ...

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def prefetch(self, q: JobQuery, now: float) -> threading.Thread | None:
        """Start reading q's page in the background, if this source can keep it for the screen's
        own first read (`greend tui` calls it before importing Textual); the thread, or None."""
        return None


def first_query(user: str | None, now: float, page_size: int) -> JobQuery:
    """The jobs screen's query when it opens (tui/jobs.py JobsScreen.query_now with its defaults:
    tests/test_tui.py checks that they agree)."""
    from .formatting import DEFAULT_PERIOD, since

    return JobQuery(user=user, since=since(DEFAULT_PERIOD, now), limit=page_size)


# -- shared helpers ---------------------------------------------------------------------------
def provenance_kind(p: str) -> str:
    """'measured', 'modelled' or '' from a provenance value ('measured: RAPL ...')."""
    parts = {s.strip().split(":", 1)[0] for s in p.split(" | ") if s.strip()}
    if parts == {"measured"}:
        return "measured"
    if parts == {"modelled"}:
        return "modelled"
    return "mixed" if parts else ""


def measured_share(row: JobRow) -> float | None:
    """Share of the job's IT energy that was measured (not modelled); None without energy."""
    prov = row.provenance or {}
    total = measured = 0.0
    for src in SOURCES:
        e = getattr(row, f"{src}_uj")
        if not e:
            continue
        total += e
        kind = provenance_kind(prov.get(src, ""))
        if kind == "measured":
            measured += e
        elif kind == "mixed":
            measured += e / 2
    return measured / total if total else None


def how_obtained(row: JobRow) -> str:
    share = measured_share(row)
    if share is None:
        return ""
    if share >= 0.999:
        return "measured"
    if share <= 0.001:
        return "modelled"
    return "mixed"


def power_w(series: list[SeriesPoint], first_seen: float | None = None) -> list[float]:
    """Mean power of each bucket: its energy over the time it covers.

    A bucket is stamped with the start of its step (t_start) and its last sample (t_end); the first
    one may begin before the job did and a bucket never begins before the previous one ended, so the
    width is taken from the later of those, which keeps a short job from looking idle.
    """
    out = []
    prev_end = first_seen if first_seen is not None else float("-inf")
    for p in series:
        start = max(p.t_start, prev_end)
        width = p.t_end - start
        if width <= 0:
            width = max(1e-9, p.t_end - p.t_start)
        out.append(p.energy_uj / 1e6 / width)
        prev_end = max(prev_end, p.t_end)
    return out


# -- in memory, for an older daemon whose API cannot sort or search --------------------------
def _sort_value(key: str, now: float) -> Callable[[JobRow], object]:
    return {
        "recent": lambda r: r.last_seen,
        "energy": lambda r: r.it_energy_uj,
        "carbon": lambda r: r.carbon_g,
        "water": water_l,
        "elapsed": lambda r: elapsed_s(r, now),
        "job": lambda r: (r.cluster, len(r.job_id), r.job_id),
        "name": lambda r: r.name.lower(),
    }[key]


def matches(row: JobRow, text: str) -> bool:
    t = text.lower()
    return any(t in (v or "").lower() for v in (row.job_id, row.name, row.user, row.account,
                                                   row.cluster, row.partition, row.command, row.node))


def select_page(jobs: list[JobRow], q: JobQuery, now: float) -> JobPage:
    """Search, sort and page merged jobs in memory, as greend.queries.job_page does in SQL."""
    jobs = [r for r in jobs if (not q.search or matches(r, q.search))
            and (q.outcome is None or outcome_of(r) == q.outcome)]
    # Ties broken as the SQL does: most recent first, then by cluster and job id.
    jobs = sorted(jobs, key=lambda r: (-r.last_seen, r.cluster, r.job_id))
    if q.sort != "recent" or not q.descending:
        jobs.sort(key=_sort_value(q.sort, now), reverse=q.descending)
    running = sum(1 for r in jobs if r.state == RUNNING)
    return JobPage(jobs[q.offset:q.offset + q.limit], q.offset, len(jobs), running)


# -- 1. a ledger file, read-only --------------------------------------------------------------
class LedgerSource(DataSource):
    """Reads a ledger file read-only (no daemon needed) through the core's read model; the cluster
    table comes from the config, given or loaded when first needed (`config_loader`), so listing
    jobs does not wait for it. Load and queue come from `live_load` (or `live_load_provider`)."""

    def __init__(self, path: str | Path, cfg=None, label: str | None = None,
                 config_loader: Callable[[], object] | None = None, live_load: LiveLoad | None = None):
        self.path = Path(path)
        self.cfg = cfg
        self.config_loader = config_loader
        self.live_load = live_load
        self.label = label or f"ledger {self.path}"
        self._ledger: Ledger | None = None
        # One connection, used by Textual's worker threads and closed by the app's unmount: the
        # lock (reentrant: a failed read closes under it) keeps a close from freeing the
        # connection under a running query, which crashes SQLite's C code.
        self._lock = threading.RLock()
        self._last: tuple[int, JobQuery, JobPage] | None = None  # data_version, query, its page

    def _db(self) -> sqlite3.Connection:
        if self._ledger is None:
            try:
                self._ledger = Ledger(self.path, readonly=True)
            except LedgerError as e:
                raise SourceError(str(e)) from None
        return self._ledger.db

    def _run(self, fn):
        with self._lock:
            try:
                return fn(self._db())
            except sqlite3.Error as e:
                # A ledger replaced or damaged under us: reopen on the next try.
                self.close()
                raise SourceError(f"{self.path}: cannot read the ledger: {e}") from None
            except queries.QueryError as e:
                raise SourceError(str(e)) from None

    def close(self) -> None:
        with self._lock:
            self._last = None
            if self._ledger is not None:
                try:
                    self._ledger.close()
                finally:
                    self._ledger = None

    def _config(self, required: bool):
        from greend.errors import ConfigError

        if self.cfg is None and self.config_loader is not None:
            try:
                self.cfg = self.config_loader()
            except ConfigError as e:
                if required:
                    raise SourceError(str(e)) from None
                return None
        return self.cfg

    def _unchanged(self, version: int, q: JobQuery) -> JobPage | None:
        """The last page again if nobody wrote to the ledger since and the query is the same (a
        period that slid by less than a checkpoint or two counts as the same)."""
        if self._last is None or q.sort == "elapsed":
            return None
        v, last, page = self._last
        if v != version or dataclasses.replace(last, since=q.since) != q:
            return None
        if (last.since is None) != (q.since is None) or (q.since and abs(q.since - last.since) > 60):
            return None
        return page

    def jobs(self, q: JobQuery, now: float) -> JobPage:
        def run(db: sqlite3.Connection) -> JobPage:
            # Live refreshes mostly find the ledger as it was (the daemon commits every 15 s by
            # default): SQLite's data_version says so without running the query.
            version = db.execute("PRAGMA data_version").fetchone()[0]
            page = self._unchanged(version, q)
            if page is None:
                page = queries.job_page(db, q, now)
                self._last = (version, q, page)
            return page

        return self._run(run)

    def prefetch(self, q: JobQuery, now: float) -> threading.Thread:
        """The first page is read in a thread while the main one imports Textual (SQLite runs
        without the GIL): the jobs screen's first read then finds it unchanged (_unchanged). A
        failure is left to that read to report."""

        def run() -> None:
            try:
                self.jobs(q, now)
            except Exception:  # the screen's own read says what is wrong
                pass

        thread = threading.Thread(target=run, name="greend-tui-prefetch", daemon=True)
        thread.start()
        return thread

    def job(self, cluster: str, job_id: str) -> JobDetail | None:
        return self._run(lambda db: queries.job_detail(db, cluster, job_id))

    def clusters(self, now: float) -> list[ClusterInfo]:
        from greend import config as config_mod

        cfg = self._config(required=True)
        try:
            running = self._run(queries.running_by_cluster)
        except SourceError:
            running = None  # the table of clusters still comes from the configuration
        return queries.clusters(cfg if cfg is not None else config_mod.Config(), now, running=running,
                                live_load=self.live_load or live_load_provider)

    def summary(self, since: float | None, until: float | None, by: str) -> Summary:
        s = self._run(lambda db: queries.summary(db, by, since, until))
        if by == "account":
            try:
                cfg = self._config(required=False)
            except Exception:  # no usable configuration: no budgets to show
                cfg = None
            if cfg is not None and cfg.policy.budgets:
                self._run(lambda db: budgets.add_budgets(db, s, cfg.policy.budgets))
        for row in s.rows:
            row.key = row.key or "(none)"
        return s


# -- 2 and 3. greend's HTTP API (the daemon's unix socket, a site controller's URL) ------------
class _ApiSource(DataSource):
    """greend's /api/v1: filters, search, sorting and paging server-side (greend.queries)."""

    prefix = ""
    max_limit = 1000  # the API's largest page
    # An older API pages with limit/offset and cannot sort by footprint or search: then fetch the
    # filtered set (up to max_rows) and do the rest here.
    page_rows = 1000
    max_rows = 50_000

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout

    @abstractmethod
    def _connect(self) -> http.client.HTTPConnection: ...

    @abstractmethod
    def _where(self) -> str: ...

    def _get(self, path: str, params: dict | None = None) -> dict:
        import http.client

        qs = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        url = self.prefix + path + (f"?{qs}" if qs else "")
        conn = self._connect()
        try:
            conn.request("GET", url, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        except FileNotFoundError:
            raise SourceError(f"{self._where()}: no such socket (is greend running?)") from None
        except ConnectionRefusedError:
            raise SourceError(f"{self._where()}: connection refused (is greend running?)") from None
        except PermissionError:
            raise SourceError(f"{self._where()}: permission denied") from None
        except TimeoutError:
            raise SourceError(f"{self._where()}: no answer within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(f"{self._where()}: {getattr(e, 'strerror', None) or e}") from None
        finally:
            conn.close()
        if resp.status == 404 and path.startswith("/api/v1/jobs/"):
            return {}
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise SourceError(f"{self._where()}: GET {url}: HTTP {resp.status}, not JSON") from None
        if resp.status != 200:
            msg = data.get("error") if isinstance(data, dict) else None
            raise SourceError(f"{self._where()}: GET {url}: HTTP {resp.status}" + (f": {msg}" if msg else ""))
        if not isinstance(data, dict):
            raise SourceError(f"{self._where()}: GET {url}: unexpected answer (not a JSON object)")
        return data

    def jobs(self, q: JobQuery, now: float) -> JobPage:
        params = {"user": q.user, "account": q.account, "cluster": q.cluster, "state": q.state,
                  "kind": q.kind, "since": q.since, "until": q.until}
        rows: list[JobRow] = []
        offset = q.offset
        total = running = 0
        # Sorted, searched and paged by the API (a page over max_limit comes in several requests).
        while len(rows) < q.limit:
            data = self._get("/api/v1/jobs", {
                **params, "per": "job", "sort": q.sort, "order": "desc" if q.descending else "asc",
                "q": q.search or None, "outcome": q.outcome,
                "limit": min(q.limit - len(rows), self.max_limit), "offset": offset})
            if "total" not in data:  # a daemon older than sort and search: do them here
                return self._jobs_in_memory(q, params, now)
            got = data.get("jobs") or []
            rows.extend(_job_from_listing(d) for d in got)
            total, running = int(data["total"]), int(data.get("running") or 0)
            if not got or data.get("next_offset") is None:
                break
            offset += len(got)
        return JobPage(rows, q.offset, total, running)

    def _jobs_in_memory(self, q: JobQuery, params: dict, now: float) -> JobPage:
        """For an API without sort and search: fetch the filtered records (up to max_rows), merge,
        search, sort and page them here."""
        rows: list[JobRow] = []
        offset: int | None = 0
        truncated = False
        while offset is not None:
            data = self._get("/api/v1/jobs", {**params, "limit": self.page_rows, "offset": offset})
            got = data.get("jobs") or []
            rows.extend(_job_from_listing(d) for d in got)
            nxt = data.get("next_offset")
            offset = int(nxt) if nxt is not None and got else None
            if len(rows) >= self.max_rows and offset is not None:
                truncated = True
                break
        page = select_page(group_jobs(rows), q, now)
        page.truncated = truncated
        return page

    def job(self, cluster: str, job_id: str) -> JobDetail | None:
        data = self._get(f"/api/v1/jobs/{urllib.parse.quote(cluster, safe='')}/"
                         f"{urllib.parse.quote(job_id, safe='')}")
        records = data.get("records") or []
        if not records:
            return None
        nodes, points, factors, decision = [], [], [], None
        seen = set()
        for rec in records:
            nodes.append(_job_from_footprint(rec))
            for s in rec.get("series") or []:
                points.append(SeriesPoint(
                    float(s["t_start"]), float(s["t_end"]), int(s.get("cpu_uj", 0)),
                    int(s.get("dram_uj", 0)), int(s.get("gpu_uj", 0)), int(s.get("memory_uj", 0)),
                    float(s.get("carbon_g", 0)), float(s.get("water_site_l", 0)),
                    float(s.get("water_offsite_l", 0))))
            for f in rec.get("factors") or []:
                k = json.dumps(f, sort_keys=True)
                if k not in seen:
                    seen.add(k)
                    factors.append(f)
            decision = decision or rec.get("decision")
        return JobDetail(merge_rows(nodes), nodes, merge_series(points), factors, decision)

    def clusters(self, now: float) -> list[ClusterInfo]:
        data = self._get("/api/v1/clusters")
        out = []
        for name, c in (data.get("clusters") or {}).items():
            f = c.get("factors")
            note = ""
            if isinstance(f, dict) and "error" in f:
                f, note = None, f"factors: {f['error']}"
            out.append(ClusterInfo(
                name, str(c.get("tier", "")), bool(c.get("hds", False)), bool(c.get("open", True)),
                f, load=c.get("load"), queue=c.get("queue"), running=c.get("running"), note=note,
            ))
        return out

    def summary(self, since: float | None, until: float | None, by: str) -> Summary:
        data = self._get("/api/v1/summary", {"since": since, "until": until, "by": by})
        rows = []
        for r in data.get("rows") or []:
            row = SummaryRow(str(r.get("key") or "(none)"), float(r.get("it_energy_j", 0)),
                             float(r.get("carbon_g", 0)), float(r.get("water_l", 0)),
                             int(r.get("jobs", 0)))
            row.budget_used, row.budget_label = _budget(r)
            rows.append(row)
        rows.sort(key=lambda r: (r.carbon_g, r.it_energy_j), reverse=True)
        ua, ne = data.get("unattributed_j"), data.get("node_energy_j")
        return Summary(by, rows, None if ua is None else float(ua), None if ne is None else float(ne),
                       str(data.get("note") or ""))


def _budget(r: dict) -> tuple[float | None, str]:
    """Where an account stands in its budget, as greend.api's summary sends it (`budget`)."""
    b = r.get("budget")
    if not isinstance(b, dict):
        return None, ""
    used = b.get("max_ratio")
    if used is None and b.get("exceeded"):
        used = float("inf")
    return (None if used is None else float(used)), str(b.get("label", ""))


def _job_from_listing(d: dict) -> JobRow:
    """A row of /api/v1/jobs: a job-footprint record, or the flat row of a daemon older than the
    schema."""
    return _job_from_footprint(d) if "schema_version" in d else _job_from_dict(d)


def _job_from_dict(d: dict) -> JobRow:
    known = {f.name for f in dataclasses.fields(JobRow)}
    return JobRow(**{k: v for k, v in d.items() if k in known})


def _job_from_footprint(rec: dict) -> JobRow:
    """A JobRow back from a job-footprint record (report.footprint_dict, docs/json.md): the API's
    listings and job records."""
    j = rec.get("job") or {}
    e = rec.get("energy_uj") or {}
    w = rec.get("water_l") or {}
    known = {f.name for f in dataclasses.fields(JobRow)}
    base = {k: v for k, v in j.items() if k in known}
    base.setdefault("node", "")
    base.setdefault("kind", "")
    base.setdefault("state", "")
    base.setdefault("first_seen", 0.0)
    base.setdefault("last_seen", base["first_seen"])
    meta = {}
    if j.get("slurm_state"):  # what outcome_of reads for a Slurm job without an exit code
        meta["slurm_state"] = j["slurm_state"]
    if rec.get("series_step_s"):
        meta["series_step_s"] = rec["series_step_s"]
    base.pop("meta", None)
    return JobRow(
        meta=meta,
        **base,
        cpu_time_ns=round(float(rec.get("cpu_time_s", 0)) * 1e9),
        cpu_uj=int(e.get("cpu", 0)), dram_uj=int(e.get("dram", 0)), gpu_uj=int(e.get("gpu", 0)),
        memory_uj=int(e.get("memory", 0)),
        facility_j=float((rec.get("energy_j") or {}).get("facility", 0)),
        carbon_g=float(rec.get("carbon_g", 0)),
        water_site_l=float(w.get("site", 0)), water_offsite_l=float(w.get("offsite", 0)),
        provenance=rec.get("provenance") or {},
    )


class SocketSource(_ApiSource):
    """The local daemon's API over its unix socket (the daemon knows who is asking)."""

    def __init__(self, path: str | Path, timeout: float = 10.0, label: str | None = None):
        super().__init__(timeout)
        self.path = str(path)
        self.label = label or f"greend at {self.path}"

    def _connect(self) -> http.client.HTTPConnection:
        from greend.httpclient import UnixHTTPConnection

        return UnixHTTPConnection(self.path, self.timeout)

    def _where(self) -> str:
        return self.path


class UrlSource(_ApiSource):
    """A site controller's API at an http(s) URL."""

    def __init__(self, url: str, timeout: float = 10.0, label: str | None = None):
        super().__init__(timeout)
        u = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SourceError(f"{url}: expected an http:// or https:// URL")
        self.url = url
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port
        self.prefix = u.path.rstrip("/")
        self.label = label or f"controller {url}"

    def _connect(self) -> http.client.HTTPConnection:
        import http.client

        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _where(self) -> str:
        return self.url.rstrip("/")

