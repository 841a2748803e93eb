"""The site ledger's storage (docs/site-mode.md, "The site database"): the controller's batches of
records stored with the same idempotent rules in SQLite (the default: greend.ledger's file) or in a
database server (MariaDB/MySQL or PostgreSQL) through SQLAlchemy Core.

The rules, the same on every engine: per (cluster, job_id, submit_time, node), a final record wins
over any partial and, among records of the same kind, the latest (last_seen) wins; an equal one is
a resend and changes nothing; an older one is stale and ignored. A job's series bucket, a node's
totals and its series buckets only move forward (t_end, energy). A record first sent without its
submit time (0) moves to its full identity when the agent learns it.

SQLAlchemy and the drivers (the `sitedb` extra) are imported only by a controller configured for a
server (`controller.database`): a node and a SQLite controller never load them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path

from . import decisions
from .errors import LedgerError, SiteError
from .ledger import Ledger, default_path
from .wire import FACTOR_COLS, JOB_COLS, SERIES_COLS

log = logging.getLogger(__name__)

SQLITE = "sqlite"
DIALECTS = {"mysql+pymysql": "mysql", "mariadb+pymysql": "mysql", "postgresql+psycopg": "postgresql"}
IDENT_MAX = 255  # cluster, job_id, node, factor set ids on a server: MariaDB's 3072-byte key limit
SERVER_SCHEMA_VERSION = 1  # len(_server_migrations()); stored in greend_schema
DEADLOCK_RETRIES = 3
MULTI_ROWS = 1000  # rows per multi-row INSERT on PostgreSQL (at most 65535 parameters)
# Tests only (tests/test_sitedb_failover.py): hold each batch's transaction open this long before
# its commit, so that a test can kill a controller mid-batch.
_HOLD_COMMIT_S = float(os.environ.get("GREEND_TEST_HOLD_COMMIT_S") or 0)

_KEY = ("cluster", "job_id", "submit_time", "node")
_KEEP = ("cluster", "job_id", "submit_time", "node", "first_seen")

# -- SQLite (the default): the rules as SQLite statements ---------------------------------------------


def _upsert_sql() -> str:
    cols = ", ".join(JOB_COLS)
    marks = ", ".join(f":{c}" for c in JOB_COLS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in JOB_COLS if c not in _KEEP)
    # A final record wins over any partial; among records of the same kind, the latest wins. An
    # equal one is a resend: rewriting it changes nothing.
    return (f"INSERT INTO jobs ({cols}) VALUES ({marks}) "
            f"ON CONFLICT (cluster, job_id, submit_time, node) DO UPDATE SET {updates} "
            "WHERE (excluded.state = 'ended', excluded.last_seen) >= (jobs.state = 'ended', jobs.last_seen) "
            "RETURNING pk")


_UPSERT_JOB = _upsert_sql()
_ADOPT_PROVISIONAL = (
    "UPDATE jobs SET submit_time = ?1 WHERE cluster = ?2 AND job_id = ?3 AND node = ?4 "
    "AND submit_time = 0 AND first_seen = ?5 AND NOT EXISTS (SELECT 1 FROM jobs WHERE "
    "cluster = ?2 AND job_id = ?3 AND node = ?4 AND submit_time = ?6)")
_UPSERT_SERIES = (
    f"INSERT INTO job_series (job_pk, {', '.join(SERIES_COLS)}) "
    f"VALUES (?, {', '.join('?' * len(SERIES_COLS))}) "
    "ON CONFLICT (job_pk, t_start, factor_set) DO UPDATE SET t_end = excluded.t_end, "
    "cpu_uj = excluded.cpu_uj, dram_uj = excluded.dram_uj, gpu_uj = excluded.gpu_uj, "
    "memory_uj = excluded.memory_uj, cpu_time_ns = excluded.cpu_time_ns, "
    "carbon_g = excluded.carbon_g, water_site_l = excluded.water_site_l, "
    "water_offsite_l = excluded.water_offsite_l WHERE excluded.t_end >= job_series.t_end")
_UPSERT_NODE_TOTAL = (
    "INSERT INTO node_totals VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node, domain) DO UPDATE SET "
    "source = excluded.source, provenance = excluded.provenance, energy_uj = excluded.energy_uj, "
    "unattributed_uj = excluded.unattributed_uj, idle_uj = excluded.idle_uj "
    "WHERE excluded.energy_uj >= node_totals.energy_uj")
_UPSERT_NODE_SERIES = (
    "INSERT INTO node_series VALUES (?, ?, ?, ?, ?) ON CONFLICT (node, t_start) DO UPDATE SET "
    "t_end = excluded.t_end, energy_uj = excluded.energy_uj, "
    "unattributed_uj = excluded.unattributed_uj WHERE excluded.t_end >= node_series.t_end")

NODE_TOTAL_COLS = ("node", "domain", "source", "provenance", "energy_uj", "unattributed_uj", "idle_uj")
NODE_SERIES_COLS = ("node", "t_start", "t_end", "energy_uj", "unattributed_uj")


def _get(o, k):
    return o[k] if isinstance(o, dict) else getattr(o, k)


class SqliteSite:
    """The site ledger in SQLite (greend.ledger), written by one controller process."""

    engine = SQLITE

    def __init__(self, state_dir: Path):
        self.path = default_path(state_dir)
        self.ledger = Ledger(self.path)

    def describe(self) -> str:
        return str(self.path)

    @property
    def schema_version(self) -> int:
        return self.ledger.schema_version

    def check(self, records) -> str:
        return ""

    def store(self, factor_sets, records, nodes=(), decided=(), then=None) -> tuple[int, int]:
        """Store one batch in one transaction: (records accepted, records stale). Items are the
        wire's objects (greend.wire) or dicts with the same keys. then(db, stored, nodes), if given,
        runs inside that transaction with stored = [(job pk, its oldest series bucket start)] of
        the records accepted (the forwarder's outbox, greend/forward.py)."""
        accepted = stale = 0
        stored: list[tuple[int, float]] = []
        with self.ledger.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO factor_sets VALUES (?, ?, ?, ?, ?, ?, ?)", [
                tuple(_factor_row(f)[c] for c in FACTOR_COLS) for f in factor_sets])
            for r in map(_fields, records):
                if r["submit_time"] and r["kind"] == "slurm":
                    # The agent learnt the job's submit time after sending it with none (0): its
                    # record moves to the full identity, as it did in the agent's ledger.
                    db.execute(_ADOPT_PROVISIONAL, (r["submit_time"], r["cluster"], r["job_id"],
                                                    r["node"], r["first_seen"], r["submit_time"]))
                row = db.execute(_UPSERT_JOB, _job_row(r)).fetchone()
                if row is None:
                    stale += 1  # the controller holds a newer or final record
                    continue
                accepted += 1
                series = [_fields(x) for x in r["series"]]
                if then is not None:
                    stored.append((row[0], min((x["t_start"] for x in series),
                                               default=r["last_seen"])))
                if series:
                    pk = row[0]
                    db.executemany(_UPSERT_SERIES, [
                        (pk, *(x[c] for c in SERIES_COLS)) for x in series])
            for n in nodes:
                node = _get(n, "node")
                db.executemany(_UPSERT_NODE_TOTAL, [
                    (node, *(_get(t, c) for c in NODE_TOTAL_COLS[1:])) for t in _get(n, "totals")])
                db.executemany(_UPSERT_NODE_SERIES, [
                    (node, *(_get(s, c) for c in NODE_SERIES_COLS[1:])) for s in _get(n, "series")])
            for d in decided:
                decisions.store(db, d)
            if then is not None:
                then(db, stored, nodes)
        return accepted, stale

    def close(self) -> None:
        self.ledger.close()


def _fields(o) -> dict:
    """A wire object's fields (a pydantic model keeps them in __dict__), or the dict itself."""
    return o if isinstance(o, dict) else o.__dict__


_PROV, _META = JOB_COLS.index("provenance"), JOB_COLS.index("meta")


def _job_tuple(r: dict) -> tuple:
    row = [r[c] for c in JOB_COLS]
    for i in (_PROV, _META):
        if not isinstance(row[i], str):
            row[i] = json.dumps(row[i] or {}, sort_keys=True)
    return tuple(row)


def _job_row(r) -> dict:
    return dict(zip(JOB_COLS, _job_tuple(_fields(r)), strict=True))


def _factor_row(f) -> dict:
    d = {c: _get(f, c) for c in FACTOR_COLS}
    if not isinstance(d["sources"], str):
        d["sources"] = json.dumps(d["sources"], sort_keys=True)
    return d


# -- the database URL -----------------------------------------------------------------------------------
def check_url(url: str) -> str:
    """controller.database as written: "sqlite", or DRIVER://USER@HOST[:PORT]/DATABASE with a
    driver of DIALECTS and no password (that comes from database_password_file). ValueError
    otherwise (the config's validator turns it into a message naming the key)."""
    if url == SQLITE:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in DIALECTS:
        raise ValueError(f'expected "sqlite" or a URL starting {", ".join(d + "://" for d in DIALECTS)}'
                         ', e.g. "postgresql+psycopg://greend@db.example.org:5432/greend"')
    netloc, slash, dbname = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if ":" in userinfo:
        raise ValueError("a password does not belong in the URL (it would show in logs and "
                         "`greend config show`): put it in controller.database_password_file")
    if not at or not userinfo:
        raise ValueError("expected a user: DRIVER://USER@HOST[:PORT]/DATABASE")
    if not host:
        raise ValueError("expected a host: DRIVER://USER@HOST[:PORT]/DATABASE")
    if not slash or not dbname.split("?")[0]:
        raise ValueError("expected a database name: DRIVER://USER@HOST[:PORT]/DATABASE")
    return url


def dialect_of(url: str) -> str:
    return SQLITE if url == SQLITE else DIALECTS[url.split("://", 1)[0]]


def read_password(path: Path | None) -> str | None:
    """The database password from its file (owner-only, like the site token), or None."""
    if path is None:
        return None
    from .wire import read_token

    return read_token(path, "controller.database_password_file").decode()


def open_site(settings, state_dir: Path):
    """The controller's site ledger as configured (controller.database): SqliteSite or ServerSite.
    LedgerError (cannot open, schema newer than this greend) or SiteError (password file)."""
    if settings.database == SQLITE:
        return SqliteSite(state_dir)
    return ServerSite(settings.database, read_password(settings.database_password_file))


# -- database servers ---------------------------------------------------------------------------------
def _tables(sa):
    """The site ledger's tables on a server, as SQLAlchemy Core metadata: the same columns as the
    SQLite ledger's (greend.ledger MIGRATIONS 1 and 3, without the node-only outbox/counters)."""
    from sqlalchemy.dialects import mysql

    md = sa.MetaData()
    big = sa.BigInteger
    dbl = sa.Double
    ident = sa.String(IDENT_MAX)
    name = sa.String(256)
    long_text = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
    opts = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}

    col = sa.Column

    sa.Table("factor_sets", md,
             col("id", ident, primary_key=True), col("pue", dbl, nullable=False),
             col("wue_site_l_per_kwh", dbl, nullable=False), col("ewif_l_per_kwh", dbl, nullable=False),
             col("carbon_intensity_g_per_kwh", dbl, nullable=False),
             col("sources", long_text, nullable=False), col("first_used", dbl, nullable=False), **opts)
    jobs = sa.Table(
        "jobs", md,
        col("pk", big, primary_key=True, autoincrement=True),
        col("cluster", ident, nullable=False), col("job_id", ident, nullable=False),
        col("submit_time", big, nullable=False, server_default="0"), col("node", ident, nullable=False),
        col("kind", name, nullable=False), col("name", sa.Text, nullable=False),
        col("user", name, nullable=False, server_default=""), col("uid", big),
        col("account", name, nullable=False, server_default=""),
        col("partition", name, nullable=False, server_default=""),
        col("state", sa.String(16), nullable=False), col("tier", name, nullable=False, server_default=""),
        col("alloc_cpus", dbl), col("alloc_mem_bytes", big), col("alloc_gpus", big),
        col("first_seen", dbl, nullable=False), col("last_seen", dbl, nullable=False),
        col("end_time", dbl),
        *(col(c, big, nullable=False, server_default="0")
          for c in ("cpu_time_ns", "cpu_uj", "dram_uj", "gpu_uj", "memory_uj")),
        *(col(c, dbl, nullable=False, server_default="0")
          for c in ("facility_j", "carbon_g", "water_site_l", "water_offsite_l")),
        col("max_mem_bytes", big, nullable=False, server_default="0"),
        col("provenance", long_text, nullable=False), col("command", long_text),
        col("exit_code", sa.Integer), col("meta", long_text, nullable=False),
        sa.UniqueConstraint("cluster", "job_id", "submit_time", "node", name="jobs_identity"), **opts)
    sa.Index("jobs_user", jobs.c.user, jobs.c.last_seen)
    sa.Index("jobs_account", jobs.c.account, jobs.c.last_seen)
    sa.Index("jobs_state", jobs.c.state, jobs.c.node)
    sa.Table("job_series", md,
             col("job_pk", big, sa.ForeignKey("jobs.pk"), primary_key=True),
             col("t_start", dbl, primary_key=True), col("t_end", dbl, nullable=False),
             col("factor_set", ident, primary_key=True),
             *(col(c, big, nullable=False) for c in ("cpu_uj", "dram_uj", "gpu_uj", "memory_uj",
                                                     "cpu_time_ns")),
             *(col(c, dbl, nullable=False) for c in ("carbon_g", "water_site_l", "water_offsite_l")),
             **opts)
    sa.Table("node_totals", md,
             col("node", ident, primary_key=True), col("domain", ident, primary_key=True),
             col("source", name, nullable=False), col("provenance", sa.Text, nullable=False),
             *(col(c, big, nullable=False) for c in ("energy_uj", "unattributed_uj", "idle_uj")), **opts)
    sa.Table("node_series", md,
             col("node", ident, primary_key=True), col("t_start", dbl, primary_key=True),
             col("t_end", dbl, nullable=False),
             *(col(c, big, nullable=False) for c in ("energy_uj", "unattributed_uj")), **opts)
    dec = sa.Table(
        "decisions", md,
        col("id", big, primary_key=True, autoincrement=True),
        col("token", sa.String(200), nullable=False, unique=True), col("t", dbl, nullable=False),
        col("user", name, nullable=False), col("uid", big, nullable=False), col("script", sa.Text),
        col("job_name", sa.Text, nullable=False), col("account", sa.Text, nullable=False),
        col("outcome", sa.String(32), nullable=False), col("cluster", ident), col("tier", sa.String(32)),
        col("partition", name), col("job_id", sa.String(4096).with_variant(sa.Text(), "mysql", "mariadb")),
        col("begin", dbl), col("nice", big), col("energy_j", dbl), col("carbon_g", dbl),
        col("water_l", dbl), col("tried", long_text, nullable=False),
        col("decision", long_text, nullable=False), **opts)
    sa.Index("decisions_job", dec.c.cluster, dec.c.t)
    sa.Index("decisions_user", dec.c.user, dec.c.t)
    return md


def _server_migrations(sa):
    """Schema versions on a server, in order: each a function of (connection, metadata). Version 1
    is the SQLite ledger's schema 3 less the node-only tables. A later change appends a function
    here (and the SQLite ledger its own script in greend.ledger.MIGRATIONS)."""
    def v1(conn, md):
        md.create_all(conn)

    return [v1]


class ServerSite:
    """The site ledger on MariaDB/MySQL or PostgreSQL; several controllers may share it."""

    def __init__(self, url: str, password: str | None = None, *, pool_size: int = 4):
        try:
            import sqlalchemy as sa
        except ImportError:
            raise SiteError("controller.database names a database server: install greend's "
                            "`sitedb` extra (pip install 'greend[sitedb]')") from None
        self.sa = sa
        self.url_text = check_url(url)
        self.dialect = dialect_of(url)
        u = sa.engine.make_url(url)
        if password is not None:
            u = u.set(password=password)
        args = {"connect_timeout": 10}
        self.engine = sa.create_engine(u, pool_size=pool_size, max_overflow=4, pool_pre_ping=True,
                                       pool_recycle=3600, isolation_level="READ COMMITTED",
                                       connect_args=args)
        self.md = _tables(sa)
        self.t = self.md.tables
        q = self.engine.dialect.identifier_preparer.quote
        self.q = q
        self.unnest: dict[str, tuple] = {}  # PostgreSQL: statement -> (its unnest form, casts)
        self._build_sql()
        self._migrate()

    def describe(self) -> str:
        return self.url_text  # never the password: it is not in the configured URL

    # -- errors ---------------------------------------------------------------------------------------
    def _error(self, what: str, e: Exception) -> LedgerError:
        orig = getattr(e, "orig", None) or e
        msg = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        return LedgerError(f"site database {self.url_text}: {what}: {msg}")

    def _is_deadlock(self, e: Exception) -> bool:
        orig = getattr(e, "orig", None)
        code = getattr(orig, "sqlstate", None) or ""
        args = getattr(orig, "args", ())
        return code in ("40P01", "40001") or (bool(args) and args[0] in (1213, 1205))

    # -- schema ---------------------------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return self._version(conn)

    def _version(self, conn) -> int:
        sa = self.sa
        if not sa.inspect(conn).has_table("greend_schema"):
            return 0
        v = conn.execute(sa.text("SELECT MAX(version) FROM greend_schema")).scalar()
        return int(v or 0)

    def _migrate(self) -> None:
        sa = self.sa
        steps = _server_migrations(sa)
        try:
            with self.engine.begin() as conn:
                # Several controllers starting together: one migrates, the others wait for it.
                if self.dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(74727365)"))
                else:
                    conn.execute(sa.text("SELECT GET_LOCK('greend_schema', 60)"))
                try:
                    conn.execute(sa.text(
                        "CREATE TABLE IF NOT EXISTS greend_schema (version INTEGER NOT NULL "
                        "PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)"))
                    v = self._version(conn)
                    if v > len(steps):
                        raise LedgerError(
                            f"site database {self.url_text}: schema version {v} is newer than this "
                            f"greend understands ({len(steps)}): upgrade greend")
                    for i, step in enumerate(steps[v:], start=v + 1):
                        log.info("site database %s: migrating schema to version %d", self.url_text, i)
                        step(conn, self.md)
                        conn.execute(sa.text("INSERT INTO greend_schema VALUES (:v, :t)"),
                                     {"v": i, "t": time.time()})
                finally:
                    if self.dialect != "postgresql":
                        conn.execute(sa.text("SELECT RELEASE_LOCK('greend_schema')"))
        except LedgerError:
            raise
        except sa.exc.SQLAlchemyError as e:
            raise self._error("cannot open", e) from None

    # -- statements -----------------------------------------------------------------------------------
    def _upsert(self, table: str, cols, key, cond: str | None, set_cols, last=()) -> str:
        """INSERT ... upsert of `cols` into `table` on conflict of `key`, updating set_cols when
        cond holds (cond written with {new}c and {old}c for the incoming and stored values; None
        only with no set_cols: a duplicate is left as stored).
        MySQL applies its SET list left to right, each seeing the columns already assigned: the
        columns that cond reads (`last`) are assigned last, in that order, so that cond keeps its
        first value through the list (see the proof in _build_sql)."""
        q = self.q
        names = ", ".join(q(c) for c in cols)
        marks = ", ".join(["%s"] * len(cols))  # the drivers' own (format) style: exec_driver_sql
        head = f"INSERT INTO {q(table)} ({names}) VALUES ({marks})"
        if self.dialect == "postgresql":
            sql = self._upsert_pg(table, cols, key, cond, set_cols, head)
            cast = {sa_t: n for sa_t, n in ((self.sa.Double, "float8"), (self.sa.BigInteger, "int8"),
                                              (self.sa.Integer, "int4"))}
            types = []
            for c in cols:
                t = self.t[table].c[c].type
                types.append(next((n for k, n in cast.items() if isinstance(t, k)), "text"))
            arrays = ", ".join(f"%b::{t}[]" for t in types)  # %b: binary arrays, dumped in C
            # A binary array holds one type: a column's values are made that type (1 -> 1.0).
            conv = [float if t == "float8" else int if t in ("int8", "int4") else None for t in types]
            self.unnest[sql] = (sql.replace(f"VALUES ({marks})", f"SELECT * FROM unnest({arrays})", 1),
                                conv)
            return sql
        if not set_cols:
            k = q(key[0])
            return f"{head} ON DUPLICATE KEY UPDATE {k} = {k}"
        order = [c for c in set_cols if c not in last] + [c for c in last if c in set_cols]
        # VALUES(c): the incoming row; a bare column: the stored row, as assigned so far.
        c_my = _rule(cond, lambda c: f"VALUES({q(c)})", q)
        sets = ", ".join(f"{q(c)} = IF({c_my}, VALUES({q(c)}), {q(c)})" for c in order)
        return f"{head} ON DUPLICATE KEY UPDATE {sets}"

    def _upsert_pg(self, table, cols, key, cond, set_cols, head) -> str:
        q = self.q
        if not set_cols:
            return f"{head} ON CONFLICT ({', '.join(q(c) for c in key)}) DO NOTHING"
        sets = ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in set_cols)
        where = ""
        if cond:
            where = " WHERE " + _rule(cond, lambda c: f"EXCLUDED.{q(c)}", lambda c: f"{q(table)}.{q(c)}")
        return f"{head} ON CONFLICT ({', '.join(q(c) for c in key)}) DO UPDATE SET {sets}{where}"

    def _build_sql(self) -> None:
        sa = self.sa
        job_sets = [c for c in JOB_COLS if c not in _KEEP]
        # The rule: (incoming is final, incoming last_seen) >= (stored is final, stored last_seen).
        # On MySQL, state and last_seen are assigned last (last_seen, then state): if the rule held,
        # after last_seen := new it still holds (new final >= old final); if not, nothing moved.
        rule = ("({new}state = 'ended', {new}last_seen) >= ({old}state = 'ended', {old}last_seen)")
        # Statements in the driver's words, run with exec_driver_sql and rows of tuples: the
        # ingest's hot path skips SQLAlchemy's per-row parameter processing.
        self.sql_job = self._upsert("jobs", JOB_COLS, _KEY, rule, job_sets, last=("last_seen", "state"))
        scols = ("job_pk", *SERIES_COLS)
        self.sql_series = self._upsert(
            "job_series", scols, ("job_pk", "t_start", "factor_set"), "{new}t_end >= {old}t_end",
            [c for c in SERIES_COLS if c not in ("t_start", "factor_set")], last=("t_end",))
        self.sql_node_total = self._upsert(
            "node_totals", NODE_TOTAL_COLS, ("node", "domain"), "{new}energy_uj >= {old}energy_uj",
            NODE_TOTAL_COLS[2:], last=("energy_uj",))
        self.sql_node_series = self._upsert(
            "node_series", NODE_SERIES_COLS, ("node", "t_start"), "{new}t_end >= {old}t_end",
            NODE_SERIES_COLS[2:], last=("t_end",))
        self.sql_factor = self._upsert("factor_sets", FACTOR_COLS, ("id",), None, ())
        dcols = decisions._COLS
        self.sql_decision = self._upsert(
            "decisions", dcols, ("token",), "{old}user = {new}user",
            [c for c in dcols if c not in ("token", "user", "uid")])
        self.sql_adopt = sa.text("UPDATE jobs SET submit_time = :new WHERE pk = :pk AND submit_time = 0")
        self.sql_lookup = sa.text(
            "SELECT pk, cluster, job_id, node, submit_time, first_seen, state, last_seen FROM jobs "
            "WHERE cluster = :c AND node = :n AND job_id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True))

    # -- storing --------------------------------------------------------------------------------------
    def check(self, records) -> str:
        """What this database cannot take that the wire allows (identities over IDENT_MAX)."""
        for i, r in enumerate(records):
            for c in ("cluster", "job_id", "node"):
                if len(_get(r, c)) > IDENT_MAX:
                    return (f"records[{i}].{c}: over {IDENT_MAX} characters (the site database's "
                            "limit)")
            for j, s in enumerate(_get(r, "series")):
                if len(_get(s, "factor_set")) > IDENT_MAX:
                    return f"records[{i}].series[{j}].factor_set: over {IDENT_MAX} characters"
        return ""

    def store(self, factor_sets, records, nodes=(), decided=(), *, migrating: bool = False
              ) -> tuple[int, int]:
        """As SqliteSite.store; a deadlock with another controller is retried here. migrating:
        records are copied as they are (the source adopted what it could), and the series of a
        stale record too (each bucket keeps its own forward-only rule): the buckets of a job
        that agents already sent newer totals of to the target are not lost."""
        sa = self.sa
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                with self.engine.begin() as conn:
                    return self._store(conn, factor_sets, records, nodes, decided, migrating)
            except sa.exc.DBAPIError as e:
                if attempt < DEADLOCK_RETRIES and self._is_deadlock(e):
                    log.info("site database: deadlock with another writer, retrying the batch")
                    time.sleep(0.05 * (attempt + 1))
                    continue
                raise self._error("cannot store records", e) from None
            except sa.exc.SQLAlchemyError as e:
                raise self._error("cannot store records", e) from None
        raise AssertionError("unreachable")

    def _many(self, conn, sql: str, rows: list[tuple], key=None, newer=None,
              returning: str = "") -> list:
        """Run an upsert for many rows. PostgreSQL: one INSERT ... SELECT FROM unnest(arrays),
        an array a column (one small statement, prepared once, instead of one per row); a
        statement may not touch a row twice there, so rows of one key (key(row)) are first
        reduced to the one the rule keeps when they are applied in order (newer(new, kept)).
        MariaDB: PyMySQL's executemany sends multi-row INSERTs, applied in order. `returning`
        (PostgreSQL): the RETURNING list; the rows inserted or updated come back."""
        if sql not in self.unnest:
            conn.exec_driver_sql(sql, rows)
            return []
        unnest, conv = self.unnest[sql]
        if returning:
            unnest += f" RETURNING {returning}"
        out: list = []
        if key is not None:
            kept: dict = {}
            for r in rows:
                k = key(r)
                if k not in kept or newer(r, kept[k]):
                    kept[k] = r
            rows = list(kept.values())
        for i in range(0, len(rows), MULTI_ROWS):
            cols = []
            for f, c in zip(conv, zip(*rows[i:i + MULTI_ROWS], strict=True), strict=True):
                cols.append(list(c) if f is None else [v if v is None else f(v) for v in c])
            result = conn.exec_driver_sql(unnest, tuple(cols))
            if returning:
                out += result.all()
        return out

    def _store(self, conn, factor_sets, records, nodes, decided, migrating=False) -> tuple[int, int]:
        run = conn.exec_driver_sql
        if factor_sets:
            self._many(conn, self.sql_factor, [tuple(_factor_row(f)[c] for c in FACTOR_COLS)
                                               for f in factor_sets],
                       key=lambda r: r[0], newer=lambda new, old: False)
        # Records of one identity sent twice in one batch go in successive rounds, so that each
        # statement touches an identity once and the second sees the first, as in SQLite. Sorted:
        # two controllers lock rows in the same order (fewer deadlocks).
        rounds: list[list] = []
        seen: dict[tuple, int] = {}
        for r in sorted(map(_fields, records), key=lambda r: (r["cluster"], r["job_id"], r["node"])):
            k = (r["cluster"], r["job_id"], r["submit_time"], r["node"])
            i = seen.get(k, -1) + 1
            seen[k] = i
            if i == len(rounds):
                rounds.append([])
            rounds[i].append(r)
        accepted = stale = 0
        for rnd in rounds:
            if not migrating:
                self._adopt(conn, rnd)
            rows = [_job_tuple(r) for r in rnd]  # one key once a round
            if self.dialect == "postgresql" and not migrating:
                # RETURNING gives the rows the rule let through (inserted or updated): the others
                # are stale, and their pks are not needed.
                done = {(c, j, int(s), n): pk for pk, c, j, s, n in self._many(
                    conn, self.sql_job, rows, returning="pk, cluster, job_id, submit_time, node")}
                stored = None
            else:
                self._many(conn, self.sql_job, rows)
                stored = {(c, j, int(s), n): (pk, state, float(ls))
                          for pk, c, j, n, s, _fs, state, ls in self._lookup(conn, rnd)}
            series = []
            for r in rnd:
                k = (r["cluster"], r["job_id"], r["submit_time"], r["node"])
                if stored is None:
                    pk = done.get(k)
                    fresh = pk is not None
                else:
                    # After the upsert the stored record is the incoming one (accepted) or one
                    # that the rule ranks strictly higher (stale): compare the rule's two fields.
                    pk, state, last_seen = stored[k]
                    fresh = (state == "ended", last_seen) == (r["state"] == "ended", r["last_seen"])
                if not fresh:
                    stale += 1
                    if not migrating:
                        continue
                else:
                    accepted += 1
                for x in r["series"]:
                    x = _fields(x)
                    series.append((pk, *(x[c] for c in SERIES_COLS)))
            if series:  # (job_pk, t_start, ..., factor_set at 3, t_end at 2): t_end only moves on
                self._many(conn, self.sql_series, series, key=lambda r: (r[0], r[1], r[3]),
                           newer=lambda new, old: new[2] >= old[2])
        totals, nseries = [], []
        for n in map(_fields, nodes):
            node = n["node"]
            totals += [(node, *(t[c] for c in NODE_TOTAL_COLS[1:])) for t in map(_fields, n["totals"])]
            nseries += [(node, *(x[c] for c in NODE_SERIES_COLS[1:])) for x in map(_fields, n["series"])]
        if totals:  # (node, domain, source, provenance, energy_uj, ...)
            self._many(conn, self.sql_node_total, totals, key=lambda r: r[:2],
                       newer=lambda new, old: new[4] >= old[4])
        if nseries:  # (node, t_start, t_end, ...)
            self._many(conn, self.sql_node_series, nseries, key=lambda r: r[:2],
                       newer=lambda new, old: new[2] >= old[2])
        for d in decided:
            run(self.sql_decision, tuple(d[c] for c in decisions._COLS))
        if _HOLD_COMMIT_S:
            log.warning("test hook: holding the commit of %d record(s) for %g s", len(records),
                        _HOLD_COMMIT_S)
            time.sleep(_HOLD_COMMIT_S)
        return accepted, stale

    def store_decision(self, row: dict) -> tuple[bool, int | None]:
        """A routing decision posted to a controller (decisions.validate's row), as
        decisions.store: (stored, id); not stored when another user's decision holds the token."""
        sa = self.sa
        try:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(self.sql_decision, tuple(row[c] for c in decisions._COLS))
                user, ident = conn.execute(sa.text(
                    f"SELECT {self.q('user')}, id FROM decisions WHERE token = :t"),
                    {"t": row["token"]}).one()
        except sa.exc.SQLAlchemyError as e:
            raise self._error("cannot store a decision", e) from None
        return (True, ident) if user == row["user"] else (False, None)

    def _lookup(self, conn, records) -> list:
        """The stored jobs sharing (cluster, job_id, node) with `records`: rows of (pk, cluster,
        job_id, node, submit_time, first_seen, state, last_seen). One indexed query per
        (cluster, node) (a batch comes from one node) and thousand job ids."""
        groups: dict[tuple, set] = {}
        for r in records:
            groups.setdefault((_get(r, "cluster"), _get(r, "node")), set()).add(_get(r, "job_id"))
        out = []
        for (cluster, node), ids in groups.items():
            ids = sorted(ids)
            for i in range(0, len(ids), 1000):
                out += conn.execute(self.sql_lookup, {"c": cluster, "n": node,
                                                      "ids": ids[i:i + 1000]}).all()
        return out

    def _adopt(self, conn, records) -> None:
        """The provisional (submit_time 0) record of a job whose submit time is now known takes
        that identity, unless the full identity is already stored (as _ADOPT_PROVISIONAL)."""
        want = [r for r in records if _get(r, "submit_time") and _get(r, "kind") == "slurm"]
        if not want:
            return
        by: dict[tuple, list] = {}
        for pk, c, j, n, s, fs, _state, _ls in self._lookup(conn, want):
            by.setdefault((c, j, n), []).append([pk, int(s), float(fs)])
        for r in want:
            rows = by.get((_get(r, "cluster"), _get(r, "job_id"), _get(r, "node")), [])
            new = _get(r, "submit_time")
            if any(s == new for _, s, _ in rows):
                continue
            for row in rows:
                if row[1] == 0 and row[2] == _get(r, "first_seen"):
                    conn.execute(self.sql_adopt, {"new": new, "pk": row[0]})
                    row[1] = new
                    break

    # -- reads (greend.queries through a ServerReader) --------------------------------------------
    @contextlib.contextmanager
    def reader(self):
        """A pooled connection for greend.queries' reads, as a ServerReader; a database error is a
        LedgerError naming the database (the API answers 503)."""
        sa = self.sa
        try:
            with self.engine.connect() as conn:
                yield ServerReader(conn, self.dialect, sa)
        except sa.exc.SQLAlchemyError as e:
            raise self._error("cannot read", e) from None

    def close(self) -> None:
        self.engine.dispose()


_QMARK = re.compile(r"\?")


class ServerReader:
    """A server connection with sqlite3's `execute(sql, parameters)` for greend.queries: "?" or
    ":name" parameters (bound, never formatted in), double-quoted identifiers (backticks on MySQL),
    results with fetchone/fetchall/keys and iteration. `dialect` names queries.DIALECTS' entry."""

    def __init__(self, conn, dialect: str, sa):
        self.conn, self.dialect, self.sa = conn, dialect, sa

    def execute(self, sql: str, parameters=()):
        if not isinstance(parameters, dict):
            n = iter(range(len(parameters)))
            sql = _QMARK.sub(lambda _m: f":p{next(n)}", sql)
            parameters = {f"p{i}": v for i, v in enumerate(parameters)}
        if self.dialect == "mysql":
            sql = sql.replace('"', "`")  # the read model's SQL has no double-quoted strings
        return self.conn.execute(self.sa.text(sql), parameters)


def _rule(cond: str, new, old) -> str:
    """A rule written with {new}COLUMN and {old}COLUMN, in a dialect's words."""
    return re.sub(r"\{(new|old)\}(\w+)", lambda m: (new if m[1] == "new" else old)(m[2]), cond)


# -- migration of a SQLite site ledger ------------------------------------------------------------------
def migrate_sqlite(src: Path, site: ServerSite, *, batch: int = 1000, progress=None) -> dict:
    """Copy a SQLite site ledger (a controller's) into a server database with the same upserts,
    so that a re-run, or a run after agents already sent newer records there, changes nothing
    the rules would not. progress(table, done, total) after each batch. The summary: per table,
    the rows read and, for jobs, those stored and those stale (the target's were newer)."""
    led = Ledger(src, readonly=True)  # LedgerError: missing, not a ledger, a newer schema
    db = led.db
    try:
        def count(table):
            return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        has_decisions = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'decisions'").fetchone()
        out = {"from": str(src), "to": site.describe(), "schema_version": led.schema_version,
               "factor_sets": count("factor_sets"), "jobs": count("jobs"), "jobs_stored": 0,
               "jobs_stale": 0, "job_series": count("job_series"), "node_totals": count("node_totals"),
               "node_series": count("node_series"),
               "decisions": count("decisions") if has_decisions else 0}
        factors = [dict(r) for r in db.execute("SELECT * FROM factor_sets")]
        site.store(factors, [])
        done, last = 0, -1
        while True:
            jobs = [dict(r) for r in db.execute(
                "SELECT * FROM jobs WHERE pk > ? ORDER BY pk LIMIT ?", (last, batch))]
            if not jobs:
                break
            last = jobs[-1]["pk"]
            series: dict[int, list] = {}
            marks = ",".join("?" * len(jobs))
            for r in db.execute(f"SELECT * FROM job_series WHERE job_pk IN ({marks})",
                                [j["pk"] for j in jobs]):
                series.setdefault(r["job_pk"], []).append(dict(r))
            for j in jobs:
                j["series"] = series.get(j["pk"], [])
            stored, stale = site.store([], jobs, migrating=True)
            out["jobs_stored"] += stored
            out["jobs_stale"] += stale
            done += len(jobs)
            if progress:
                progress("jobs", done, out["jobs"])
        for n in [r[0] for r in db.execute("SELECT DISTINCT node FROM node_totals UNION "
                                            "SELECT DISTINCT node FROM node_series")]:
            totals = [dict(r) for r in db.execute("SELECT * FROM node_totals WHERE node = ?", (n,))]
            rows = [dict(r) for r in db.execute(
                "SELECT * FROM node_series WHERE node = ? ORDER BY t_start", (n,))]
            for i in range(0, max(len(rows), 1), batch * 10):
                site.store([], [], [{"node": n, "totals": totals if i == 0 else [],
                                     "series": rows[i:i + batch * 10]}])
        if progress:
            progress("nodes", out["node_series"], out["node_series"])
        if has_decisions:
            rows = [dict(r) for r in db.execute("SELECT * FROM decisions ORDER BY id")]
            for r in rows:
                r.pop("id")
            for i in range(0, len(rows), batch):
                site.store([], [], decided=rows[i:i + batch])
            if progress:
                progress("decisions", len(rows), len(rows))
        return out
    finally:
        led.close()
