"""Live state of each cluster from its own Slurm (`sinfo --json`, `squeue --json`, with the cluster's
SLURM_CONF), with a timeout, a cache, and an optional background refresher.

A controller that does not answer is a state like any other ("down, because ..."): the decision
states it. Parsing accepts Slurm 22.05 (plain numbers) and 23.x+ ({"set": .., "number": ..}).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from greend.collectors import slurmcli
from greend.collectors.slurmcli import first_error, json_failure, number

from greend import quantities as q

from .records import Record

log = logging.getLogger(__name__)

_BAD_NODE_STATES = frozenset({"down", "drain", "drained", "draining", "fail", "failing", "future",
                              "unknown", "maint", "reboot_requested", "powered_down", "inval"})
_BAD_NODE_FLAGS = frozenset({"DRAIN", "DRAINING", "DRAINED", "NOT_RESPONDING", "FAIL", "MAINTENANCE",
                             "POWERED_DOWN", "POWERING_DOWN", "REBOOT_REQUESTED", "INVALID_REG"})


def _state(v) -> str:
    if isinstance(v, list):
        v = v[0] if v else ""
    return str(v or "").upper()


class NodeState(Record):
    name: str
    state: str
    cpus: int
    alloc_cpus: int
    mem_mb: float
    alloc_mem_mb: float
    partitions: tuple[str, ...]
    usable: bool

    __slots__ = ("alloc_cpus", "alloc_mem_mb", "cpus", "mem_mb", "name", "partitions", "state", "usable")

    def __init__(
        self,
        name: str,
        state: str,
        cpus: int,
        alloc_cpus: int,
        mem_mb: float,
        alloc_mem_mb: float,
        partitions: tuple[str, ...],
        usable: bool,
    ):
        self.name = name
        self.state = state
        self.cpus = cpus
        self.alloc_cpus = alloc_cpus
        self.mem_mb = mem_mb
        self.alloc_mem_mb = alloc_mem_mb
        self.partitions = partitions
        self.usable = usable

    @property
    def idle_cpus(self) -> int:
        return max(self.cpus - self.alloc_cpus, 0) if self.usable else 0


class JobState(Record):
    job_id: str
    state: str
    cpus: int
    partition: str
    time_limit_s: float
    end_time: float
    nodes: tuple[str, ...]
    name: str
    comment: str
    user: str

    __slots__ = (
        "comment", "cpus", "end_time", "job_id", "name", "nodes", "partition", "state", "time_limit_s",
        "user",
    )

    def __init__(
        self,
        job_id: str,
        state: str,
        cpus: int,
        partition: str,
        time_limit_s: float,
        end_time: float,
        nodes: tuple[str, ...],
        name: str = "",
        comment: str = "",
        user: str = "",
    ):
        self.job_id = job_id
        self.state = state
        self.cpus = cpus
        self.partition = partition
        self.time_limit_s = time_limit_s
        self.end_time = end_time
        self.nodes = nodes
        self.name = name
        self.comment = comment
        self.user = user


class Wait(Record):
    seconds: float
    reason: str
    numbers: dict

    __slots__ = ("numbers", "reason", "seconds")

    def __init__(self, seconds: float, reason: str, numbers: dict):
        self.seconds = seconds
        self.reason = reason
        self.numbers = numbers


class ClusterState(Record):
    cluster: str
    ok: bool
    fetched_at: float
    error: str
    fetch_s: float
    nodes: list[NodeState]
    running: list[JobState]
    pending: list[JobState]
    _waits: dict

    __slots__ = ("_waits", "cluster", "error", "fetch_s", "fetched_at", "nodes", "ok", "pending", "running")

    def __init__(
        self,
        cluster: str,
        ok: bool,
        fetched_at: float,
        error: str = "",
        fetch_s: float = 0.0,
        nodes: list[NodeState] | None = None,
        running: list[JobState] | None = None,
        pending: list[JobState] | None = None,
    ):
        self.cluster = cluster
        self.ok = ok
        self.fetched_at = fetched_at
        self.error = error
        self.fetch_s = fetch_s
        self.nodes = [] if nodes is None else nodes
        self.running = [] if running is None else running
        self.pending = [] if pending is None else pending
        self._waits: dict = {}

    # -- summaries -----------------------------------------------------------------------------
    def _nodes(self, partition: str | None) -> list[NodeState]:
        return [n for n in self.nodes if n.usable and (partition is None or partition in n.partitions)]

    def load(self, partition: str | None = None) -> tuple[float, int, int]:
        """(allocated fraction, allocated CPUs, total CPUs) of the usable nodes of a partition."""
        nodes = self._nodes(partition)
        total = sum(n.cpus for n in nodes)
        alloc = sum(min(n.alloc_cpus, n.cpus) for n in nodes)
        return (alloc / total if total else 1.0), alloc, total

    def expected_wait(self, cpus: int, nodes_needed: int, cpus_per_node: int, mem_per_node_mb: float,
                      partition: str | None, now: float) -> Wait:
        """How long a job would wait here, from the queue: zero when it fits on idle nodes and
        nothing is pending ahead of it; else until enough CPUs are free, taking running jobs to end
        at their time limits (an upper bound) and pending jobs ahead to go first."""
        key = (cpus, nodes_needed, cpus_per_node, int(mem_per_node_mb), partition)
        hit = self._waits.get(key)
        if hit is not None and abs(hit[0] - now) < 1.0:  # same second: same answer
            return hit[1]
        w = self._expected_wait(cpus, nodes_needed, cpus_per_node, mem_per_node_mb, partition, now)
        self._waits[key] = (now, w)
        return w

    def _expected_wait(self, cpus, nodes_needed, cpus_per_node, mem_per_node_mb, partition, now) -> Wait:
        nodes = self._nodes(partition)
        where = f"partition {partition}" if partition else "the cluster"
        if not nodes:
            return Wait(float("inf"), f"no usable node in {where}", {"usable_nodes": 0})
        names = {n.name for n in nodes}
        total = sum(n.cpus for n in nodes)
        idle = sum(n.idle_cpus for n in nodes)
        pending = [j for j in self.pending if partition is None or j.partition == partition
                   or partition in j.partition.split(",")]
        pending_cpus = sum(j.cpus for j in pending)
        fitting = sum(1 for n in nodes if n.idle_cpus >= cpus_per_node
                      and n.mem_mb - n.alloc_mem_mb >= mem_per_node_mb)
        numbers = {"idle_cpus": idle, "total_cpus": total, "pending_jobs": len(pending),
                   "pending_cpus": pending_cpus}
        if not pending and fitting >= nodes_needed:
            return Wait(0.0, f"{idle} of {total} CPUs idle in {where}, nothing pending", numbers)
        running = [j for j in self.running if not j.nodes or names.intersection(j.nodes)]
        ends = sorted((max(j.end_time, now), j.cpus) for j in running)
        need = cpus + pending_cpus
        free = idle
        for t_end, c in ends:
            free += c
            if free >= need:
                numbers["running_jobs"] = len(running)
                return Wait(t_end - now, f"{idle} of {total} CPUs idle, {len(pending)} job(s) "
                            f"pending ahead; enough CPUs free in {q.human_duration(t_end - now)} "
                            "by the time limits of running jobs", numbers)
        last = ends[-1][0] if ends else now
        drain = sum(j.cpus * j.time_limit_s for j in pending) / total
        numbers["running_jobs"] = len(running)
        wait = last - now + drain
        return Wait(wait, f"{idle} of {total} CPUs idle, {len(pending)} job(s) pending ahead "
                    f"({pending_cpus} CPUs); about {q.human_duration(wait)} by time limits", numbers)

    def summary(self) -> dict:
        if not self.ok:
            return {"ok": False, "error": self.error, "fetched_at": q.iso(self.fetched_at)}
        load, alloc, total = self.load()
        return {"ok": True, "fetched_at": q.iso(self.fetched_at), "load": round(load, 3),
                "alloc_cpus": alloc, "total_cpus": total, "running_jobs": len(self.running),
                "pending_jobs": len(self.pending), "fetch_s": round(self.fetch_s, 3)}

    def to_dict(self) -> dict:
        return self.to_plain()

    @classmethod
    def from_dict(cls, d: dict) -> ClusterState:
        return cls(
            cluster=d["cluster"], ok=d["ok"], fetched_at=d["fetched_at"], error=d.get("error", ""),
            fetch_s=d.get("fetch_s", 0.0),
            nodes=[NodeState(**{**n, "partitions": tuple(n["partitions"])}) for n in d.get("nodes", [])],
            running=[JobState(**{**j, "nodes": tuple(j["nodes"])}) for j in d.get("running", [])],
            pending=[JobState(**{**j, "nodes": tuple(j["nodes"])}) for j in d.get("pending", [])],
        )


# -- parsing ------------------------------------------------------------------------------------
def parse_sinfo(data: dict) -> list[NodeState]:
    out = []
    for n in data.get("nodes", []):
        state = n.get("state", "")
        if isinstance(state, list):
            flags = {str(s).upper() for s in state[1:]}
            state = state[0] if state else ""
        else:
            flags = {str(s).upper() for s in n.get("state_flags", [])}
        state = str(state).lower()
        usable = state not in _BAD_NODE_STATES and not (flags & _BAD_NODE_FLAGS)
        cpus = int(number(n.get("cpus")))
        out.append(NodeState(
            name=str(n.get("name", "")), state=state, cpus=cpus,
            alloc_cpus=int(number(n.get("alloc_cpus"))), mem_mb=float(number(n.get("real_memory"))),
            alloc_mem_mb=float(number(n.get("alloc_memory"))),
            partitions=tuple(n.get("partitions") or ()), usable=usable,
        ))
    return out


def parse_squeue(data: dict, now: float) -> tuple[list[JobState], list[JobState], list[JobState]]:
    """(running, pending, all) jobs; finished ones that squeue --json still lists are dropped."""
    running, pending, every = [], [], []
    for j in data.get("jobs", []):
        state = _state(j.get("job_state"))
        limit_min = number(j.get("time_limit"), 0)
        limit_s = float(limit_min) * 60 if limit_min else 365 * 86400.0
        start = float(number(j.get("start_time"), 0))
        end = float(number(j.get("end_time"), 0)) or (start + limit_s if start else now + limit_s)
        res = j.get("job_resources") or {}
        alloc = res.get("allocated_nodes") or []
        nodes = tuple(str(a.get("nodename")) for a in alloc if isinstance(a, dict) and a.get("nodename"))
        js = JobState(
            job_id=str(j.get("job_id")), state=state, cpus=int(number(j.get("cpus"), 1)) or 1,
            partition=str(j.get("partition") or ""), time_limit_s=limit_s, end_time=end, nodes=nodes,
            name=str(j.get("name") or ""), comment=str(j.get("comment") or ""),
            user=str(j.get("user_name") or ""),
        )
        every.append(js)
        if state in ("RUNNING", "COMPLETING", "SUSPENDED", "CONFIGURING"):
            running.append(js)
        elif state == "PENDING":
            pending.append(js)
    return running, pending, every


# -- fetching -----------------------------------------------------------------------------------
def run_slurm(spec, argv: list[str], timeout_s: float,
              extra_env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a Slurm command for one cluster (its SLURM_CONF, its bin_dir): (exit status, stdout,
    stderr); raises TimeoutError (collectors/slurmcli.py runs it)."""
    if spec.transport == "rest":
        return _run_rest(spec, argv, timeout_s)
    if spec.transport == "ssh":
        return _run_ssh(spec, argv, timeout_s)
    if spec.conf is not None and not Path(spec.conf).is_file():
        # Slurm's commands retry a missing slurm.conf for a minute before giving up.
        return 1, "", f"slurm.conf {spec.conf} does not exist"
    r = slurmcli.run(spec.argv(argv), timeout_s=timeout_s,
                     env={**spec.env(os.environ), **(extra_env or {})})
    return r.returncode, r.stdout, r.stderr


# squeue/sinfo --json print what slurmrestd answers on these paths (the same openapi plugin).
_REST_PATHS = {"squeue": "jobs", "sinfo": "nodes"}


def _run_rest(spec, argv: list[str], timeout_s: float) -> tuple[int, str, str]:
    """`squeue --json` / `sinfo --json` of a rest cluster, asked of its slurmrestd with the
    user's own token (policies/transport.py): the same (exit status, stdout, stderr)."""
    from . import transport

    path = _REST_PATHS.get(argv[0])
    if path is None or "--json" not in argv:
        return 2, "", f"{argv[0]}: not available through slurmrestd (transport = \"rest\")"
    try:
        return 0, json.dumps(transport.request(spec, "GET", path, None, timeout_s)), ""
    except transport.RestError as e:
        return 1, "", f"{argv[0]}: error: {e}"


def _run_ssh(spec, argv: list[str], timeout_s: float) -> tuple[int, str, str]:
    """A Slurm command on an ssh cluster's login node through the user's own ssh
    (policies/transport.py): the same (exit status, stdout, stderr)."""
    from . import transport

    try:
        return transport.ssh_run(spec, argv, timeout_s)
    except transport.SshError as e:
        return 1, "", f"{argv[0]}: error: {e}"


def fetch(cluster, now: float | None = None) -> ClusterState:
    """Ask one cluster's controller for its nodes and queue (both commands at once)."""
    t0 = time.monotonic()
    now = time.time() if now is None else now
    spec = cluster.slurm
    results: dict[str, tuple] = {}

    def one(name: str, argv: list[str]) -> None:
        try:
            results[name] = run_slurm(spec, argv, spec.timeout_s)
        except TimeoutError as e:
            results[name] = (None, "", str(e))

    th = threading.Thread(target=one, args=("sinfo", ["sinfo", "--json"]), daemon=True)
    th.start()
    one("squeue", ["squeue", "--json"])
    th.join()
    elapsed = time.monotonic() - t0
    for name in ("sinfo", "squeue"):
        rc, _, err = results[name]
        if rc != 0:
            msg = err if rc is None else f"{name}: {first_error(err)}"
            return ClusterState(cluster.name, False, now, error=f"controller did not answer: {msg}",
                                fetch_s=elapsed)
    try:
        answers = {name: json.loads(results[name][1]) for name in ("sinfo", "squeue")}
        for name, key in (("squeue", "jobs"), ("sinfo", "nodes")):
            failure = json_failure(answers[name], key)
            if failure:  # 22.05 exits 0 with only an error when the controller cannot be reached
                return ClusterState(cluster.name, False, now,
                                    error=f"controller did not answer: {name}: {failure}", fetch_s=elapsed)
        nodes = parse_sinfo(answers["sinfo"])
        running, pending, _ = parse_squeue(answers["squeue"], now)
    except (ValueError, TypeError, AttributeError) as e:
        return ClusterState(cluster.name, False, now, error=f"unreadable sinfo/squeue JSON: {e}",
                            fetch_s=elapsed)
    return ClusterState(cluster.name, True, now, nodes=nodes, running=running, pending=pending,
                        fetch_s=elapsed)


class StateCache:
    """Cluster states, refreshed when older than max_age_s, all clusters at once in threads.

    `start(interval_s)` refreshes them in a background thread, so a long-running process (the
    daemon, a submit gateway, the benchmark) decides from memory; `load`/`save` share the states
    between successive commands through a small JSON file.
    """

    def __init__(self, clusters, max_age_s: float = 30.0, path: Path | None = None,
                 fetcher=fetch, clock=time.time):
        self.clusters = list(clusters)
        self.max_age_s = max_age_s
        self.path = path
        self.fetcher = fetcher
        self.clock = clock
        self.states: dict[str, ClusterState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dirty = False

    def _key(self, c) -> str:
        return f"{c.name}|{c.slurm.conf}|{c.slurm.bin_dir}"

    def load(self) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            for c in self.clusters:
                d = data.get(self._key(c))
                if d:
                    self.states[c.name] = ClusterState.from_dict(d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.debug("state cache %s unreadable (%s); starting afresh", self.path, e)

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = {self._key(c): self.states[c.name].to_dict()
                    for c in self.clusters if c.name in self.states}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError as e:
            log.debug("cannot write state cache %s: %s", self.path, e)

    def refresh(self, clusters=None) -> None:
        """Fetch now, all given clusters in parallel."""
        todo = list(clusters or self.clusters)
        got: dict[str, ClusterState] = {}

        def one(c):
            got[c.name] = self.fetcher(c)

        threads = [threading.Thread(target=one, args=(c,), daemon=True) for c in todo[1:]]
        for t in threads:
            t.start()
        if todo:
            one(todo[0])
        for t in threads:
            t.join()
        with self._lock:
            self.states.update(got)
            self.dirty = True

    def snapshot(self, max_age_s: float | None = None) -> dict[str, ClusterState]:
        """States no older than max_age_s (default: the cache's), fetching the stale ones."""
        limit = self.max_age_s if max_age_s is None else max_age_s
        now = self.clock()
        with self._lock:
            stale = [c for c in self.clusters
                     if c.name not in self.states or now - self.states[c.name].fetched_at > limit]
        if stale:
            self.refresh(stale)
        with self._lock:
            return dict(self.states)

    def cached(self) -> dict[str, ClusterState]:
        with self._lock:
            return dict(self.states)

    # -- background refresh --------------------------------------------------------------------
    def start(self, interval_s: float) -> None:
        if self._thread is not None:
            return
        self._stop.clear()

        def loop():
            while not self._stop.is_set():
                try:
                    self.refresh()
                except Exception:  # a refresher that dies silently would freeze the states
                    log.exception("cluster state refresh failed")
                self._stop.wait(interval_s)

        self._thread = threading.Thread(target=loop, name="greend-cluster-state", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def default_cache_path() -> Path:
    """Where successive commands share cluster states: $XDG_CACHE_HOME/greend/cluster-state.json."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "greend" / "cluster-state.json"


def live_load(cfg, config_path=None, max_age_s: float | None = None) -> dict[str, dict]:
    """Load and queue of each cluster greend can reach (its slurm.conf or its partitions are
    configured), for displays such as the TUI and /api/v1/clusters.

    It shares the state cache of `greend route`, so displays ask the controllers at most once per
    policy.state_max_age_s; a controller that does not answer is reported with Slurm's error.
    """
    from .site import compile_site

    site = compile_site(cfg, config_path)
    reach = [c for c in site.clusters if c.slurm.conf is not None or c.partitions]
    if not reach:
        return {}
    age = site.settings.state_max_age_s if max_age_s is None else max_age_s
    cache = StateCache(reach, age, site.settings.state_cache or default_cache_path())
    cache.load()
    snap = cache.snapshot()
    cache.save()
    out: dict[str, dict] = {}
    for name, st in snap.items():
        if st.ok:
            frac, alloc, total = st.load()
            out[name] = {"ok": True, "load": frac, "alloc_cpus": alloc, "total_cpus": total,
                         "running": len(st.running), "pending": len(st.pending),
                         "fetched_at": st.fetched_at}
        else:
            out[name] = {"ok": False, "error": st.error, "fetched_at": st.fetched_at}
    return out
