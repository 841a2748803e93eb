"""Where the TUI's figures come from: one interface, three sources (a ledger file read-only, the local
daemon's API over its unix socket, a site controller's API over HTTP).

Every method may raise `SourceError`, whose message is shown to the person as it is; nothing here
imports Textual, so the layer is tested and benchmarked on its own.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import sqlite3
import threading
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from greend.ledger import JobRow, Ledger, LedgerError

SOURCES = ("cpu", "gpu", "dram", "memory")
RUNNING = "running"

# Sort keys the jobs screen offers, in the order `s` cycles through them.
SORT_KEYS = ("recent", "energy", "carbon", "water", "elapsed", "job", "name")

# How a job ended: its exit code (0 ok, anything else failed) or, for a Slurm job whose exit code
# greend did not record, Slurm's final state (meta.slurm_state). None: running, or not known.
SLURM_OK = "COMPLETED"
SLURM_FAILED = ("BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT")


class SourceError(Exception):
    """The data cannot be read; the message says from where and why, phrased for a person."""


# -- what the screens get ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class JobQuery:
    """Which jobs to list, in which order, which page. None means no filter."""

    user: str | None = None
    account: str | None = None
    cluster: str | None = None
    state: str | None = None
    since: float | None = None
    until: float | None = None
    search: str = ""
    outcome: str | None = None
    """"ok" or "failed" (see outcome_of); None: any, running and unknown included."""
    sort: str = "recent"
    descending: bool = True
    limit: int = 100
    offset: int = 0


@dataclass(slots=True)
class JobPage:
    """One page of jobs (each merged over its nodes), with the size of the whole result."""

    jobs: list[JobRow]
    offset: int
    total: int
    running: int
    truncated: bool = False  # the source holds more than it would send: the total is a lower bound


@dataclass(slots=True)
class SeriesPoint:
    """One bucket of a job's time series (summed over nodes and factor sets)."""

    t_start: float
    t_end: float
    cpu_uj: int = 0
    dram_uj: int = 0
    gpu_uj: int = 0
    memory_uj: int = 0
    carbon_g: float = 0.0
    water_site_l: float = 0.0
    water_offsite_l: float = 0.0

    @property
    def energy_uj(self) -> int:
        return self.cpu_uj + self.dram_uj + self.gpu_uj + self.memory_uj


@dataclass(slots=True)
class JobDetail:
    """A job merged over its nodes, its per-node records, power series, factors and routing decision."""

    job: JobRow
    nodes: list[JobRow]
    series: list[SeriesPoint]
    factors: list[dict]
    decision: dict | None = None


@dataclass(slots=True)
class ClusterInfo:
    name: str
    tier: str
    hds: bool
    open: bool
    factors: dict | None
    """Factors.to_dict() in force now (with `sources`), or None when unknown."""
    load: float | None = None
    """Share of the cluster's capacity in use, 0-1, when the source knows it."""
    queue: int | None = None
    """Jobs waiting, when the source knows it."""
    running: int | None = None
    """Jobs greend sees running there."""
    note: str = ""


@dataclass(slots=True)
class SummaryRow:
    key: str
    it_energy_j: float
    carbon_g: float
    water_l: float
    jobs: int
    budget_used: float | None = None
    """Fraction of the budget used (1.0 = all of it), when a budget is configured."""
    budget_label: str = ""


@dataclass(slots=True)
class Summary:
    by: str
    rows: list[SummaryRow]
    unattributed_j: float | None
    node_energy_j: float | None
    note: str = ""

    @property
    def unattributed_share(self) -> float | None:
        if not self.node_energy_j or self.unattributed_j is None:
            return None
        return self.unattributed_j / self.node_energy_j


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


def elapsed_s(row: JobRow, now: float) -> float:
    if row.state == RUNNING:
        return max(0.0, now - row.first_seen)
    return max(0.0, (row.end_time or row.last_seen) - row.first_seen)


def water_l(row: JobRow) -> float:
    return row.water_site_l + row.water_offsite_l


def job_key(row: JobRow) -> tuple[str, str, int]:
    return (row.cluster, row.job_id, row.submit_time)


def _sum_opt(values: Iterable[float | int | None]):
    vals = [v for v in values if v is not None]
    return sum(vals) if vals else None


def merge_rows(rows: list[JobRow]) -> JobRow:
    """One job's record over all its nodes: sums of energy and footprint, union of provenance."""
    if len(rows) == 1:
        return rows[0]
    rows = sorted(rows, key=lambda r: r.first_seen)
    running = any(r.state == RUNNING for r in rows)
    last = max(rows, key=lambda r: r.last_seen)
    prov: dict[str, str] = {}
    for r in rows:
        for k, v in (r.provenance or {}).items():
            seen = prov.get(k)
            if seen is None:
                prov[k] = v
            elif v not in seen.split(" | "):
                prov[k] = f"{seen} | {v}"
    ends = [r.end_time for r in rows]
    return dataclasses.replace(
        rows[0],
        node=",".join(dict.fromkeys(r.node for r in rows)),
        state=RUNNING if running else last.state,
        first_seen=min(r.first_seen for r in rows),
        last_seen=last.last_seen,
        end_time=None if running or None in ends else max(e for e in ends if e is not None),
        alloc_cpus=_sum_opt(r.alloc_cpus for r in rows),
        alloc_mem_bytes=_sum_opt(r.alloc_mem_bytes for r in rows),
        alloc_gpus=_sum_opt(r.alloc_gpus for r in rows),
        cpu_time_ns=sum(r.cpu_time_ns for r in rows),
        cpu_uj=sum(r.cpu_uj for r in rows),
        dram_uj=sum(r.dram_uj for r in rows),
        gpu_uj=sum(r.gpu_uj for r in rows),
        memory_uj=sum(r.memory_uj for r in rows),
        facility_j=sum(r.facility_j for r in rows),
        carbon_g=sum(r.carbon_g for r in rows),
        water_site_l=sum(r.water_site_l for r in rows),
        water_offsite_l=sum(r.water_offsite_l for r in rows),
        # Peaks on different nodes may not coincide: the sum is the job's worst case.
        max_mem_bytes=sum(r.max_mem_bytes for r in rows),
        provenance=prov,
        exit_code=last.exit_code,
        pk=None,
    )


def group_jobs(rows: Iterable[JobRow]) -> list[JobRow]:
    """Merge per-node rows into one row per job, keeping the order of first appearance."""
    groups: dict[tuple, list[JobRow]] = {}
    for r in rows:
        groups.setdefault(job_key(r), []).append(r)
    return [merge_rows(g) for g in groups.values()]


def merge_series(points: Iterable[SeriesPoint]) -> list[SeriesPoint]:
    """Sum points that share a bucket (several nodes, or a factor change inside a bucket)."""
    out: dict[float, SeriesPoint] = {}
    for p in points:
        q = out.get(p.t_start)
        if q is None:
            out[p.t_start] = dataclasses.replace(p)
            continue
        q.t_end = max(q.t_end, p.t_end)
        q.cpu_uj += p.cpu_uj
        q.dram_uj += p.dram_uj
        q.gpu_uj += p.gpu_uj
        q.memory_uj += p.memory_uj
        q.carbon_g += p.carbon_g
        q.water_site_l += p.water_site_l
        q.water_offsite_l += p.water_offsite_l
    return [out[k] for k in sorted(out)]


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


def slurm_state(row: JobRow) -> str:
    """Slurm's base state for the job ("FAILED", "CANCELLED"...), "" when greend has none."""
    return str((row.meta or {}).get("slurm_state") or "").split(" ", 1)[0].upper()


def outcome_of(row: JobRow) -> str | None:
    """"ok", "failed" or None (running, or the end is not known): the exit code first, then
    Slurm's final state."""
    if row.state == RUNNING:
        return None
    st = slurm_state(row)
    if (row.exit_code is not None and row.exit_code != 0) or st in SLURM_FAILED:
        return "failed"
    if row.exit_code == 0 or st == SLURM_OK:
        return "ok"
    return None


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
    """Search, sort and page merged jobs in memory (for sources that cannot do it themselves)."""
    if q.search:
        jobs = [r for r in jobs if matches(r, q.search)]
    if q.outcome is not None:
        jobs = [r for r in jobs if outcome_of(r) == q.outcome]
    jobs = sorted(jobs, key=lambda r: (r.last_seen, r.cluster, r.job_id), reverse=True)
    if q.sort != "recent" or not q.descending:
        jobs.sort(key=_sort_value(q.sort, now), reverse=q.descending)
    running = sum(1 for r in jobs if r.state == RUNNING)
    return JobPage(jobs[q.offset:q.offset + q.limit], q.offset, len(jobs), running)


# -- 1. a ledger file, read-only --------------------------------------------------------------
_SQL_SORT = {
    "recent": "max(last_seen)",
    "energy": "sum(cpu_uj + dram_uj + gpu_uj + memory_uj)",
    "carbon": "sum(carbon_g)",
    "water": "sum(water_site_l + water_offsite_l)",
    "elapsed": "(CASE WHEN max(state = 'running') THEN :now "
               "ELSE coalesce(max(end_time), max(last_seen)) END) - min(first_seen)",
    "job": "cluster {dir}, length(job_id) {dir}, job_id",
    "name": "lower(min(name))",
}


_SQL_META_STATE = "coalesce(CASE WHEN json_valid(meta) THEN json_extract(meta, '$.slurm_state') END, '')"
_SQL_STATE = f"upper(substr({_SQL_META_STATE} || ' ', 1, instr({_SQL_META_STATE} || ' ', ' ') - 1))"
_SQL_FAILED = (f"(exit_code IS NOT NULL AND exit_code != 0 OR {_SQL_STATE} IN "
               f"({', '.join(repr(x) for x in SLURM_FAILED)}))")
# (outcome_of in SQL, on the per-node rows: a job is listed when one of its rows qualifies)
_SQL_OUTCOME = {
    "failed": f"state != 'running' AND {_SQL_FAILED}",
    "ok": f"state != 'running' AND NOT {_SQL_FAILED} AND (exit_code = 0 OR {_SQL_STATE} = '{SLURM_OK}')",
}


class LedgerSource(DataSource):
    """Reads a ledger file read-only (no daemon needed); the cluster table comes from the config,
    given or loaded when first needed (`config_loader`), so listing jobs does not wait for it."""

    def __init__(self, path: str | Path, cfg=None, label: str | None = None,
                 config_loader: Callable[[], object] | None = None):
        self.path = Path(path)
        self.cfg = cfg
        self.config_loader = config_loader
        self.label = label or f"ledger {self.path}"
        self._ledger: Ledger | None = None
        self._lock = threading.Lock()
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

    def close(self) -> None:
        self._last = None
        if self._ledger is not None:
            try:
                self._ledger.close()
            finally:
                self._ledger = None

    @staticmethod
    def _where(q: JobQuery) -> tuple[str, dict]:
        where, args = [], {}
        for col in ("user", "account", "cluster", "state"):
            val = getattr(q, col)
            if val is not None:
                where.append(f"{col} = :{col}")
                args[col] = val
        if q.since is not None:
            where.append("last_seen >= :since")
            args["since"] = q.since
        if q.until is not None:
            where.append("first_seen <= :until")
            args["until"] = q.until
        if q.outcome is not None:
            where.append(_SQL_OUTCOME[q.outcome])
        if q.search:
            pat = "%" + q.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            args["pat"] = pat
            where.append("(" + " OR ".join(
                f"{c} LIKE :pat ESCAPE '\\'"
                for c in ("job_id", "name", "user", "account", "cluster", "partition", "command", "node")
            ) + ")")
        return (" WHERE " + " AND ".join(where) if where else ""), args

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
                page = self._jobs(db, q, now)
                self._last = (version, q, page)
            return page

        return self._run(run)

    def _jobs(self, db: sqlite3.Connection, q: JobQuery, now: float) -> JobPage:
        where, args = self._where(q)
        args.update(now=now, limit=q.limit, offset=q.offset)
        group = f"FROM jobs{where} GROUP BY cluster, job_id, submit_time"
        total, running = db.execute(
            f"SELECT count(*), coalesce(sum(r), 0) FROM (SELECT max(state = 'running') AS r {group})",
            args,
        ).fetchone()
        direction = "DESC" if q.descending else "ASC"
        expr = _SQL_SORT[q.sort]
        order = (expr.format(dir=direction) + f" {direction}" if "{dir}" in expr
                 else f"{expr} {direction}")
        # (A window count in the same query is slower: it keeps every group's columns.)
        keys = [tuple(k) for k in db.execute(
            f"SELECT cluster, job_id, submit_time {group} ORDER BY {order}, "
            "max(last_seen) DESC, cluster, job_id LIMIT :limit OFFSET :offset", args,
        ).fetchall()]
        if not keys:
            return JobPage([], q.offset, total, running)
        marks = ", ".join("(?, ?, ?)" for _ in keys)
        flat = [v for k in keys for v in k]
        rows = db.execute(
            f"SELECT * FROM jobs WHERE (cluster, job_id, submit_time) IN (VALUES {marks})", flat
        ).fetchall()
        by_key: dict[tuple, list[JobRow]] = {}
        for r in rows:
            row = _row(r)
            by_key.setdefault(job_key(row), []).append(row)
        jobs = [merge_rows(by_key[k]) for k in keys if k in by_key]
        return JobPage(jobs, q.offset, total, running)

    def job(self, cluster: str, job_id: str) -> JobDetail | None:
        def run(db: sqlite3.Connection) -> JobDetail | None:
            rows = [_row(r) for r in db.execute(
                "SELECT * FROM jobs WHERE cluster = ? AND job_id = ? ORDER BY first_seen",
                (cluster, job_id))]
            if not rows:
                return None
            # A job id reused after a restart of Slurm's counter: show the latest submission.
            latest = max(r.submit_time for r in rows)
            rows = [r for r in rows if r.submit_time == latest]
            pks = [r.pk for r in rows]
            marks = ", ".join("?" for _ in pks)
            points = [
                SeriesPoint(s["t_start"], s["t_end"], s["cpu_uj"], s["dram_uj"], s["gpu_uj"],
                            s["memory_uj"], s["carbon_g"], s["water_site_l"], s["water_offsite_l"])
                for s in db.execute(
                    f"SELECT * FROM job_series WHERE job_pk IN ({marks}) ORDER BY t_start", pks)
            ]
            factors = []
            for r in db.execute(
                "SELECT DISTINCT f.* FROM job_series s JOIN factor_sets f ON f.id = s.factor_set "
                f"WHERE s.job_pk IN ({marks}) ORDER BY f.first_used", pks,
            ):
                d = dict(r)
                d["sources"] = json.loads(d["sources"] or "{}")
                factors.append(d)
            return JobDetail(merge_rows(rows), rows, merge_series(points), factors,
                             _decision(db, cluster, job_id))

        return self._run(run)

    def clusters(self, now: float) -> list[ClusterInfo]:
        from greend.policies.state import live_load

        from greend import config as config_mod

        if self.cfg is None and self.config_loader is not None:
            try:
                self.cfg = self.config_loader()
            except config_mod.ConfigError as e:
                raise SourceError(str(e)) from None
        cfg = self.cfg if self.cfg is not None else config_mod.Config()

        def run(db: sqlite3.Connection) -> dict[str, int]:
            return dict(db.execute(
                "SELECT cluster, count(*) FROM (SELECT DISTINCT cluster, job_id, submit_time "
                "FROM jobs WHERE state = 'running') GROUP BY cluster").fetchall())

        try:
            running = self._run(run)
        except SourceError:
            running = None  # the table of clusters still comes from the configuration
        try:
            live = live_load(cfg)
        except Exception as e:  # a display never fails for want of Slurm: it says why
            live, live_error = {}, f"load and queue unavailable: {e}"
        else:
            live_error = ""
        out = []
        for name, c in cfg.clusters.items():
            try:
                f = config_mod.cluster_factors(cfg, name).at(now).to_dict()
            except config_mod.ConfigError as e:
                f, note = None, f"factors: {e}"
            else:
                note = live_error
            state = live.get(name, {})
            if state and not state.get("ok"):
                note = state.get("error", "")
            out.append(ClusterInfo(name, c.tier, c.hds, c.open, f, note=note,
                                   load=state.get("load"), queue=state.get("pending"),
                                   running=(running or {}).get(name, 0) if running is not None else None))
        for name, n in sorted((running or {}).items()):
            if name not in cfg.clusters:
                out.append(ClusterInfo(name, "", False, True, None, running=n,
                                       note="in the ledger, not in the configuration"))
        return out

    def summary(self, since: float | None, until: float | None, by: str) -> Summary:
        if by not in ("account", "user"):
            raise ValueError(by)

        def run(db: sqlite3.Connection) -> Summary:
            where, args = self._where(JobQuery(since=since, until=until))
            rows = [
                SummaryRow(k or "(none)", e / 1e6, c, w, n)
                for k, e, c, w, n in db.execute(
                    f"SELECT {by}, sum(cpu_uj + dram_uj + gpu_uj + memory_uj), sum(carbon_g), "
                    "sum(water_site_l + water_offsite_l), "
                    f"count(DISTINCT cluster || '/' || job_id || '/' || submit_time) FROM jobs{where} "
                    f"GROUP BY {by} ORDER BY 3 DESC, 2 DESC", args)
            ]
            unattr = node_e = None
            note = ""
            if since is not None or until is not None:
                sw, sa = [], {}
                if since is not None:
                    sw.append("t_end >= :since")
                    sa["since"] = since
                if until is not None:
                    sw.append("t_start <= :until")
                    sa["until"] = until
                r = db.execute("SELECT sum(energy_uj), sum(unattributed_uj) FROM node_series WHERE "
                               + " AND ".join(sw), sa).fetchone()
                if r and r[0]:
                    node_e, unattr = r[0] / 1e6, r[1] / 1e6
            if node_e is None:
                r = db.execute("SELECT sum(energy_uj), sum(unattributed_uj) FROM node_totals").fetchone()
                if r and r[0]:
                    node_e, unattr = r[0] / 1e6, r[1] / 1e6
                    if since is not None or until is not None:
                        note = "unattributed share: since the ledger began (no node series in the period)"
            return Summary(by, rows, unattr, node_e, note)

        summary = self._run(run)
        if by == "account":
            self._add_budgets(summary)
        return summary

    def _add_budgets(self, summary: Summary) -> None:
        """Where each project stands in its budget period, from the configuration's budgets."""
        from greend.policies.budgets import budget_status, label

        cfg = self.cfg
        if cfg is None and self.config_loader is not None:
            try:
                cfg = self.cfg = self.config_loader()
            except Exception:  # no usable configuration: no budgets to show
                return
        budgets = cfg.policy.budgets if cfg is not None else []
        if not budgets:
            return
        try:
            status = budget_status(self.path, budgets)
        except Exception as e:  # the table still shows; the note says why budgets are missing
            summary.note = (summary.note + "; " if summary.note else "") + f"budgets unavailable: {e}"
            return
        for row in summary.rows:
            st = status.get(row.key)
            if st:
                row.budget_used, row.budget_label = st["max_ratio"], label(st)


def _row(r: sqlite3.Row) -> JobRow:
    d = dict(r)
    d["provenance"] = json.loads(d.get("provenance") or "{}")
    d["meta"] = json.loads(d.get("meta") or "{}")
    known = {f.name for f in dataclasses.fields(JobRow)}
    return JobRow(**{k: v for k, v in d.items() if k in known})


def _decision(db: sqlite3.Connection, cluster: str, job_id: str) -> dict | None:
    """The routing decision that submitted the job, as greend.api serves it (decoded)."""
    from greend import decisions

    return decisions.for_job(db, cluster, job_id)


# -- 2 and 3. greend's HTTP API (the daemon's unix socket, a site controller's URL) ------------
class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.socket_path)
        except OSError:
            s.close()
            raise
        self.sock = s


class _ApiSource(DataSource):
    """greend's /api/v1 as the project lead specified it; filters server-side, sorting here."""

    prefix = ""
    # The API pages with limit/offset and cannot sort by footprint or search: fetch the filtered
    # set (up to max_rows) and do the rest here.
    page_rows = 1000
    max_rows = 50_000

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout

    @abstractmethod
    def _connect(self) -> http.client.HTTPConnection: ...

    @abstractmethod
    def _where(self) -> str: ...

    def _get(self, path: str, params: dict | None = None) -> dict:
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
        rows: list[JobRow] = []
        offset: int | None = 0
        truncated = False
        while offset is not None:
            data = self._get("/api/v1/jobs", {
                "user": q.user, "account": q.account, "cluster": q.cluster, "state": q.state,
                "since": q.since, "until": q.until, "limit": self.page_rows, "offset": offset,
            })
            got = data.get("jobs") or []
            rows.extend(_job_from_dict(d) for d in got)
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
        return Summary(by, rows, None if ua is None else float(ua), None if ne is None else float(ne))


def _budget(r: dict) -> tuple[float | None, str]:
    """Where an account stands in its budget, as greend.api's summary sends it (`budget`)."""
    b = r.get("budget")
    if not isinstance(b, dict):
        return None, ""
    used = b.get("max_ratio")
    if used is None and b.get("exceeded"):
        used = float("inf")
    return (None if used is None else float(used)), str(b.get("label", ""))


def _job_from_dict(d: dict) -> JobRow:
    known = {f.name for f in dataclasses.fields(JobRow)}
    return JobRow(**{k: v for k, v in d.items() if k in known})


def _job_from_footprint(rec: dict) -> JobRow:
    """A JobRow back from report.footprint_dict() (which leaves out tier, uid, submit time)."""
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
    return JobRow(
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
        return _UnixHTTPConnection(self.path, self.timeout)

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
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _where(self) -> str:
        return self.url.rstrip("/")

