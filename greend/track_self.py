"""greend.track's self-sampling: `greend measure`'s machinery (the monitor, the collectors, the
command tree) run in a background thread for this process and its children, the run recorded
in the user's ledger with its phases. Imported by greend.track only when a run starts outside
the daemon's reach; the configuration loads in the sampler's thread, off the caller's path.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from .phases import Books, JobPhases, put

WRITE_EVERY_S = 2.0  # as `greend measure`: the running row is at most this old in the ledger


def load_config():
    """The configuration in force, as `greend measure` reads it. The one place a tracked run reads
    the configuration (a cached view without pydantic can replace it here); the result is only
    read, never changed."""
    from . import config

    path, _ = config.locate(None)
    return config.load(path)


def _own(procfs: str) -> tuple[int, int]:
    """This process's CPU time in clock ticks, with that of the children it has waited for, and
    its resident pages."""
    with open(f"{procfs}/{os.getpid()}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2:].split()
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]), int(fields[21])


def _process_tree(procfs: str, cluster: str):
    from greend.collectors.base import JobUsage
    from greend.collectors.procscan import NS_PER_TICK, PAGE

    from .measure import CommandTree

    class ProcessTree(CommandTree):
        """measure's command tree, with this process's own CPU time (since the run began)."""

        def __init__(self):
            super().__init__(procfs, cluster)
            self.base = _own(procfs)[0]
            self.child_ns = 0

        def read(self):
            total, self.cpu_ns = self.cpu_ns, self.child_ns
            out = super().read()  # the children's, kept monotonic in cpu_ns
            self.child_ns, self.cpu_ns = self.cpu_ns, total
            if self.key is None or not out:
                return out
            u = out[0]
            try:
                ticks, rss = _own(self.procfs)
            except (OSError, ValueError, IndexError):
                ticks, rss = self.base, 0
            self.cpu_ns = max(self.cpu_ns, u.cpu_time_ns + (ticks - self.base) * NS_PER_TICK)
            return [JobUsage(u.key, u.kind, u.job_id, u.uid, self.cpu_ns, u.mem_bytes + rss * PAGE,
                             alloc_cpus=u.alloc_cpus, cluster=u.cluster)]

        def owner_of(self, pid: int):
            return self.key if pid == self.root or pid in self.pids else None

    return ProcessTree()


class SelfBackend:
    """The books of this process and its children, from a monitor ticked by a background thread
    every interval_s and, exactly, at each boundary."""

    def __init__(self, run):
        self.run = run
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.monitor = None
        self.ledger = None
        self.acc = None
        self.jp = JobPhases()
        self.t_call = time.time()
        self.pid = os.getpid()
        self.error: str | None = None
        self.last: Books | None = None
        self.thread = threading.Thread(target=self._main, name="greend-track", daemon=True)

    def begin(self) -> Books:
        import atexit

        # A run still open when the interpreter exits is stopped then, so that its record in the
        # ledger ends (as `greend measure` ends a command's) instead of staying "running".
        atexit.register(self._at_exit)
        self.thread.start()
        return Books(self.t_call)

    def _at_exit(self) -> None:
        # Not in a forked child that exits normally: the run, its thread and its ledger
        # connection are the parent's.
        if self.run.running and os.getpid() == self.pid:
            self.run.stop()

    # -- the sampler thread ---------------------------------------------------------------------
    def _setup(self) -> None:
        from .measure import series_step
        from .monitor import Monitor

        run = self.run
        cfg = load_config()
        if run.record:
            from pathlib import Path

            from .ledger import Ledger, default_path

            state = Path(run.state_dir) if run.state_dir is not None else cfg.resolved_state_dir()
            try:
                self.ledger = Ledger(default_path(state))
            except Exception as e:
                run._degrade(f"not recorded in the ledger: {e}")
        tree = _process_tree(str(cfg.paths.procfs), cfg.cluster)
        mon = Monitor(cfg, self.ledger, jobs_source=tree, record_kinds={"command"}, resume=False)
        mon.job_series_step_s = series_step(run.interval_s, 0)
        mon.tick()
        t0 = mon.rebaseline()
        job_id = time.strftime("%Y%m%d-%H%M%S", time.localtime(t0)) + f"-{os.getpid()}-{id(run) % 10000}"
        key = f"cmd/{job_id}"
        from greend.collectors.base import JobUsage

        cpus = float(len(os.sched_getaffinity(0)))
        tree.key, tree.job_id, tree.cpus = key, job_id, cpus
        acc = mon.account_for(JobUsage(key, "command", job_id, os.getuid(), 0, alloc_cpus=cpus,
                                       cluster=cfg.cluster), t0)
        row = acc.row
        row.name = run.name or ""
        row.account = run.project or ""
        import shlex

        row.command = shlex.join([sys.executable, *sys.argv])[:4096]
        row.submit_time = int(t0)
        row.meta = {**(row.meta or {}), "idle_rule": cfg.attribution.idle_power,
                    "series_step_s": mon.job_series_step_s, "tracked": True}
        mon.on_checkpoint.append(self._write_phases)
        self.monitor, self.acc = mon, acc
        self.last = Books.of_row(row, t0)
        self._job()
        self.run.factors = [mon.factors.at(t0).to_dict()]
        if self.ledger is not None:
            self._checkpoint()

    def _job(self) -> None:
        from .report import footprint_dict

        self.run.job = footprint_dict(self.acc.row, [])["job"]

    def _write_phases(self, db, written) -> None:
        if self.acc is not None and self.acc.row.pk is not None and \
                (self.jp.dirty or self.jp.open is not None):
            put(db, self.acc.row.pk, self.jp, Books.of_row(self.acc.row, self.acc.row.last_seen))

    def _coarsen(self) -> None:
        """As `greend measure`: a long run's stored series keeps about measure.MAX_POINTS points."""
        from .measure import _coarsen, series_step

        mon, acc = self.monitor, self.acc
        step = series_step(self.run.interval_s, time.time() - acc.row.first_seen)
        if step != mon.job_series_step_s:
            try:
                _coarsen(mon, self.ledger, acc, step)
            except Exception as e:
                self.run._degrade(f"ledger write failed: {e}")

    def _checkpoint(self) -> None:
        try:
            self.monitor.checkpoint()
        except Exception as e:
            self.run._degrade(f"ledger write failed: {e}")

    def _check_status(self) -> None:
        for name, st in self.monitor.status.items():
            if not st.ok:
                self.run._degrade(f"collector {name} failed: {st.error}")

    def _tick(self) -> Books:
        mon = self.monitor
        mon.tick()
        self._check_status()
        acc = self.acc
        self.run.detail = dict(acc.row.provenance or {})
        self.last = Books.of_row(acc.row, mon.prev.t)
        return self.last

    def _main(self) -> None:
        try:
            with self.lock:
                self._setup()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self.run._degrade(f"self-sampling could not start: {self.error}")
            self.ready.set()
            return
        self.ready.set()
        interval = self.run.interval_s
        last_write = time.monotonic()
        while not self.stopping.wait(interval):
            with self.lock:
                if self.stopping.is_set():
                    break
                try:
                    self._tick()
                    if self.ledger is not None and time.monotonic() - last_write >= WRITE_EVERY_S:
                        self._coarsen()
                        self._checkpoint()
                        last_write = time.monotonic()
                except Exception as e:
                    self.run._degrade(f"sampling failed: {type(e).__name__}: {e}")

    # -- the caller's side ----------------------------------------------------------------------
    def _wait(self) -> bool:
        self.ready.wait(30)
        return self.monitor is not None

    def books(self, exact=True, phase=None, boundary=False) -> Books:
        if not self._wait():
            return Books(time.time())
        with self.lock:
            b = self._tick() if (exact or boundary) else self.last
            if boundary:
                self.jp.boundary(phase, b)
            return b

    def last_books(self, last: Books) -> Books:
        return self.last or last

    def finish(self, phase_open: bool) -> Books:
        import atexit

        atexit.unregister(self._at_exit)
        self.stopping.set()
        if not self._wait():
            self.thread.join(5)
            return Books(time.time())
        with self.lock:
            mon, acc = self.monitor, self.acc
            try:
                b = self._tick()
                if phase_open:
                    self.jp.boundary(None, b)
                row = acc.row
                row.exit_code = 0
                mon.end(acc.key, b.t, b.t)
                row.first_seen = min(row.first_seen, self.t_call)
                self._job()
                if self.ledger is not None:
                    self._coarsen()
                    self._checkpoint()
            finally:
                mon.close()
                if self.ledger is not None:
                    self.ledger.close()
        self.thread.join(5)
        return b
