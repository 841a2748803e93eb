"""Phases of a job or a tracked run (greend.track's `run.phase(name)`): the books at each phase
boundary, the daemon's `POST /api/v1/phases`, and the phases in the ledger (`job_phases`).

A phase's figures are the difference of the job's cumulative books at its two boundaries, so a
run's contiguous phases sum exactly to the job's books over their span. The daemon reads its
counters once an interval, not at each boundary: it answers a boundary at once with an estimate
(`books_at`), and once a reading at or after the boundary is known it settles the boundary's books
by linear interpolation between the readings around it (`JobPhases.settle`), which is what it
stores (docs/api.md, `POST /api/v1/phases`). Light to import (no pydantic, no h11): greend.track
uses `Books` in the researcher's process.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

PHASES_PATH = "/api/v1/phases"
MAX_PHASES = 1000  # per job: the oldest closed phases beyond this are refused, not overwritten
MAX_NAME = 200  # characters of a phase name
PER_MINUTE = 600  # phase boundaries a user may post per minute (all their jobs together)
SLACK_S = 5.0  # a boundary's t may differ from the daemon's clock by this much, no more
MAX_BODY = 4096
FORCED_TICK_S = 1.0  # an unknown job's boundary makes the daemon sample now, at most this often
SOURCES = ("cpu", "dram", "gpu", "memory")


@dataclass(frozen=True, slots=True)
class Books:
    """A job's cumulative books at time t: IT energy by source (J), facility energy, carbon
    and water. Differences of two Books are a phase's figures."""

    t: float
    cpu_j: float = 0.0
    dram_j: float = 0.0
    gpu_j: float = 0.0
    memory_j: float = 0.0
    facility_j: float = 0.0
    carbon_g: float = 0.0
    water_site_l: float = 0.0
    water_offsite_l: float = 0.0
    cpu_s: float = 0.0  # the job's CPU time (as of the last reading: not extrapolated)

    @property
    def it_j(self) -> float:
        return self.cpu_j + self.dram_j + self.gpu_j + self.memory_j

    def minus(self, earlier: Books) -> Books:
        """The figures from `earlier` to self (t: the span's length), never negative."""
        return Books(self.t - earlier.t, *(max(0.0, a - b) for a, b in
                                           zip(self.values(), earlier.values(), strict=True)),
                     cpu_s=max(0.0, self.cpu_s - earlier.cpu_s))

    def values(self) -> tuple[float, ...]:
        return (self.cpu_j, self.dram_j, self.gpu_j, self.memory_j, self.facility_j,
                self.carbon_g, self.water_site_l, self.water_offsite_l)

    def at_least(self, other: Books | None) -> Books:
        """These books, each figure no lower than other's: cumulative books never go back, even
        when a boundary's extrapolation ran ahead of what the next reading then measured."""
        if other is None:
            return self
        return Books(self.t, *(max(a, b) for a, b in zip(self.values(), other.values(), strict=True)),
                     cpu_s=max(self.cpu_s, other.cpu_s))

    def between(self, later: Books, t: float) -> Books:
        """The books at t by linear interpolation from self (a reading) to `later` (the next one),
        every figure and the CPU time alike; t outside the two is held to the nearer reading."""
        span = later.t - self.t
        k = 0.0 if span <= 0 else min(1.0, max(0.0, (t - self.t) / span))
        return Books(t, *(a + (b - a) * k for a, b in zip(self.values(), later.values(), strict=True)),
                     cpu_s=self.cpu_s + (later.cpu_s - self.cpu_s) * k)

    def as_of(self, t: float) -> Books:
        """The same figures, as at time t."""
        return Books(t, *self.values(), cpu_s=self.cpu_s)

    def scaled(self, k: float, t: float) -> Books:
        return Books(t, *(v * k for v in self.values()), cpu_s=self.cpu_s)

    @classmethod
    def of_row(cls, row, t: float) -> Books:
        """A ledger row's (JobRow's) cumulative books, as at time t."""
        return cls(t, row.cpu_uj / 1e6, row.dram_uj / 1e6, row.gpu_uj / 1e6, row.memory_uj / 1e6,
                   row.facility_j, row.carbon_g, row.water_site_l, row.water_offsite_l,
                   row.cpu_time_ns / 1e9)

    def to_dict(self) -> dict:
        return {"t": self.t, "energy_by_source_j": dict(zip(SOURCES, self.values()[:4], strict=True)),
                "it_energy_j": self.it_j, "facility_energy_j": self.facility_j,
                "carbon_g": self.carbon_g, "water_site_l": self.water_site_l,
                "water_offsite_l": self.water_offsite_l, "cpu_time_s": self.cpu_s}

    @classmethod
    def from_dict(cls, d: dict) -> Books:
        e = d.get("energy_by_source_j") or {}
        return cls(float(d["t"]), *(float(e.get(s, 0.0)) for s in SOURCES),
                   float(d["facility_energy_j"]), float(d["carbon_g"]), float(d["water_site_l"]),
                   float(d["water_offsite_l"]), float(d.get("cpu_time_s") or 0.0))


@dataclass(slots=True)
class Phase:
    seq: int
    name: str
    start: Books
    end: Books | None = None
    written: bool = False
    start_exact: bool = True  # False: the daemon's live estimate, until settled from readings
    end_exact: bool = True

    def to_dict(self, now: Books | None = None) -> dict:
        """The phase's record: its figures from start to end (or to `now` while open)."""
        last = self.end or now
        d = last.minus(self.start) if last is not None else Books(0.0)
        return phase_json(self.seq, self.name, self.start.t, self.end.t if self.end else None, d)


def phase_json(seq: int, name: str, start: float, end: float | None, d: Books) -> dict:
    """A phase as the job-footprint JSON carries it (docs/json.md, `phases[]`): its span and its
    figures (d: the books' difference over the span)."""
    e = dict(zip(SOURCES, d.values()[:4], strict=True))
    return {"seq": seq, "name": name, "start": start, "end": end,
            "elapsed_s": (end - start) if end is not None else None, "cpu_time_s": d.cpu_s,
            "energy_j": {**e, "it": d.it_j, "facility": d.facility_j}, "carbon_g": d.carbon_g,
            "water_l": {"site": d.water_site_l, "offsite": d.water_offsite_l,
                        "total": d.water_site_l + d.water_offsite_l}}


class TooMany(ValueError):
    """A job already has MAX_PHASES phases."""


MAX_READINGS = 64  # a job's readings kept to settle its boundaries (one per tick seen at most)


@dataclass(slots=True)
class JobPhases:
    phases: list[Phase] = field(default_factory=list)
    dirty: bool = False
    readings: list[Books] = field(default_factory=list)  # the job's books as read, t ascending
    settled: int = 0  # phases before this index have both boundaries settled

    @property
    def last(self) -> Books | None:
        """The books at the latest boundary."""
        if not self.phases:
            return None
        p = self.phases[-1]
        return p.end or p.start

    @property
    def open(self) -> Phase | None:
        p = self.phases[-1] if self.phases else None
        return p if p is not None and p.end is None else None

    def boundary(self, name: str | None, books: Books, estimated: bool = False) -> Phase | None:
        """End the open phase at `books`; start `name` there (None: start none). estimated: the
        books are the daemon's live estimate, which `settle` replaces once readings bracket it
        (a self-sampled run reads its counters at the boundary: exact)."""
        if name is not None and len(self.phases) >= MAX_PHASES:
            raise TooMany(f"a job has at most {MAX_PHASES} phases")
        cur = self.open
        if cur is not None:
            cur.end = books
            cur.end_exact = not estimated
            cur.written = False
        new = None
        if name is not None:
            new = Phase(len(self.phases) + 1, name, books, start_exact=not estimated)
            self.phases.append(new)
        self.dirty = self.dirty or cur is not None or new is not None
        return new

    def reading(self, books: Books) -> None:
        """A reading of the job's books (at a monitor tick: books.t is the tick's time)."""
        rs = self.readings
        if rs and books.t <= rs[-1].t:
            if books.t == rs[-1].t:
                rs[-1] = books
            return
        rs.append(books)
        if len(rs) > MAX_READINGS:  # a boundary waiting that long settles between the two kept
            del rs[1]

    def _at(self, t: float, final: bool) -> Books | None:
        """The books at t from the readings, or None while no reading at or after t is known
        (final: the job has ended, its books stay at its last reading)."""
        rs = self.readings
        if not rs:
            return None
        hi = next((i for i, r in enumerate(rs) if r.t >= t), None)
        if hi is None:
            if not final:
                return None
            return rs[-1].as_of(t)
        if hi == 0:  # no reading before t: the boundary comes before the job's first reading
            return rs[0].as_of(t)
        return rs[hi - 1].between(rs[hi], t)

    def settle(self, final: bool = False) -> None:
        """Replace the live estimates of the boundaries that the readings now bracket by the
        interpolated books (the same Books for the end of one phase and the start of the next),
        and drop the readings no unsettled boundary needs. Work: the unsettled phases (the last
        few) and the readings kept."""
        ps = self.phases
        i = self.settled
        while i < len(ps):
            p = ps[i]
            if not p.start_exact:
                b = self._at(p.start.t, final)
                if b is None:
                    break
                if i > 0 and ps[i - 1].end is p.start:  # one boundary: ended one, began this
                    ps[i - 1].end, ps[i - 1].end_exact, ps[i - 1].written = b, True, False
                p.start, p.start_exact, p.written = b, True, False
            if p.end is not None and not p.end_exact:
                b = self._at(p.end.t, final)
                if b is None:
                    break
                if i + 1 < len(ps) and ps[i + 1].start is p.end:
                    ps[i + 1].start, ps[i + 1].start_exact, ps[i + 1].written = b, True, False
                p.end, p.end_exact, p.written = b, True, False
            if p.end is None or not p.end_exact:
                break
            i += 1
        self.settled = i
        # Keep the last reading at or before the first unsettled boundary, and those after it.
        first = None
        if i < len(ps):
            p = ps[i]
            first = p.start.t if not p.start_exact else (p.end.t if p.end is not None else None)
        rs = self.readings
        if first is None:
            del rs[:-1]
        else:
            k = max((j for j, r in enumerate(rs) if r.t <= first), default=0)
            del rs[:k]


# -- the ledger -----------------------------------------------------------------------------------
PUT_SQL = """
INSERT INTO job_phases (job_pk, seq, name, t_start, t_end, cpu_j, dram_j, gpu_j, memory_j,
                        facility_j, carbon_g, water_site_l, water_offsite_l, cpu_time_ns)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (job_pk, seq) DO UPDATE SET name = excluded.name, t_start = excluded.t_start,
    t_end = excluded.t_end, cpu_j = excluded.cpu_j, dram_j = excluded.dram_j,
    gpu_j = excluded.gpu_j, memory_j = excluded.memory_j, facility_j = excluded.facility_j,
    carbon_g = excluded.carbon_g, water_site_l = excluded.water_site_l,
    water_offsite_l = excluded.water_offsite_l, cpu_time_ns = excluded.cpu_time_ns
"""


def put(db, job_pk: int, jp: JobPhases, now: Books) -> None:
    """Write a job's phases not yet written (the open one with its figures up to `now`). A phase
    is final once written with both boundaries settled; one with an estimated boundary is written
    again when it settles."""
    rows = []
    for p in jp.phases:
        if p.written:
            continue
        d = (p.end or now).minus(p.start)
        rows.append((job_pk, p.seq, p.name, p.start.t, p.end.t if p.end else None, *d.values(),
                     round(d.cpu_s * 1e9)))
        if p.end is not None and p.start_exact and p.end_exact:
            p.written = True
    if rows:
        db.executemany(PUT_SQL, rows)
    jp.dirty = False


def of_job(db, job_pk: int) -> list[dict]:
    """A job record's phases from the ledger, in order (empty for a ledger before migration 4)."""
    import sqlite3

    try:
        cur = db.execute("SELECT * FROM job_phases WHERE job_pk = ? ORDER BY seq", (job_pk,))
    except sqlite3.OperationalError:
        return []
    cols = [c[0] for c in cur.description]
    out = []
    for r in cur.fetchall():
        r = dict(zip(cols, r, strict=True))
        d = Books(0.0, r["cpu_j"], r["dram_j"], r["gpu_j"], r["memory_j"], r["facility_j"],
                  r["carbon_g"], r["water_site_l"], r["water_offsite_l"], (r.get("cpu_time_ns") or 0) / 1e9)
        out.append(phase_json(r["seq"], r["name"], r["t_start"], r["t_end"], d))
    return out


# -- the daemon's endpoint --------------------------------------------------------------------------
class PhaseInvalid(ValueError):
    """A boundary that cannot be recorded; the message names the field."""


def validate(obj, now: float, default_cluster: str) -> tuple[str, str, str | None, bool, float]:
    """(cluster, job_id, name or None, end, t) of a posted boundary, or PhaseInvalid naming the
    field. A name starts a phase (ending the open one); end: true only ends the open one;
    neither only answers the books."""
    if not isinstance(obj, dict):
        raise PhaseInvalid("expected a JSON object {job_id, name?, end?, t?, cluster?}")
    unknown = sorted(set(obj) - {"cluster", "job_id", "name", "end", "t"})
    if unknown:
        raise PhaseInvalid(f"unknown field(s): {', '.join(u[:50] for u in unknown[:5])}")
    job_id = obj.get("job_id")
    if isinstance(job_id, int) and not isinstance(job_id, bool) and job_id > 0:
        job_id = str(job_id)
    if not isinstance(job_id, str) or not job_id or len(job_id) > 64 or not job_id.isascii() \
            or not job_id.replace("_", "").replace(".", "").isalnum():
        raise PhaseInvalid("job_id: expected a Slurm job id (1 to 64 letters, digits, '_' or '.')")
    cluster = obj.get("cluster", default_cluster)
    if cluster is None:
        cluster = default_cluster
    if not isinstance(cluster, str) or not cluster or len(cluster) > 128:
        raise PhaseInvalid("cluster: expected a cluster name (1 to 128 characters)")
    name = obj.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise PhaseInvalid("name: expected a string, or null to end the open phase")
        if not name.strip() or len(name) > MAX_NAME:
            raise PhaseInvalid(f"name: expected 1 to {MAX_NAME} characters, not blank")
        if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in name):
            raise PhaseInvalid("name: control characters or lone surrogates are not allowed")
    end = obj.get("end", False)
    if not isinstance(end, bool):
        raise PhaseInvalid("end: expected true or false")
    t = obj.get("t", now)
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise PhaseInvalid("t: expected a Unix time in seconds")
    if abs(t - now) > SLACK_S:
        raise PhaseInvalid(f"t: expected the boundary's time, within {SLACK_S:g} s of the "
                           f"daemon's clock (now {now:.3f})")
    return cluster, job_id, name, end or name is not None, float(t)


def books_at(acc, t: float, t_tick: float, interval_s: float) -> Books:
    """A job's books at t from its account: the books at the monitor's last tick (t_tick), plus
    the part of the next interval up to t at the power of the last interval, in the mix of the
    books so far (the daemon reads its counters every interval_s, not at each boundary)."""
    row = acc.row
    b = Books.of_row(row, t)
    it = b.it_j
    if it <= 0 or t <= t_tick:
        return b
    frac = min(t - t_tick, 2 * interval_s) / interval_s
    return b.scaled(1.0 + acc.last_interval_uj / 1e6 * frac / it, t)


class Endpoint:
    """POST /api/v1/phases on a node daemon: the caller (SO_PEERCRED) records a phase boundary
    of their own running job and gets the job's books at that instant. Phases are kept with the
    daemon's books and written to the ledger in its checkpoints' transaction."""

    def __init__(self, daemon):
        from .decisions import RateLimit

        self.daemon = daemon
        self.jobs: dict[str, JobPhases] = {}
        self.lock = threading.Lock()
        self.rate = RateLimit(PER_MINUTE)
        self.forced = -FORCED_TICK_S
        daemon.monitor.on_checkpoint.append(self.checkpoint)

    def post(self, body: bytes, caller, headers) -> tuple[int, str, bytes]:
        from .http import ApiError, dumps, parse_json
        from .report import footprint_dict

        if caller.uid is None and not caller.admin:
            raise ApiError(403, "phases are taken on the unix socket, where greend knows who asks")
        if len(body) > MAX_BODY:
            raise ApiError(413, f"a phase boundary is at most {MAX_BODY} bytes; this one is {len(body)}")
        now = time.time()
        try:
            cluster, job_id, name, end, t = validate(parse_json(body or b"null", "phase boundary"), now,
                                                self.daemon.monitor.cluster)
        except PhaseInvalid as e:
            raise ApiError(400, f"invalid phase boundary: {e}") from None
        if not caller.admin and not self.rate.allow(caller.user or str(caller.uid)):
            raise ApiError(429, f"over {PER_MINUTE} phase boundaries a minute from {caller.user}: "
                                "retry later")
        key = f"slurm/{cluster}/{job_id}"
        mon = self.daemon.monitor
        if key not in mon.accounts and time.monotonic() - self.forced >= FORCED_TICK_S:
            # A job's first boundary often comes before the daemon's next sample has seen the
            # job: sample now (at most once a FORCED_TICK_S, whoever asks).
            self.forced = time.monotonic()
            try:
                self.daemon.sample()
            except Exception as e:  # the scheduled sample reports it; the caller gets a 404
                import logging

                logging.getLogger(__name__).debug("phases: sampling for job %s failed: %s",
                                                  job_id, e)
        with self.daemon.lock:
            acc = mon.accounts.get(key)
            if acc is None:
                raise ApiError(404, f"job {cluster}/{job_id} is not running on this node "
                                    "(or greend has not seen it yet)")
            if not caller.admin and acc.row.uid != caller.uid:
                raise ApiError(403, f"job {cluster}/{job_id} is not yours ({caller.user}, uid "
                                    f"{caller.uid})")
            t_tick = mon.prev.t if mon.prev is not None else t
            books = books_at(acc, t, t_tick, self.daemon.cfg.sampling.interval_s)
            reading = Books.of_row(acc.row, acc.row.last_seen)
            provenance = dict(acc.row.provenance or {})
            job = footprint_dict(acc.row, [])["job"]
            factors = [mon.factors.at(t).to_dict()]
        ended = new = None
        with self.lock:
            jp = self.jobs.get(key)
            if jp is not None:
                jp.reading(reading)  # the reading right after an earlier boundary, often
                last = jp.last
                if last is not None and t < last.t:  # boundaries stay in order
                    t = last.t
                    books = books.as_of(t)
            books = books.at_least(jp.last if jp is not None else None)
            if end:
                if jp is None:
                    jp = self.jobs[key] = JobPhases()
                    jp.reading(reading)
                ended = jp.open
                try:
                    new = jp.boundary(name, books, estimated=True)
                except TooMany as e:
                    raise ApiError(400, f"invalid phase boundary: name: {e}") from None
        return 200, "application/json", dumps({
            "cluster": cluster, "job_id": job_id, "t": t, "books": books.to_dict(),
            # An estimate unless the boundary is on the last reading: what is stored is settled
            # from the readings around the boundary once the next one is taken.
            "estimated": t != reading.t,
            "provenance": provenance, "source": "daemon", "job": job, "factors": factors,
            "ended": ended.to_dict() if ended is not None else None,
            "phase": {"seq": new.seq, "name": new.name} if new is not None else None})

    def checkpoint(self, db, written) -> None:
        """monitor.on_checkpoint: settle the boundaries that the job's reading now brackets and
        write the phases of the jobs written, in the same transaction; a job that ended settles
        the rest at its final books, closes its open phase there and leaves memory."""
        with self.lock:
            accounts = self.daemon.monitor.accounts
            for key, jp in self.jobs.items():  # a reading of each job with phases, even a quiet
                acc = accounts.get(key)         # one's (not written: its books did not move)
                if acc is not None:
                    jp.reading(Books.of_row(acc.row, acc.row.last_seen))
            for acc in written:
                jp = self.jobs.get(acc.key)
                if jp is None or acc.row.pk is None:
                    continue
                now = Books.of_row(acc.row, acc.row.last_seen)
                done = acc.row.state == "ended"
                jp.reading(now)
                jp.settle(final=done)
                if done and jp.open is not None:  # closes at the job's final books
                    t_end = max(now.t, jp.open.start.t)
                    jp.boundary(None, now.as_of(t_end))
                put(db, acc.row.pk, jp, now)
                if done:
                    del self.jobs[acc.key]
