"""The read model over the ledger: pages of jobs (sorted, filtered, searched), one job in detail,
the clusters, and summaries with budgets. The API, the TUI's ledger source and the policy engine's
history all read through here, so the ledger's schema is known for reading in this one place.

Every function takes a read-only sqlite3 connection (any row factory), or a site database
server's reader (greend.sitedb.ServerReader: the same `execute` with a `dialect` attribute), and
raises `QueryError` for a query that asks for something that does not exist (an unknown sort key, a
bad `outcome`). The SQL is written once: standard where the engines agree (CASE WHEN rather than
boolean sums, double-quoted identifiers), and through a `Dialect` where they do not (JSON, string
concatenation, case-insensitive LIKE, row values, byte-wise text order).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .ledger import JobRow
from .report import SLURM_FAILED, SLURM_OK, outcome_of, slurm_state  # noqa: F401 - read here too

RUNNING = "running"

# Sort keys of a job page, in the order the TUI's jobs screen cycles through them.
SORT_KEYS = ("recent", "energy", "carbon", "water", "elapsed", "job", "name")
OUTCOMES = ("ok", "failed")
STATES = ("running", "ended")
SUMMARY_BY = ("account", "user", "cluster", "node")
# The columns free-text search looks in.
SEARCH_COLUMNS = ("job_id", "name", "user", "account", "cluster", "partition", "command", "node")

# Load and queue of each cluster, from its Slurm controller: {cluster: {"ok", "load", "pending",
# ...} or {"ok": False, "error"}}. Given by the composition root (policies.state.live_load), so
# that the core does not import the policy engine.
LiveLoad = Callable[[object], dict[str, dict]]


class QueryError(ValueError):
    """A query the read model cannot answer; the message names the field and what was expected."""


# -- the engines' SQL ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the engines' SQL in the read model. Identifiers that are reserved words
    somewhere ("user", "partition") are double-quoted; the MySQL reader turns them into backticks."""

    name: str
    slurm_state: str
    """SQL: the first word of meta's slurm_state, upper-cased ('' when none), as report.slurm_state."""
    like: str
    """{col} contains :pat (like_pattern's, escaped with a backslash), ignoring case (SQLite's
    LIKE: ASCII letters only)."""
    row_in: str
    """{cols} IN a list of {marks} (each "(?, ?, ?)")."""
    text_order: str
    """{x} ordered by its bytes, as SQLite's BINARY collation."""
    concat: str
    """How strings are concatenated: an operator (" || ") or a function ("concat({parts})")."""
    length: str = "length"
    """The function counting a string's characters (MySQL's length counts bytes)."""

    def cat(self, *parts: str) -> str:
        return self.concat.join(parts) if "{" not in self.concat else \
            self.concat.format(parts=", ".join(parts))


_SQLITE_STATE = "coalesce(CASE WHEN json_valid(meta) THEN json_extract(meta, '$.slurm_state') END, '')"
DIALECTS = {
    "sqlite": Dialect(
        "sqlite",
        f"upper(substr({_SQLITE_STATE} || ' ', 1, instr({_SQLITE_STATE} || ' ', ' ') - 1))",
        "{col} LIKE :pat ESCAPE '\\'", "({cols}) IN (VALUES {marks})", "{x}", " || "),
    # MariaDB and MySQL (their columns are utf8mb4_bin: ordered and compared by bytes already).
    "mysql": Dialect(
        "mysql",
        "upper(substring_index(coalesce(CASE WHEN json_valid(meta) THEN "
        "json_unquote(json_extract(meta, '$.slurm_state')) END, ''), ' ', 1))",
        "lower({col}) LIKE lower(:pat) ESCAPE '\\\\'", "({cols}) IN ({marks})", "{x}",
        "concat({parts})", "char_length"),
    "postgresql": Dialect(
        "postgresql",
        "upper(split_part(coalesce(CAST(meta AS jsonb) ->> 'slurm_state', ''), ' ', 1))",
        "{col} ILIKE :pat ESCAPE '\\'", "({cols}) IN (VALUES {marks})", '{x} COLLATE "C"', " || "),
}


def dialect_of(db) -> Dialect:
    """The dialect of a connection: a server reader's, else SQLite's."""
    return DIALECTS[getattr(db, "dialect", "sqlite")]


# -- what a reader gets -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class JobQuery:
    """Which jobs to list, in which order, which page. None means no filter.

    `per="job"` merges a job's records on its nodes into one row; `per="record"` lists one row per
    job and node, as the ledger holds them. `outcome` is "ok" (exit code 0, or Slurm's COMPLETED)
    or "failed" (any other exit code, or a failed Slurm state: outcome_of); a job whose end is not
    known is neither.
    """

    user: str | None = None
    account: str | None = None
    cluster: str | None = None
    state: str | None = None
    kind: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None
    search: str = ""
    sort: str = "recent"
    descending: bool = True
    limit: int = 100
    offset: int = 0
    per: str = "job"

    def check(self) -> None:
        if self.sort not in SORT_KEYS:
            raise QueryError(f"sort: expected one of {', '.join(SORT_KEYS)}, not {self.sort!r}")
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise QueryError(f"outcome: expected ok or failed, not {self.outcome!r}")
        if self.state is not None and self.state not in STATES:
            raise QueryError(f"state: expected running or ended, not {self.state!r}")
        if self.per not in ("job", "record"):
            raise QueryError(f"per: expected job or record, not {self.per!r}")
        if self.limit < 1 or self.offset < 0:
            raise QueryError("limit: expected 1 or more, offset: 0 or more")


@dataclass(slots=True)
class JobPage:
    """One page of jobs (each merged over its nodes, or records), with the size of the whole result."""

    jobs: list[JobRow]
    offset: int
    total: int
    running: int
    truncated: bool = False  # the source holds more than it would send: the total is a lower bound


@dataclass(slots=True)
class SeriesPoint:
    """One bucket of a job's time series (summed over nodes and factor sets when merged)."""

    t_start: float
    t_end: float
    cpu_uj: int = 0
    dram_uj: int = 0
    gpu_uj: int = 0
    memory_uj: int = 0
    carbon_g: float = 0.0
    water_site_l: float = 0.0
    water_offsite_l: float = 0.0
    cpu_time_ns: int = 0

    @property
    def energy_uj(self) -> int:
        return self.cpu_uj + self.dram_uj + self.gpu_uj + self.memory_uj

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("t_start", "t_end", "cpu_uj", "dram_uj", "gpu_uj",
                                               "memory_uj", "cpu_time_ns", "carbon_g", "water_site_l",
                                               "water_offsite_l")}


@dataclass(slots=True)
class JobDetail:
    """A job merged over its nodes, its per-node records, power series, factors and routing decision.

    `node_series` and `node_factors` are per record, in the order of `nodes`.
    """

    job: JobRow
    nodes: list[JobRow]
    series: list[SeriesPoint]
    factors: list[dict]
    decision: dict | None = None
    node_series: list[list[SeriesPoint]] = field(default_factory=list)
    node_factors: list[list[dict]] = field(default_factory=list)
    node_phases: list[list[dict]] = field(default_factory=list)
    """Per record: its phases (greend.track's run.phase, POST /api/v1/phases), in order."""


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
    country: str = ""
    live: dict | None = None
    """The live state as the provider gave it (`ok`, CPUs, counts, or `error`), when asked."""
    factors_error: str = ""
    """Why the factors are unknown (a configuration problem), when they are."""


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
    budget: dict | None = None
    """The account's budget status (greend.budgets.budget_status), when it has a budget."""


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


# -- rows ---------------------------------------------------------------------------------------
_JOB_FIELDS = frozenset(f.name for f in dataclasses.fields(JobRow))


def _dicts(cur) -> list[dict]:
    """Rows as dicts whatever the connection's row factory (or a server reader's result)."""
    names = list(cur.keys()) if hasattr(cur, "keys") else [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def job_row(d: dict) -> JobRow:
    """A JobRow from a `jobs` row (columns unknown to this version are ignored)."""
    d = dict(d)
    d["provenance"] = json.loads(d.get("provenance") or "{}")
    d["meta"] = json.loads(d.get("meta") or "{}")
    return JobRow(**{k: v for k, v in d.items() if k in _JOB_FIELDS})


def job_key(row: JobRow) -> tuple[str, str, int]:
    return (row.cluster, row.job_id, row.submit_time)


def elapsed_s(row: JobRow, now: float) -> float:
    if row.state == RUNNING:
        return max(0.0, now - row.first_seen)
    return max(0.0, (row.end_time or row.last_seen) - row.first_seen)


def water_l(row: JobRow) -> float:
    return row.water_site_l + row.water_offsite_l


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
        q.cpu_time_ns += p.cpu_time_ns
        q.carbon_g += p.carbon_g
        q.water_site_l += p.water_site_l
        q.water_offsite_l += p.water_offsite_l
    return [out[k] for k in sorted(out)]


# -- a page of jobs -----------------------------------------------------------------------------
_RUNNING = "CASE WHEN state = 'running' THEN 1 ELSE 0 END"


@functools.cache
def _sql(name: str) -> dict:
    """The read model's SQL fragments in one dialect (built once each)."""
    d = DIALECTS[name]
    t = d.text_order.format
    failed = (f"(exit_code IS NOT NULL AND exit_code != 0 OR {d.slurm_state} IN "
              f"({', '.join(repr(x) for x in SLURM_FAILED)}))")
    return {
        # Sort expressions over a job's records (GROUP BY the job) and over single records.
        "job": {
            "recent": "max(last_seen)",
            "energy": "sum(cpu_uj + dram_uj + gpu_uj + memory_uj)",
            "carbon": "sum(carbon_g)",
            "water": "sum(water_site_l + water_offsite_l)",
            "elapsed": f"(CASE WHEN max({_RUNNING}) = 1 THEN :now "
                       "ELSE coalesce(max(end_time), max(last_seen)) END) - min(first_seen)",
            "job": f"{t(x='cluster')} {{dir}}, {d.length}(job_id) {{dir}}, {t(x='job_id')}",
            "name": t(x="lower(min(name))"),
        },
        "record": {
            "recent": "last_seen",
            "energy": "cpu_uj + dram_uj + gpu_uj + memory_uj",
            "carbon": "carbon_g",
            "water": "water_site_l + water_offsite_l",
            "elapsed": "(CASE WHEN state = 'running' THEN :now ELSE coalesce(end_time, last_seen) "
                       "END) - first_seen",
            "job": f"{t(x='cluster')} {{dir}}, {d.length}(job_id) {{dir}}, {t(x='job_id')}",
            "name": t(x="lower(name)"),
        },
        "tie_job": f"max(last_seen) DESC, {t(x='cluster')}, {t(x='job_id')}",
        # outcome_of in SQL, on the per-node rows: a job is listed when one of its rows qualifies.
        "outcome": {
            "failed": f"state != 'running' AND {failed}",
            "ok": f"state != 'running' AND NOT {failed} AND (exit_code = 0 OR "
                  f"{d.slurm_state} = '{SLURM_OK}')",
        },
        "search": "(" + " OR ".join(d.like.format(col=f'"{c}"') for c in SEARCH_COLUMNS) + ")",
        "job_key": d.cat("cluster", "'/'", "job_id", "'/'", "submit_time"),
    }


def like_pattern(text: str) -> str:
    """A LIKE pattern (ESCAPE '\\') that finds `text` anywhere, its wildcards taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def job_where(q: JobQuery, dialect: str = "sqlite") -> tuple[str, dict]:
    """The WHERE clause (with its leading " WHERE ", or "") and named arguments of a query's filters."""
    sql = _sql(dialect)
    where, args = [], {}
    for col in ("user", "account", "cluster", "state", "kind"):
        val = getattr(q, col)
        if val is not None:
            where.append(f'"{col}" = :{col}')
            args[col] = val
    if q.outcome is not None:
        where.append(sql["outcome"][q.outcome])  # unknown (running, no exit code, no state) is neither
    if q.since is not None:
        where.append("last_seen >= :since")
        args["since"] = q.since
    if q.until is not None:
        where.append("first_seen <= :until")
        args["until"] = q.until
    if q.search:
        args["pat"] = like_pattern(q.search)
        where.append(sql["search"])
    return (" WHERE " + " AND ".join(where) if where else ""), args


def job_page(db: sqlite3.Connection, q: JobQuery, now: float) -> JobPage:
    """One page of the jobs (or records) a query selects, sorted in SQL, with the total and how
    many of them run."""
    q.check()
    d = dialect_of(db)
    sql = _sql(d.name)
    where, args = job_where(q, d.name)
    args.update(now=now, limit=q.limit, offset=q.offset)
    direction = "DESC" if q.descending else "ASC"
    if q.per == "job":
        group = f"FROM jobs{where} GROUP BY cluster, job_id, submit_time"
        total, running = db.execute(
            f"SELECT count(*), coalesce(sum(r), 0) FROM (SELECT max({_RUNNING}) AS r {group}) AS g",
            args).fetchone()
        expr, keys_sql, tie = sql["job"][q.sort], "cluster, job_id, submit_time", sql["tie_job"]
    else:
        group = f"FROM jobs{where}"
        total, running = db.execute(
            f"SELECT count(*), coalesce(sum({_RUNNING}), 0) {group}", args).fetchone()
        expr, keys_sql, tie = sql["record"][q.sort], "pk", "last_seen DESC, pk DESC"
    total, running = int(total), int(running)  # a server's sums are decimals
    order = (expr.format(dir=direction) + f" {direction}" if "{dir}" in expr else f"{expr} {direction}")
    # (A window count in the same query is slower: it keeps every group's columns.)
    keys = [tuple(k) for k in db.execute(
        f"SELECT {keys_sql} {group} ORDER BY {order}, {tie} LIMIT :limit OFFSET :offset", args)]
    if not keys:
        return JobPage([], q.offset, total, running)
    flat = [v for k in keys for v in k]
    if q.per == "record":
        marks = ", ".join("?" for _ in keys)
        by_pk = {d["pk"]: job_row(d) for d in _dicts(db.execute(
            f"SELECT * FROM jobs WHERE pk IN ({marks})", flat))}
        return JobPage([by_pk[k[0]] for k in keys if k[0] in by_pk], q.offset, total, running)
    marks = ", ".join("(?, ?, ?)" for _ in keys)
    by_key: dict[tuple, list[JobRow]] = {}
    for r in _dicts(db.execute(
            "SELECT * FROM jobs WHERE " + d.row_in.format(cols="cluster, job_id, submit_time",
                                                          marks=marks)
            + " ORDER BY first_seen, pk", flat)):
        row = job_row(r)
        by_key.setdefault(job_key(row), []).append(row)
    return JobPage([merge_rows(by_key[k]) for k in keys if k in by_key], q.offset, total, running)


def running_by_cluster(db: sqlite3.Connection) -> dict[str, int]:
    """How many jobs run on each cluster (a job on several nodes counts once)."""
    return dict(db.execute(
        "SELECT cluster, count(*) FROM (SELECT DISTINCT cluster, job_id, submit_time "
        "FROM jobs WHERE state = 'running') AS r GROUP BY cluster").fetchall())


# -- one job ------------------------------------------------------------------------------------
def _series_point(d: dict) -> SeriesPoint:
    return SeriesPoint(d["t_start"], d["t_end"], d["cpu_uj"], d["dram_uj"], d["gpu_uj"], d["memory_uj"],
                       d["carbon_g"], d["water_site_l"], d["water_offsite_l"], d.get("cpu_time_ns") or 0)


def job_detail(db: sqlite3.Connection, cluster: str, job_id: str, *, user: str | None = None,
               all_submissions: bool = False) -> JobDetail | None:
    """A job with its records per node, series, factor sets and routing decision; None if the
    ledger has no such job (or none of `user`'s).

    A job id that Slurm reused (after its counter was reset) has several submissions: the latest
    one is shown, or every record with `all_submissions` (`job` then merges the latest).
    """
    from . import phases  # (here: not imported by every reader's start)

    sql, args = "SELECT * FROM jobs WHERE cluster = ? AND job_id = ?", [cluster, job_id]
    if user is not None:
        sql += ' AND "user" = ?'
        args.append(user)
    rows = [job_row(d) for d in _dicts(db.execute(sql + " ORDER BY first_seen, pk", args))]
    if not rows:
        return None
    latest = max(r.submit_time for r in rows)
    if not all_submissions:
        rows = [r for r in rows if r.submit_time == latest]
    pks = [r.pk for r in rows]
    marks = ", ".join("?" for _ in pks)
    per_pk: dict[int, list[SeriesPoint]] = {pk: [] for pk in pks}
    for d in _dicts(db.execute(
            f"SELECT * FROM job_series WHERE job_pk IN ({marks}) ORDER BY t_start", pks)):
        per_pk[d["job_pk"]].append(_series_point(d))
    factors_pk: dict[int, list[dict]] = {pk: [] for pk in pks}
    factors: dict[str, dict] = {}
    for d in _dicts(db.execute(
            "SELECT DISTINCT s.job_pk, f.* FROM job_series s JOIN factor_sets f ON f.id = s.factor_set "
            f"WHERE s.job_pk IN ({marks}) ORDER BY f.first_used, f.id", pks)):
        pk = d.pop("job_pk")
        d["sources"] = json.loads(d["sources"] or "{}")
        factors_pk[pk].append(d)
        factors.setdefault(d["id"], d)
    shown = [r for r in rows if r.submit_time == latest]
    return JobDetail(
        merge_rows(shown), rows,
        merge_series(p for r in shown for p in per_pk[r.pk]),
        sorted(factors.values(), key=lambda f: (f["first_used"], f["id"])) if factors else [],
        decision_for(db, cluster, job_id, users={r.user for r in rows}),
        node_series=[per_pk[pk] for pk in pks],
        node_factors=[factors_pk[pk] for pk in pks],
        # Phases are a node's (POST /api/v1/phases): a site database server has no table of them.
        node_phases=[phases.of_job(db, pk) if dialect_of(db).name == "sqlite" else []
                     for pk in pks],
    )


def decision_for(db: sqlite3.Connection, cluster: str, job_id: str,
                 users: set[str] | None = None) -> dict | None:
    """The latest routing decision that submitted cluster/job_id, decoded (greend.decisions); None
    when the ledger has none, or no decisions table (a ledger older than migration 3, read-only).
    With `users` (the job's owners, from its records) only a decision one of them made: another
    user's decision naming this job id never attaches to it (docs/security.md)."""
    from . import decisions

    sql, args = "SELECT * FROM decisions WHERE cluster = ? AND job_id = ?", [cluster, job_id]
    if users is not None:
        sql += f' AND "user" IN ({", ".join("?" * len(users))})'
        args += sorted(users)
    try:
        found = _dicts(db.execute(sql + " ORDER BY t DESC, id DESC LIMIT 1", args))
    except sqlite3.OperationalError:
        return None
    return decisions.decode(found[0]) if found else None


# -- clusters -----------------------------------------------------------------------------------
def clusters(cfg, now: float, *, db: sqlite3.Connection | None = None,
             running: dict[str, int] | None = None,
             live_load: LiveLoad | None = None) -> list[ClusterInfo]:
    """The configuration's clusters with the factors in force now, the jobs greend sees running
    (from the ledger `db`, or as counted by running_by_cluster), and their load and queue (with a
    live-load provider). A cluster that is only in the ledger is listed too, with a note. Never
    fails for want of Slurm: the note says why."""
    from . import config as config_mod

    if db is not None and running is None:
        try:
            running = running_by_cluster(db)
        except sqlite3.Error:
            running = None  # the table of clusters still comes from the configuration
    live: dict[str, dict] = {}
    live_error = ""
    if live_load is not None:
        try:
            live = live_load(cfg) or {}
        except Exception as e:  # Slurm unreachable or no policy config: the listing still answers
            live_error = f"load and queue unavailable: {e}"
            live = {name: {"ok": False, "error": live_error} for name in cfg.clusters}
    out = []
    for name, c in cfg.clusters.items():
        try:
            if c.carbon_signal is not None:
                # The live signal as last fetched (the cache; never a request from here).
                from . import carbon_feed

                f = carbon_feed.live_factors(cfg, name, now=now, fetch=False).at(now).to_dict()
            else:
                f = config_mod.cluster_factors(cfg, name).at(now).to_dict()
        except Exception as e:  # report, don't fail the whole listing
            f, ferr, note = None, str(e), f"factors: {e}"
        else:
            ferr, note = "", live_error
        state = live.get(name) or None
        if state and not state.get("ok"):
            note = state.get("error", "") or note
        ok = bool(state and state.get("ok"))
        out.append(ClusterInfo(
            name, c.tier, c.hds, c.open, f, note=note, country=c.country or "", live=state,
            factors_error=ferr,
            load=state["load"] if ok else None, queue=state["pending"] if ok else None,
            running=running.get(name, 0) if running is not None else None))
    for name, n in sorted((running or {}).items()):
        if name not in cfg.clusters:
            out.append(ClusterInfo(name, "", False, True, None, running=n,
                                   note="in the ledger, not in the configuration"))
    return out


# -- summaries ----------------------------------------------------------------------------------
_SUMMARY_ORDER = {"carbon": "3 DESC, 2 DESC", "energy": "2 DESC, 3 DESC"}


def summary(db: sqlite3.Connection, by: str, since: float | None = None, until: float | None = None,
            *, user: str | None = None, order: str = "carbon", limit: int | None = None) -> Summary:
    """Energy, carbon and water of the jobs seen in [since, until] by account, user, cluster or
    node (a job overlapping the window counts in full; a job on several nodes counts once), and the
    nodes' unattributed share over the window (since the ledger began when it has no node series
    there). `user` restricts the rows to that user's jobs. Budgets: budgets.add_budgets()."""
    if by not in SUMMARY_BY:
        raise QueryError(f"by: expected {', '.join(SUMMARY_BY)}, not {by!r}")
    if order not in _SUMMARY_ORDER:
        raise QueryError(f"order: expected carbon or energy, not {order!r}")
    d = dialect_of(db)
    where, args = job_where(JobQuery(since=since, until=until, user=user), d.name)
    sql = (f'SELECT "{by}", sum(cpu_uj + dram_uj + gpu_uj + memory_uj), sum(carbon_g), '
           "sum(water_site_l + water_offsite_l), "
           f"count(DISTINCT {_sql(d.name)['job_key']}) FROM jobs{where} "
           f'GROUP BY "{by}" ORDER BY {_SUMMARY_ORDER[order]}')
    if limit is not None:
        sql += " LIMIT :limit"
        args["limit"] = limit
    # float(): a server's sums of integers are decimals (the same values).
    rows = [SummaryRow(k if k is not None else "", float(e or 0) / 1e6, float(c or 0.0),
                       float(w or 0.0), int(n))
            for k, e, c, w, n in db.execute(sql, args)]
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
            node_e, unattr = float(r[0]) / 1e6, float(r[1] or 0) / 1e6
    if node_e is None:
        r = db.execute("SELECT sum(energy_uj), sum(unattributed_uj) FROM node_totals").fetchone()
        if r and r[0]:
            node_e, unattr = float(r[0]) / 1e6, float(r[1] or 0) / 1e6
            if since is not None or until is not None:
                note = "unattributed share: since the ledger began (no node series in the period)"
    return Summary(by, rows, unattr, node_e, note)


# -- what the policy engine reads ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PastRun:
    """One ended job of a user's (merged over its nodes), as the policy engine's history reads it."""

    cluster: str
    job_id: str
    start: float
    stop: float
    cpus: float
    mem_bytes: int
    gpus: int
    cpu_time_ns: int
    it_energy_uj: int
    gpu_uj: int
    max_mem_bytes: int


_SIMILAR_SQL = """
SELECT cluster, job_id, MIN(first_seen) AS start, MAX(COALESCE(end_time, last_seen)) AS stop,
       SUM(COALESCE(alloc_cpus, 0)) AS cpus, SUM(COALESCE(alloc_mem_bytes, 0)) AS mem,
       SUM(COALESCE(alloc_gpus, 0)) AS gpus, SUM(cpu_time_ns) AS cpu_ns,
       SUM(cpu_uj + dram_uj + gpu_uj + memory_uj) AS it_uj, SUM(gpu_uj) AS gpu_uj,
       SUM(max_mem_bytes) AS max_mem
FROM jobs
WHERE "user" = ? AND name = ? AND state = 'ended' AND last_seen >= ?
GROUP BY cluster, job_id, submit_time
ORDER BY MAX(last_seen) DESC
LIMIT ?
"""


def similar_jobs(db: sqlite3.Connection, user: str, name: str, since: float, limit: int) -> list[PastRun]:
    """A user's ended jobs of that name seen since `since`, most recent first. Portable: "user"
    is quoted (a keyword on PostgreSQL, backticks on MySQL) and sums are made numbers here (a
    server's may be decimals)."""
    return [PastRun(c, str(j), float(start), float(stop if stop is not None else start), float(cpus or 0),
                    int(mem or 0), int(gpus or 0), int(cpu_ns or 0), int(it or 0), int(gpu or 0),
                    int(mm or 0))
            for c, j, start, stop, cpus, mem, gpus, cpu_ns, it, gpu, mm
            in db.execute(_SIMILAR_SQL, (user, name, since, limit))]


@dataclass(frozen=True, slots=True)
class AccountUsage:
    """What an account's jobs seen since `since` used (a job overlapping `since` counts in full)."""

    account: str
    since: float
    jobs: int
    facility_energy_j: float
    carbon_g: float
    water_l: float


def account_usage(db: sqlite3.Connection, account: str, since: float) -> AccountUsage:
    n, fac, carbon, water = db.execute(
        f"SELECT count(DISTINCT {_sql(dialect_of(db).name)['job_key']}), "
        "coalesce(sum(facility_j), 0), coalesce(sum(carbon_g), 0), "
        "coalesce(sum(water_site_l + water_offsite_l), 0) FROM jobs WHERE account = ? AND last_seen >= ?",
        (account, since)).fetchone()
    return AccountUsage(account, since, int(n), float(fac), float(carbon), float(water))
