"""The ledger: greend's SQLite store (WAL) of per-job totals, coarse time series and counter state.

Writers commit whole checkpoints in one transaction (absolute totals, not increments), so a crash
leaves the last checkpoint intact and a replayed checkpoint never double-counts. The stored counter
readings let a restarted daemon attribute the energy used while it was down.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import LedgerError

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite"


MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE factor_sets (
        id TEXT PRIMARY KEY,
        pue REAL NOT NULL, wue_site_l_per_kwh REAL NOT NULL, ewif_l_per_kwh REAL NOT NULL,
        carbon_intensity_g_per_kwh REAL NOT NULL, sources TEXT NOT NULL, first_used REAL NOT NULL
    );
    CREATE TABLE jobs (
        pk INTEGER PRIMARY KEY,
        cluster TEXT NOT NULL, job_id TEXT NOT NULL, submit_time INTEGER NOT NULL DEFAULT 0,
        node TEXT NOT NULL,
        kind TEXT NOT NULL, name TEXT NOT NULL DEFAULT '', user TEXT NOT NULL DEFAULT '',
        uid INTEGER, account TEXT NOT NULL DEFAULT '', partition TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL, tier TEXT NOT NULL DEFAULT '',
        alloc_cpus REAL, alloc_mem_bytes INTEGER, alloc_gpus INTEGER,
        first_seen REAL NOT NULL, last_seen REAL NOT NULL, end_time REAL,
        cpu_time_ns INTEGER NOT NULL DEFAULT 0,
        cpu_uj INTEGER NOT NULL DEFAULT 0, dram_uj INTEGER NOT NULL DEFAULT 0,
        gpu_uj INTEGER NOT NULL DEFAULT 0, memory_uj INTEGER NOT NULL DEFAULT 0,
        facility_j REAL NOT NULL DEFAULT 0, carbon_g REAL NOT NULL DEFAULT 0,
        water_site_l REAL NOT NULL DEFAULT 0, water_offsite_l REAL NOT NULL DEFAULT 0,
        max_mem_bytes INTEGER NOT NULL DEFAULT 0,
        provenance TEXT NOT NULL DEFAULT '{}', command TEXT, exit_code INTEGER,
        meta TEXT NOT NULL DEFAULT '{}',
        UNIQUE (cluster, job_id, submit_time, node)
    );
    CREATE INDEX jobs_user ON jobs (user, last_seen);
    CREATE INDEX jobs_account ON jobs (account, last_seen);
    CREATE INDEX jobs_state ON jobs (state, node);
    CREATE TABLE job_series (
        job_pk INTEGER NOT NULL REFERENCES jobs (pk),
        t_start REAL NOT NULL, t_end REAL NOT NULL, factor_set TEXT NOT NULL,
        cpu_uj INTEGER NOT NULL, dram_uj INTEGER NOT NULL, gpu_uj INTEGER NOT NULL,
        memory_uj INTEGER NOT NULL, cpu_time_ns INTEGER NOT NULL,
        carbon_g REAL NOT NULL, water_site_l REAL NOT NULL, water_offsite_l REAL NOT NULL,
        PRIMARY KEY (job_pk, t_start, factor_set)
    ) WITHOUT ROWID;
    CREATE TABLE node_totals (
        node TEXT NOT NULL, domain TEXT NOT NULL, source TEXT NOT NULL, provenance TEXT NOT NULL,
        energy_uj INTEGER NOT NULL, unattributed_uj INTEGER NOT NULL, idle_uj INTEGER NOT NULL,
        PRIMARY KEY (node, domain)
    );
    CREATE TABLE node_series (
        node TEXT NOT NULL, t_start REAL NOT NULL, t_end REAL NOT NULL,
        energy_uj INTEGER NOT NULL, unattributed_uj INTEGER NOT NULL,
        PRIMARY KEY (node, t_start)
    ) WITHOUT ROWID;
    CREATE TABLE counters (
        node TEXT PRIMARY KEY, t REAL NOT NULL, state TEXT NOT NULL
    );
    """,
    # 2: the site outbox. One row per job (kind 'job', ref = jobs.pk) or per node (kind 'node',
    # ref 0) with changes the controller has not acknowledged; the record itself is read from jobs
    # when sent, so a job queued many times is sent once, with its latest totals. seq changes at
    # every queueing: an acknowledged row is deleted only if it was not queued again meanwhile.
    # series_from: the oldest series bucket not yet acknowledged.
    """
    CREATE TABLE outbox (
        kind TEXT NOT NULL, ref INTEGER NOT NULL, seq INTEGER NOT NULL DEFAULT 1,
        series_from REAL NOT NULL, queued REAL NOT NULL,
        PRIMARY KEY (kind, ref)
    );
    CREATE INDEX outbox_queued ON outbox (queued);
    """,
    # 3: routing decisions (policies/submit.py DecisionLog, /api/v1/decisions). IF NOT EXISTS: a
    # ledger where `greend submit` already created the table keeps it (same schema).
    """
    CREATE TABLE IF NOT EXISTS decisions (
        id INTEGER PRIMARY KEY,
        token TEXT NOT NULL UNIQUE,
        t REAL NOT NULL,
        user TEXT NOT NULL,
        uid INTEGER NOT NULL,
        script TEXT,
        job_name TEXT NOT NULL DEFAULT '',
        account TEXT NOT NULL DEFAULT '',
        outcome TEXT NOT NULL,
        cluster TEXT,
        tier TEXT,
        partition TEXT,
        job_id TEXT,
        begin REAL,
        nice INTEGER,
        energy_j REAL,
        carbon_g REAL,
        water_l REAL,
        tried TEXT NOT NULL DEFAULT '[]',
        decision TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS decisions_job ON decisions (cluster, job_id);
    CREATE INDEX IF NOT EXISTS decisions_user ON decisions (user, t);
    """,
    # 4: phases of a job or a tracked run (greend.track's run.phase, POST /api/v1/phases):
    # each phase's figures from its start to its end (t_end NULL: open, figures so far).
    """
    CREATE TABLE IF NOT EXISTS job_phases (
        job_pk INTEGER NOT NULL REFERENCES jobs (pk),
        seq INTEGER NOT NULL, name TEXT NOT NULL, t_start REAL NOT NULL, t_end REAL,
        cpu_j REAL NOT NULL, dram_j REAL NOT NULL, gpu_j REAL NOT NULL, memory_j REAL NOT NULL,
        facility_j REAL NOT NULL, carbon_g REAL NOT NULL, water_site_l REAL NOT NULL,
        water_offsite_l REAL NOT NULL, cpu_time_ns INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_pk, seq)
    ) WITHOUT ROWID;
    """,
]


@dataclass(slots=True)
class JobRow:
    """A job's record as stored: identity, metadata and cumulative totals."""

    cluster: str
    job_id: str
    node: str
    kind: str
    state: str
    first_seen: float
    last_seen: float
    submit_time: int = 0
    name: str = ""
    user: str = ""
    uid: int | None = None
    account: str = ""
    partition: str = ""
    tier: str = ""
    alloc_cpus: float | None = None
    alloc_mem_bytes: int | None = None
    alloc_gpus: int | None = None
    end_time: float | None = None
    cpu_time_ns: int = 0
    cpu_uj: int = 0
    dram_uj: int = 0
    gpu_uj: int = 0
    memory_uj: int = 0
    facility_j: float = 0.0
    carbon_g: float = 0.0
    water_site_l: float = 0.0
    water_offsite_l: float = 0.0
    max_mem_bytes: int = 0
    provenance: dict | None = None
    command: str | None = None
    exit_code: int | None = None
    meta: dict | None = None
    pk: int | None = None

    @property
    def it_energy_uj(self) -> int:
        return self.cpu_uj + self.dram_uj + self.gpu_uj + self.memory_uj

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__slots__ if k != "pk"}
        d["it_energy_j"] = self.it_energy_uj / 1e6
        d["water_l"] = self.water_site_l + self.water_offsite_l
        return d


_JOB_COLS = [c for c in JobRow.__slots__ if c != "pk"]


def _row_to_job(r: sqlite3.Row) -> JobRow:
    d = dict(r)
    d["provenance"] = json.loads(d["provenance"] or "{}")
    d["meta"] = json.loads(d["meta"] or "{}")
    return JobRow(**d)


def default_path(state_dir: Path) -> Path:
    return Path(state_dir) / LEDGER_FILE


STATE_DIR_MODE = 0o750  # the ledger holds every user's jobs: not for other users to read
LEDGER_MODE = 0o640  # SQLite gives the -wal and -shm files the same mode as the ledger


def _make_private_dir(path: Path) -> None:
    """Create the state directory (and missing parents) 0750 whatever the umask; an existing
    directory is left as the admin made it."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for p in missing:
        os.chmod(p, STATE_DIR_MODE)


def _create_private(path: Path) -> None:
    """Create the ledger file 0640 whatever the umask, before SQLite creates it 0644."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     LEDGER_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, LEDGER_MODE)
    finally:
        os.close(fd)


def _is_full(e: sqlite3.Error) -> bool:
    return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(e)


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection. A reader of a WAL database needs its -shm file, which SQLite creates
    next to it: in a directory the reader may not write to (a ledger copied for an admin, a
    read-only mount) it cannot. A ledger closed cleanly has no -wal file left, so it is then read
    as the immutable file it is; one with a -wal (its daemon running, or stopped abruptly) cannot
    be read this way, and the error says what would let it be read."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
    try:
        db.execute("PRAGMA user_version").fetchone()  # opens the database (and its WAL index)
        return db
    except sqlite3.OperationalError as e:
        db.close()
        cannot_make_shm = "readonly" in str(e) or "unable to open" in str(e)
        if not cannot_make_shm or os.access(path.parent, os.W_OK):
            raise
        wal = Path(f"{path}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise LedgerError(
                f"{path}: cannot read the ledger: its latest writes are in {wal.name}, and reading "
                f"them needs {path.name}-shm, which uid {os.geteuid()} cannot create in "
                f"{path.parent} (read it through the daemon's socket, or as a user who may write "
                "to that directory)") from None
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, timeout=10,
                           check_same_thread=False)


class Ledger:
    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        try:
            if readonly:
                if not self.path.exists():
                    raise LedgerError(f"{self.path}: no ledger here (has greend run on this node?)")
                self.db = _connect_readonly(self.path)
            else:
                try:
                    _make_private_dir(self.path.parent)
                except OSError as e:
                    raise LedgerError(
                        f"{self.path.parent}: cannot create the state directory ({e.strerror}); "
                        "choose another with --state-dir or GREEND_STATE_DIR"
                    ) from None
                if not os.access(self.path.parent, os.W_OK):
                    raise LedgerError(
                        f"{self.path.parent}: state directory is not writable by uid "
                        f"{os.geteuid()}; choose another with --state-dir or GREEND_STATE_DIR"
                    )
                _create_private(self.path)
                self.db = sqlite3.connect(self.path, timeout=10, check_same_thread=False,
                                          isolation_level=None)
            self.db.row_factory = sqlite3.Row
            if not readonly:
                self.db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a committed checkpoint survives a process crash (kill -9);
                # only a power loss can take back the last commits, never corrupt the file.
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
            else:
                self._check_version()
        except PermissionError as e:
            raise LedgerError(f"{self.path}: permission denied ({e.strerror})") from None
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"{self.path}: cannot open ledger: {e}") from None
        except OSError as e:
            raise LedgerError(f"{self.path}: {e.strerror or e}") from None

    # -- schema ---------------------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _check_version(self) -> None:
        v = self.schema_version
        if v > len(MIGRATIONS):
            raise LedgerError(
                f"{self.path}: ledger schema version {v} is newer than this greend understands "
                f"({len(MIGRATIONS)}): upgrade greend"
            )

    def _migrate(self) -> None:
        self._check_version()
        v = self.schema_version
        for i, script in enumerate(MIGRATIONS[v:], start=v + 1):
            log.info("ledger %s: migrating schema to version %d", self.path, i)
            with self.transaction():
                for stmt in script.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version = {i}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._write_error("cannot begin a transaction", e) from None
        try:
            yield self.db
        except sqlite3.OperationalError as e:
            self._rollback()
            if _is_full(e):
                raise self._write_error("write failed", e) from None
            raise
        except BaseException:
            self._rollback()
            raise
        else:
            try:
                self.db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self._rollback()
                raise self._write_error("commit failed", e) from None

    def _rollback(self) -> None:
        # SQLite rolls a transaction back by itself on some errors (SQLITE_FULL, SQLITE_IOERR):
        # a ROLLBACK then fails with "no transaction is active" and would hide the real cause.
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.OperationalError as e:
                log.warning("ledger %s: rollback failed: %s", self.path, e)

    def _write_error(self, what: str, e: sqlite3.Error) -> LedgerError:
        """A LedgerError naming the real cause: for a full disk, the path and the bytes free."""
        if _is_full(e):
            try:
                st = os.statvfs(self.path.parent)
                free = f"{st.f_bavail * st.f_frsize} bytes free"
            except OSError:
                free = "free space unknown"
            return LedgerError(f"{self.path}: {what}: no space left on device ({free} on "
                               f"{self.path.parent}; SQLite: {e})")
        return LedgerError(f"{self.path}: {what}: {e}")

    def close(self) -> None:
        self.db.close()

    # -- writing --------------------------------------------------------------------------------
    def upsert_job(self, db: sqlite3.Connection, job: JobRow) -> int:
        vals = {c: getattr(job, c) for c in _JOB_COLS}
        vals["provenance"] = json.dumps(job.provenance or {}, sort_keys=True)
        vals["meta"] = json.dumps(job.meta or {}, sort_keys=True)
        if job.pk is not None:
            # A row written before is updated by its pk, identity included: a provisional
            # submit_time corrected from Slurm's metadata moves the row instead of adding one.
            keep = ("first_seen",)
            for _ in range(2):
                # first_seen only moves earlier: a run's start known after its first write (the
                # exec time of a measured command) corrects the stored one.
                sets = ", ".join(f"{c} = :{c}" for c in _JOB_COLS if c not in keep)
                sets += ", first_seen = min(first_seen, :first_seen)"
                try:
                    if db.execute(f"UPDATE jobs SET {sets} WHERE pk = :pk",
                                  {**vals, "pk": job.pk}).rowcount:
                        return job.pk
                    break
                except sqlite3.IntegrityError:
                    # Another row holds the new identity: keep this row's, never merge two jobs.
                    keep = ("first_seen", "cluster", "job_id", "submit_time", "node")
        cols = ", ".join(_JOB_COLS)
        marks = ", ".join(f":{c}" for c in _JOB_COLS)
        updates = ", ".join(
            f"{c} = excluded.{c}" for c in _JOB_COLS
            if c not in ("cluster", "job_id", "submit_time", "node", "first_seen")
        )
        row = db.execute(
            f"INSERT INTO jobs ({cols}) VALUES ({marks}) "
            f"ON CONFLICT (cluster, job_id, submit_time, node) DO UPDATE SET {updates} "
            "RETURNING pk",
            vals,
        ).fetchone()
        job.pk = row[0]
        return job.pk

    def put_factor_set(self, db: sqlite3.Connection, key: str, f, t: float) -> None:
        db.execute(
            "INSERT OR IGNORE INTO factor_sets VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, f.pue, f.wue_site_l_per_kwh, f.ewif_l_per_kwh, f.carbon_intensity_g_per_kwh,
             json.dumps(f.sources, sort_keys=True), t),
        )

    def put_series(self, db: sqlite3.Connection, rows: Iterable[tuple]) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO job_series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
        )

    def put_node_totals(self, db: sqlite3.Connection, node: str, rows: Iterable[tuple]) -> None:
        """Set a node's totals (domain, source, provenance, energy, unattributed, idle)."""
        db.executemany(
            "INSERT OR REPLACE INTO node_totals VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((node, *r) for r in rows),
        )

    def add_node_totals(self, db: sqlite3.Connection, node: str, rows: Iterable[tuple]) -> None:
        """Add to a node's totals: rows of (domain, source, provenance, +energy, +unattributed,
        +idle). Every writer on the node (the daemon, each `greend measure`) adds what it measured
        since its last checkpoint, so concurrent writers never overwrite one another."""
        db.executemany(
            "INSERT INTO node_totals VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node, domain) DO "
            "UPDATE SET source = excluded.source, provenance = excluded.provenance, "
            "energy_uj = energy_uj + excluded.energy_uj, "
            "unattributed_uj = unattributed_uj + excluded.unattributed_uj, "
            "idle_uj = idle_uj + excluded.idle_uj",
            ((node, *r) for r in rows),
        )

    def put_node_series(self, db: sqlite3.Connection, node: str, rows: Iterable[tuple]) -> None:
        """Set a node's series buckets (t_start, t_end, energy, unattributed)."""
        db.executemany(
            "INSERT OR REPLACE INTO node_series VALUES (?, ?, ?, ?, ?)", ((node, *r) for r in rows)
        )

    def add_node_series(self, db: sqlite3.Connection, node: str, rows: Iterable[tuple]) -> None:
        """Add to a node's series buckets: rows of (t_start, t_end, +energy, +unattributed); see
        add_node_totals. A bucket's t_end is the latest any writer saw."""
        db.executemany(
            "INSERT INTO node_series VALUES (?, ?, ?, ?, ?) ON CONFLICT (node, t_start) DO UPDATE "
            "SET t_end = max(t_end, excluded.t_end), energy_uj = energy_uj + excluded.energy_uj, "
            "unattributed_uj = unattributed_uj + excluded.unattributed_uj",
            ((node, *r) for r in rows),
        )

    def merge_series(self, db: sqlite3.Connection, job_pk: int, step_s: float) -> None:
        """Re-bucket a job's series at a coarser step (aligned to multiples of step_s): sums of
        every figure, the latest t_end. A long `greend measure` run keeps a bounded series."""
        rows = db.execute("SELECT * FROM job_series WHERE job_pk = ?", (job_pk,)).fetchall()
        merged: dict[tuple[float, str], list] = {}
        for r in rows:
            k = (math.floor(r["t_start"] / step_s) * step_s, r["factor_set"])
            m = merged.setdefault(k, [r["t_end"], 0, 0, 0, 0, 0, 0.0, 0.0, 0.0])
            m[0] = max(m[0], r["t_end"])
            for i, c in enumerate(("cpu_uj", "dram_uj", "gpu_uj", "memory_uj", "cpu_time_ns",
                                   "carbon_g", "water_site_l", "water_offsite_l"), start=1):
                m[i] += r[c]
        db.execute("DELETE FROM job_series WHERE job_pk = ?", (job_pk,))
        self.put_series(db, ((job_pk, tb, m[0], fk, *m[1:]) for (tb, fk), m in merged.items()))

    def put_counters(self, db: sqlite3.Connection, node: str, t: float, state: dict) -> None:
        db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?, ?)",
                   (node, t, json.dumps(state, separators=(",", ":"))))

    # -- reading --------------------------------------------------------------------------------
    def counters(self, node: str) -> tuple[float, dict] | None:
        r = self.db.execute("SELECT t, state FROM counters WHERE node = ?", (node,)).fetchone()
        return (r[0], json.loads(r[1])) if r else None

    def node_totals(self, node: str) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM node_totals WHERE node = ?", (node,)).fetchall()

    def last_series_step(self, job_pk: int) -> list[sqlite3.Row]:
        """A job's series rows of its latest step (one per factor set), which a restart carries on."""
        return self.db.execute(
            "SELECT * FROM job_series WHERE job_pk = ? AND t_start = "
            "(SELECT MAX(t_start) FROM job_series WHERE job_pk = ?)", (job_pk, job_pk),
        ).fetchall()

    def last_node_series(self, node: str) -> sqlite3.Row | None:
        return self.db.execute(
            "SELECT * FROM node_series WHERE node = ? ORDER BY t_start DESC LIMIT 1", (node,)
        ).fetchone()

    def running_jobs(self, node: str) -> list[JobRow]:
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE node = ? AND state = 'running'", (node,)
        ).fetchall()
        return [_row_to_job(r) for r in rows]

    def get_job(self, cluster: str, job_id: str, node: str | None = None) -> list[JobRow]:
        q = "SELECT * FROM jobs WHERE cluster = ? AND job_id = ?"
        args: list = [cluster, job_id]
        if node:
            q += " AND node = ?"
            args.append(node)
        return [_row_to_job(r) for r in self.db.execute(q + " ORDER BY first_seen", args)]

    def jobs(self, *, user: str | None = None, account: str | None = None,
             cluster: str | None = None, state: str | None = None, kind: str | None = None,
             since: float | None = None, until: float | None = None,
             limit: int = 100, offset: int = 0) -> list[JobRow]:
        where, args = [], []
        for col, val in (("user", user), ("account", account), ("cluster", cluster),
                         ("state", state), ("kind", kind)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if since is not None:
            where.append("last_seen >= ?")
            args.append(since)
        if until is not None:
            where.append("first_seen <= ?")
            args.append(until)
        q = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        q += " ORDER BY last_seen DESC, pk DESC LIMIT ? OFFSET ?"
        args += [limit, offset]
        return [_row_to_job(r) for r in self.db.execute(q, args)]

    def series(self, job_pk: int) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT s.*, f.pue, f.wue_site_l_per_kwh, f.ewif_l_per_kwh, "
            "f.carbon_intensity_g_per_kwh, f.sources FROM job_series s "
            "JOIN factor_sets f ON f.id = s.factor_set WHERE job_pk = ? ORDER BY t_start",
            (job_pk,),
        ).fetchall()

    def factor_sets_of(self, job_pk: int) -> list[dict]:
        rows = self.db.execute(
            "SELECT DISTINCT f.* FROM job_series s JOIN factor_sets f ON f.id = s.factor_set "
            "WHERE s.job_pk = ? ORDER BY f.first_used", (job_pk,),
        ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["sources"] = json.loads(d["sources"])
            out.append(d)
        return out
