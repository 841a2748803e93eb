"""`greend.track`: a run's energy, carbon and water from inside Python code, with phases.

Inside a Slurm job on a node where `greend run` answers on its unix socket, each boundary asks the
daemon for the job's books (nothing is sampled in this process); elsewhere a background thread
samples like `greend measure` (greend/track_self.py) and records the run in the user's ledger.
Errors never raise into the caller's code: they degrade the figures' provenance and log one
warning. Light to import: the sampler and the configuration load in the sampler's thread.
"""

from __future__ import annotations

import os
import sys
import time
import types
from _thread import RLock
from dataclasses import dataclass, field

from .phases import MAX_NAME, SOURCES, Books

# json, logging, functools and http.client load where used: `import greend` + greend.track(...)
# stays within a few milliseconds of the interpreter's own start (bench/bench_track.py).

__all__ = ["Footprint", "Phase", "Run", "track"]


@dataclass(frozen=True, slots=True)
class Footprint:
    """A run's or a phase's figures (final once stopped or ended, live while running)."""

    name: str
    elapsed_s: float
    it_energy_j: float
    facility_energy_j: float
    energy_by_source_j: dict
    carbon_g: float
    water_site_l: float
    water_offsite_l: float
    source: str  # "daemon" or "self"
    provenance: str  # measured, modelled or mixed, and how
    degraded: list = field(default_factory=list)  # what failed (empty: nothing)
    cpu_time_s: float = 0.0
    start: float | None = None
    end: float | None = None  # None while running
    run: str = ""  # the run's name (a phase's footprint: its run's)
    phase: str | None = None  # the phase's name, None for the run's own footprint
    project: str | None = None
    job: dict = field(default_factory=dict)  # the job (or tracked run) in the ledger
    factors: list = field(default_factory=list)  # the factor sets in force
    detail: dict = field(default_factory=dict)  # each energy source's provenance

    @property
    def water_l(self) -> float:
        return self.water_site_l + self.water_offsite_l

    def to_dict(self) -> dict:
        """The job-footprint schema's shape (greend/data/job-footprint.schema.json, docs/json.md):
        the job's identity, this run's or phase's figures, and `track` saying which."""
        from .report import SCHEMA_VERSION

        e = {s: self.energy_by_source_j.get(s, 0.0) for s in SOURCES}
        uj = {s: round(v * 1e6) for s, v in e.items()}
        uj["it"] = sum(uj.values())
        return {
            "schema_version": SCHEMA_VERSION,
            "job": dict(self.job),
            "elapsed_s": round(max(0.0, self.elapsed_s), 3),
            "cpu_time_s": round(self.cpu_time_s, 6),
            "energy_j": {**e, "it": self.it_energy_j, "facility": self.facility_energy_j},
            "energy_uj": uj,
            "carbon_g": self.carbon_g,
            "water_l": {"site": self.water_site_l, "offsite": self.water_offsite_l,
                        "total": self.water_l},
            "provenance": dict(self.detail),
            "factors": list(self.factors),
            "track": {"run": self.run, "phase": self.phase, "project": self.project,
                      "source": self.source, "provenance": self.provenance,
                      "degraded": list(self.degraded), "start": self.start, "end": self.end},
        }


def _job_template(run: Run) -> dict:
    """The job block when no backend gave one (nothing could be measured)."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    t = run._start.t if run._start else time.time()
    return {"cluster": "", "job_id": "", "node": socket.gethostname(), "kind": "command",
            "name": run.name or "", "user": user, "account": run.project or "", "partition": "",
            "state": "running", "command": None, "exit_code": None, "outcome": None,
            "slurm_state": None, "submit_time": int(t), "first_seen": t, "last_seen": t,
            "end_time": None, "tier": "", "uid": os.getuid(), "alloc_cpus": None,
            "alloc_mem_bytes": None, "alloc_gpus": None, "max_mem_bytes": 0}


def _footprint(start: Books, end: Books, run: Run, *, final: bool, phase: str | None = None) -> Footprint:
    d = end.minus(start)
    kinds = {p.split(":", 1)[0] for p in run.detail.values() if p}
    kind = "mixed" if len(kinds) > 1 else (kinds.pop() if kinds else "modelled")
    if run.source == "daemon":
        why = f"{kind}: the greend daemon's books of Slurm job {run.job_label}"
    else:
        why = (f"{kind}: sampled in this process every {run.interval_s:g} s (this process and "
               "its children)")
    if run.degraded:
        why += "; degraded: " + "; ".join(run.degraded)
    return Footprint(
        name=phase if phase is not None else (run.name or "run"), elapsed_s=d.t,
        it_energy_j=d.it_j, facility_energy_j=d.facility_j,
        energy_by_source_j=dict(zip(SOURCES, d.values()[:4], strict=True)), carbon_g=d.carbon_g,
        water_site_l=d.water_site_l, water_offsite_l=d.water_offsite_l, source=run.source,
        provenance=why, degraded=list(run.degraded), cpu_time_s=d.cpu_s, start=start.t,
        end=end.t if final else None, run=run.name or "run", phase=phase, project=run.project,
        job=dict(run.job or _job_template(run)), factors=list(run.factors),
        detail=dict(run.detail))


class Phase:
    """A named part of a run (`run.phase("eval")`); a context manager that ends it on exit."""

    def __init__(self, run: Run, name: str, start: Books):
        self.run = run
        self.name = name
        self.start_books = start
        self.end_books: Books | None = None

    @property
    def ended(self) -> bool:
        return self.end_books is not None

    def end(self) -> Footprint:
        """End this phase (if it is the run's current one) and return its footprint."""
        if self.end_books is None:
            self.run._end_phase(self)
        return self.footprint

    @property
    def footprint(self) -> Footprint:
        end = self.end_books or self.run._books_now(exact=False)
        return _footprint(self.start_books, end, self.run, final=self.ended, phase=self.name)

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, *exc) -> None:
        self.end()

    def __repr__(self) -> str:
        return f"<greend.Phase {self.name!r}{' ended' if self.ended else ''}>"


class Run:
    """One tracked run: `with greend.track("finetune") as run:`, `run.start()`/`run.stop()`,
    or a decorator. The backend (the daemon, or self-sampling) is chosen at start."""

    def __init__(self, name: str | None = None, *, project: str | None = None,
                 interval_s: float = 1.0, record: bool = True, state_dir=None):
        self.name = name
        self.project = project
        self.interval_s = float(interval_s) if interval_s and interval_s > 0 else 1.0
        self.record = record
        self.state_dir = state_dir
        self.phases: list[Phase] = []
        self.current_phase: Phase | None = None
        self.source = "self"
        self.degraded: list[str] = []
        self.detail: dict[str, str] = {}
        self.factors: list = []
        self.job: dict | None = None
        self.job_label = ""
        self._backend = None
        self._start: Books | None = None
        self._stop: Books | None = None
        self._lock = RLock()
        self._warned = False

    # -- degrading, never raising -----------------------------------------------------------------
    def _degrade(self, what: str) -> None:
        if what not in self.degraded:
            self.degraded.append(what)
        if not self._warned:
            self._warned = True
            import logging

            logging.getLogger("greend").warning(
                "greend.track %s: %s (figures degraded; the run goes on)", self.name or "run", what)

    def _books_now(self, exact: bool = True, phase: str | None = None, boundary: bool = False) -> Books:
        b = self._backend
        try:
            if b is not None:
                return b.books(exact=exact, phase=phase, boundary=boundary)
        except Exception as e:  # never into the user's code
            self._degrade(f"{type(e).__name__}: {e}")
        last = self._start or Books(time.time())
        return last.as_of(time.time()) if b is None else b.last_books(last)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> Run:
        with self._lock:
            if self._backend is not None:
                return self
            if self.name is None:
                self.name = os.path.basename(sys.argv[0] or "") or "python"
            try:
                self._backend = _choose_backend(self)
                self._start = self._backend.begin()
            except Exception as e:
                self._degrade(f"could not start measuring: {type(e).__name__}: {e}")
                self._backend = _Nothing()
                self._start = self._backend.begin()
        return self

    def stop(self) -> Footprint:
        with self._lock:
            if self._backend is None:
                self.start()
            if self._stop is None:
                cur = self.current_phase
                try:
                    self._stop = self._backend.finish(self.current_phase is not None)
                except Exception as e:
                    self._degrade(f"{type(e).__name__}: {e}")
                    self._stop = self._books_now(exact=False)
                if cur is not None:
                    cur.end_books = self._stop
                    self.current_phase = None
        return self.footprint

    def phase(self, name: str) -> Phase:
        """End the current phase (if any) and start `name` (at most MAX_NAME characters, control
        characters as spaces: what the daemon and the ledger take)."""
        name = "".join(" " if ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF else c
                       for c in str(name)).strip()[:MAX_NAME] or "phase"
        with self._lock:
            if self._backend is None:
                self.start()
            if self._stop is not None:
                self._degrade(f"phase {name!r} started after the run stopped: not measured")
                p = Phase(self, name, self._stop)
                p.end_books = self._stop
                return p
            books = self._books_now(phase=name, boundary=True)
            if self.current_phase is not None:
                self.current_phase.end_books = books
            p = Phase(self, name, books)
            self.phases.append(p)
            self.current_phase = p
            return p

    def _end_phase(self, p: Phase) -> None:
        with self._lock:
            if p.end_books is not None:
                return
            if p is not self.current_phase:
                p.end_books = self._books_now(exact=False)
                return
            p.end_books = self._books_now(phase=None, boundary=True)
            self.current_phase = None

    @property
    def footprint(self) -> Footprint:
        start = self._start or Books(time.time())
        end = self._stop or self._books_now(exact=False)
        return _footprint(start, end, self, final=self._stop is not None)

    @property
    def running(self) -> bool:
        return self._backend is not None and self._stop is None

    def __enter__(self) -> Run:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __call__(self, fn):
        """As a decorator: each call of fn is one run with this run's settings."""
        settings = dict(name=self.name or getattr(fn, "__qualname__", None), project=self.project,
                        interval_s=self.interval_s, record=self.record, state_dir=self.state_dir)

        import functools

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with Run(**settings) as run:
                wrapper.last_run = run
                return fn(*args, **kwargs)

        wrapper.last_run = None
        return wrapper

    def __repr__(self) -> str:
        return f"<greend.Run {self.name!r} source={self.source}>"


def track(name=None, *, project: str | None = None, interval_s: float = 1.0, record: bool = True,
          state_dir=None) -> Run:
    """A run to measure: a context manager, start()/stop(), or a decorator (`@greend.track` bare
    or `@greend.track("name")`). See docs/python.md."""
    if callable(name):  # @greend.track, bare
        return Run(None, project=project, interval_s=interval_s, record=record,
                   state_dir=state_dir)(name)
    return Run(name, project=project, interval_s=interval_s, record=record, state_dir=state_dir)


# -- backends --------------------------------------------------------------------------------------
class _Nothing:
    """No way to measure: zero figures, the run goes on."""

    def begin(self) -> Books:
        return Books(time.time())

    def books(self, exact=True, phase=None, boundary=False) -> Books:
        return Books(time.time())

    def last_books(self, last: Books) -> Books:
        return Books(time.time(), *last.values())

    def finish(self, phase_open: bool) -> Books:
        return Books(time.time())


def daemon_socket(state_dir=None) -> str | None:
    """The node daemon's API socket a run asks: $GREEND_SOCKET, else the clients' usual places
    (httpclient.daemon_sockets: root's daemon's, then one this user's daemon made in the state
    directory), the first that exists."""
    from .httpclient import RUN_DIR, daemon_sockets

    sd = state_dir or os.environ.get("GREEND_STATE_DIR")
    # No state directory: RUN_DIR as one, so that only root's daemon's socket is a candidate.
    cands = daemon_sockets(os.environ.get("GREEND_SOCKET") or None, sd or RUN_DIR)
    return next((str(c) for c in cands if c.exists()), None)


class DaemonClient:
    """A kept-alive HTTP connection to the daemon's unix socket, for phase boundaries."""

    def __init__(self, path: str, timeout: float = 2.0):
        from .httpclient import UnixHTTPConnection

        self.path = path
        self.conn = UnixHTTPConnection(path, timeout)

    def post(self, target: str, obj: dict) -> tuple[int, dict]:
        import http.client
        import json

        body = json.dumps(obj).encode()
        for attempt in (0, 1):
            try:
                self.conn.request("POST", target, body=body,
                                  headers={"Content-Type": "application/json"})
                r = self.conn.getresponse()
                data = r.read()
                break
            except (OSError, http.client.HTTPException):
                self.conn.close()  # the daemon closed a kept-alive connection: once more
                if attempt:
                    raise
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, {"error": data[:200].decode(errors="replace")}

    def close(self) -> None:
        self.conn.close()


class _Daemon:
    """Books from the node daemon, one request per boundary (POST /api/v1/phases)."""

    def __init__(self, run: Run, client: DaemonClient, cluster: str | None, job_id: str):
        self.run = run
        self.client = client
        self.cluster = cluster
        self.job_id = job_id
        self.last: Books | None = None

    def ask(self, name: str | None, end: bool = False) -> Books:
        from .phases import PHASES_PATH

        body = {"job_id": self.job_id, "t": time.time()}
        if name is not None:
            body["name"] = name
        elif end:
            body["end"] = True
        if self.cluster:
            body["cluster"] = self.cluster
        status, d = self.client.post(PHASES_PATH, body)
        if status != 200:
            raise RuntimeError(f"greend daemon: HTTP {status}: {d.get('error', '')}")
        run = self.run
        run.detail = d.get("provenance") or run.detail
        run.job = d.get("job") or run.job
        run.factors = d.get("factors") or run.factors
        self.last = Books.from_dict(d["books"])
        return self.last

    def begin(self) -> Books:
        # _choose_backend asked already, to know the daemon answers: that answer is the start.
        return self.last or self.ask(None)

    def books(self, exact=True, phase=None, boundary=False) -> Books:
        return self.ask(phase, end=True) if boundary else self.ask(None)

    def last_books(self, last: Books) -> Books:
        return self.last or last

    def finish(self, phase_open: bool) -> Books:
        try:
            return self.ask(None, end=phase_open)
        finally:
            self.client.close()


def _choose_backend(run: Run):
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        sock = daemon_socket(run.state_dir)
        if sock is not None:
            be = _Daemon(run, DaemonClient(sock), os.environ.get("SLURM_CLUSTER_NAME"), job_id)
            try:
                be.begin()
            except Exception as e:
                be.client.close()
                run._degrade(f"the greend daemon at {sock} did not give job {job_id}'s books "
                             f"({e}); sampling in this process instead")
            else:
                run.source = "daemon"
                run.job_label = f"{be.cluster + '/' if be.cluster else ''}{job_id}"
                return be
    from .track_self import SelfBackend

    return SelfBackend(run)


class _CallableModule(types.ModuleType):
    """`greend.track` is this module (importing greend.track binds the name to it), callable as
    the track() function, so `greend.track("x")`, `@greend.track` and `import greend.track` agree."""

    def __call__(self, *args, **kwargs):
        return track(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
