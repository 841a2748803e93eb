"""Job metadata from Slurm for the jobs on this node: identity, owner, account, allocation, times.

Read through Slurm's commands (`squeue --json`, `scontrol listpids`, `scontrol --version`), or through
pyslurm when it is installed and built for the Slurm release that runs here (pyslurm is ABI-locked
to one release). A refresh runs off the sampling path (the daemon schedules it), bounded by a
timeout; the monitor only reads the last good cache. Finished jobs' footprints can be written back
to Slurm (AdminComment or Comment), where `squeue` and `scontrol show job` show them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import slurmcli
from .base import CollectorStatus
from .slurmcli import json_failure, number

log = logging.getLogger(__name__)

# States after which a job does not change any more.
FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT",
})
MIB = 1 << 20
WriteBack = Literal["none", "admin_comment", "comment"]
Discovery = Literal["local", "squeue"]
WRITE_BACK_FIELD = {"admin_comment": "AdminComment", "comment": "Comment"}


class SlurmError(Exception):
    """A Slurm command failed, timed out or answered something unreadable; the message says which."""


@dataclass(frozen=True, slots=True)
class SlurmJob:
    """One job as the controller describes it, with its allocation on one node."""

    job_id: str
    submit_time: int
    state: str
    cluster: str = ""
    name: str = ""
    user: str = ""
    uid: int | None = None
    account: str = ""
    partition: str = ""
    nodes: tuple[str, ...] = ()
    alloc_cpus: float | None = None
    """CPUs allocated on the node it was parsed for (not the job's total on several nodes)."""
    alloc_mem_bytes: int | None = None
    alloc_gpus: int | None = None
    start_time: int | None = None
    end_time: int | None = None
    """When the job ended; None while it runs (Slurm's end_time is then the expected end)."""
    admin_comment: str = ""
    comment: str = ""

    @property
    def ended(self) -> bool:
        return self.state in FINAL_STATES


# -- parsing ------------------------------------------------------------------------------------
def expand_hostlist(text: str) -> list[str]:
    """Node names of a Slurm hostlist: "site-n[1-2],gpu[01,03-04]" -> site-n1, site-n2, gpu01, ..."""
    names: list[str] = []
    for item in _split_top(text.strip()):
        expanded = [""]
        for prefix, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            choices = [prefix]
            if ranges:
                choices = []
                for part in ranges.split(","):
                    lo, _, hi = part.partition("-")
                    if hi and lo.isdigit() and hi.isdigit():
                        width = len(lo)
                        choices += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
                    else:
                        choices.append(prefix + part)
            expanded = [e + c for e in expanded for c in choices]
        names += [e for e in expanded if e]
    return names


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s for s in out if s]


def _state(j: dict) -> str:
    s = j.get("job_state")
    if isinstance(s, list):  # a list from 23.02 on: the base state first, then flags
        s = s[0] if s else ""
    return str(s or "")


def parse_tres(text: str) -> dict[str, str]:
    """"cpu=2,mem=600M,node=2,gres/gpu=1" -> {"cpu": "2", "mem": "600M", ...}."""
    out = {}
    for kv in (text or "").split(","):
        k, sep, v = kv.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def mem_bytes(text: str) -> int | None:
    """Bytes of a Slurm memory size ("600M", "1.5G"; a bare number is MiB)."""
    m = re.fullmatch(r"([0-9.]+)([KMGTP]?)", (text or "").strip().upper())
    if not m:
        return None
    scale = {"K": 1 << 10, "": MIB, "M": MIB, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}[m[2]]
    return int(float(m[1]) * scale)


def _gres_gpus(text: str) -> int:
    """GPUs in one node's gres detail, e.g. "gpu:a100:2(IDX:0-1),mps:100" -> 2."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:(,]+)?:(\d+)", text or ""))


def _alloc_nodes(j: dict) -> list[tuple[str, float | None, float | None]]:
    """(node, cpus, memory MiB) per allocated node, from job_resources (22.05 to 24.x shapes)."""
    res = j.get("job_resources") or {}
    out = []
    if isinstance(res.get("allocated_nodes"), list):  # up to 23.11
        for n in res["allocated_nodes"]:
            cores = 0
            for sock in (n.get("sockets") or {}).values():
                for state in ((sock or {}).get("cores") or {}).values():
                    if str(state).lower().startswith("allocated"):
                        cores += 1
            out.append((str(n.get("nodename", "")), cores or number(n.get("cpus")),
                        number(n.get("memory_allocated"))))
    elif isinstance(res.get("nodes"), dict):  # 24.05 on
        for a in res["nodes"].get("allocation") or []:
            out.append((str(a.get("name", "")), number((a.get("cpus") or {}).get("count")),
                        number((a.get("memory") or {}).get("allocated"))))
    return out


def job_from_json(j: dict, node: str) -> SlurmJob:
    """One job of `squeue --json`, with its allocation on `node`."""
    state = _state(j)
    alloc = _alloc_nodes(j)
    names = [a[0] for a in alloc] if alloc else expand_hostlist(str(j.get("nodes") or ""))
    tres = parse_tres(str(j.get("tres_alloc_str") or ""))
    cpus = mem = gpus = None
    if node in names:
        i, n = names.index(node), len(names)
        gres = j.get("gres_detail") or []
        if tres.get("gres/gpu", "").isdigit():
            total_gpus = int(tres["gres/gpu"])
        else:  # an allocation without GPUs, unless it is unknown
            total_gpus = 0 if tres else None
        if n == 1:
            cpus = number(j.get("cpus")) or (float(tres["cpu"]) if tres.get("cpu", "").isdigit() else None)
            mem = mem_bytes(tres.get("mem", ""))
            if mem is None and number(j.get("memory_per_node")):
                mem = int(number(j.get("memory_per_node")) * MIB)
            gpus = total_gpus if total_gpus is not None or not gres else _gres_gpus(str(gres[0]))
        else:
            if alloc:
                cpus = alloc[i][1]
                mem = int(alloc[i][2] * MIB) if alloc[i][2] else None
            if i < len(gres):
                gpus = _gres_gpus(str(gres[i]))
            elif total_gpus is not None:
                gpus = total_gpus // n
    start = number(j.get("start_time"))
    end = number(j.get("end_time"))
    uid = number(j.get("user_id"))
    return SlurmJob(
        job_id=str(j["job_id"]), submit_time=int(number(j.get("submit_time")) or 0), state=state,
        cluster=str(j.get("cluster") or ""), name=str(j.get("name") or ""),
        user=str(j.get("user_name") or ""), uid=int(uid) if uid is not None else None,
        account=str(j.get("account") or ""), partition=str(j.get("partition") or ""),
        nodes=tuple(names), alloc_cpus=float(cpus) if cpus else None, alloc_mem_bytes=mem or None,
        alloc_gpus=gpus, start_time=int(start) if start and state != "PENDING" else None,
        end_time=int(end) if end and state in FINAL_STATES else None,
        admin_comment=str(j.get("admin_comment") or ""), comment=str(j.get("comment") or ""),
    )


def parse_squeue_json(text: str, node: str) -> list[SlurmJob]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise SlurmError(f"squeue --json: not JSON ({e})") from None
    failure = json_failure(data, "jobs")
    if failure:
        raise SlurmError(f"squeue --json: {failure}")
    out = []
    for j in data["jobs"]:
        try:
            out.append(job_from_json(j, node))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.debug("squeue --json: skipping an unreadable job entry: %s", e)
    return out


def version_tuple(text: str) -> tuple[int, int] | None:
    """(major, minor) of "slurm-wlm 22.05.8", "slurm 23.11.4" or pyslurm's "23.2.2"."""
    m = re.search(r"(\d+)\.(\d+)", text or "")
    return (int(m[1]), int(m[2])) if m else None


# -- the write-back text ------------------------------------------------------------------------
def footprint_comment(node: str, energy_j: float, carbon_g: float, water_l: float,
                      cpu_s: float, final: bool = True) -> str:
    """One node's entry in a job's comment; a running job's says "greend (so far):"."""
    return (f"greend{':' if final else ' (so far):'} energy_j={energy_j:.1f} carbon_g={carbon_g:.4g} "
            f"water_l={water_l:.4g} cpu_s={cpu_s:.1f} node={node}")


def merge_comment(existing: str, entry: str, node: str) -> str:
    """Put this node's entry into a job's comment, keeping other nodes' entries and other text."""
    parts = [p.strip() for p in (existing or "").split(" | ")]
    keep = [p for p in parts if p and not (p.startswith("greend") and p.endswith(f" node={node}"))]
    return " | ".join([*keep, entry])


# -- how Slurm is reached -----------------------------------------------------------------------
class SlurmCommands:
    """Slurm's client commands for one cluster (SLURM_CONF), each bounded by a timeout."""

    def __init__(self, conf: Path | None = None, bin_dir: Path | None = None, timeout_s: float = 5.0):
        self.conf = conf
        self.bin_dir = bin_dir
        self.timeout_s = timeout_s
        self.env = dict(os.environ)
        if conf is not None:
            self.env["SLURM_CONF"] = str(conf)

    def which(self, name: str) -> str | None:
        if self.bin_dir is not None:
            p = Path(self.bin_dir) / name
            return str(p) if os.access(p, os.X_OK) else None
        return shutil.which(name, path=self.env.get("PATH"))

    def describe(self) -> str:
        where = f"SLURM_CONF={self.conf}" if self.conf else "default SLURM_CONF"
        return f"{self.which('squeue') or 'squeue (not found)'} --json, {where}"

    def run(self, *argv: str, timeout_s: float | None = None) -> str:
        exe = self.which(argv[0])
        if exe is None:
            raise SlurmError(f"{argv[0]}: command not found"
                             + (f" in {self.bin_dir}" if self.bin_dir else " in PATH"))
        timeout = timeout_s or self.timeout_s
        try:
            r = slurmcli.run([exe, *argv[1:]], env=self.env, timeout_s=timeout)
        except TimeoutError:
            raise SlurmError(f"{' '.join(argv[:2])} did not answer within {timeout:g} s "
                             "(controller down or overloaded?)") from None
        if r.returncode != 0:
            lines = (r.stderr or r.stdout or "").strip().splitlines()
            raise SlurmError(f"{' '.join(argv[:2])} exited {r.returncode}"
                             + (f": {lines[-1][:300]}" if lines else ""))
        return r.stdout

    def version(self) -> str:
        return self.run("scontrol", "--version").strip()

    def jobs(self, node: str) -> list[SlurmJob]:
        # 22.05 ignores squeue's filters and returns every job it knows (finished ones for
        # MinJobAge); later versions honour --states=all. The node is filtered here.
        return parse_squeue_json(self.run("squeue", "--json", "--states=all"), node)

    def listpids(self, job_id: str) -> list[int]:
        """Process ids of a job on this node (`scontrol listpids`)."""
        out = self.run("scontrol", "listpids", str(job_id))
        return [int(line.split()[0]) for line in out.splitlines()[1:]
                if line.split() and line.split()[0].isdigit()]

    def update_comment(self, job_id: str, field: str, text: str) -> None:
        self.run("scontrol", "update", f"job={job_id}", f"{field}={text}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a stand-in module without a spec (tests)
        return module in sys.modules


def load_pyslurm(slurm_version: str) -> tuple[object | None, str]:
    """pyslurm if it is installed and built for this Slurm release, and why (not) in words."""
    try:
        import pyslurm  # type: ignore[import-not-found]
    except ImportError as e:
        if getattr(e, "name", None) == "pyslurm":
            return None, "pyslurm not installed"
        return None, f"pyslurm cannot be loaded ({e})"  # built against another libslurm
    except Exception as e:  # a broken extension module must not stop greend
        return None, f"pyslurm cannot be loaded ({type(e).__name__}: {e})"
    pv = str(getattr(pyslurm, "__version__", "") or "")
    want, have = version_tuple(pv), version_tuple(slurm_version)
    if want is None or have is None or want != have:
        return None, (f"pyslurm {pv or '(unknown version)'} is not built for the running "
                      f"{slurm_version or 'Slurm (version unknown)'}")
    return pyslurm, f"pyslurm {pv} (for {slurm_version})"


def _pyslurm_as_json(job) -> dict:
    """A pyslurm Job in the shape of one `squeue --json` entry, for the same parser."""
    g = getattr
    layout = {}
    try:
        layout = job.get_resource_layout_per_node() or {}
    except Exception:  # older pyslurm, or a pending job
        layout = {}
    alloc = [{"nodename": name, "cpus": len(_cpu_ids(v.get("cpu_ids"))) or None,
              "memory_allocated": v.get("memory")} for name, v in layout.items()]
    return {
        "job_id": g(job, "id"), "submit_time": g(job, "submit_time", 0), "job_state": g(job, "state", ""),
        "cluster": g(job, "cluster", ""), "name": g(job, "name", ""), "user_name": g(job, "user_name", ""),
        "user_id": g(job, "user_id", None), "account": g(job, "account", ""),
        "partition": g(job, "partition", ""), "nodes": g(job, "allocated_nodes", "") or "",
        "cpus": g(job, "cpus", None), "memory_per_node": g(job, "memory_per_node", None),
        "start_time": g(job, "start_time", None), "end_time": g(job, "end_time", None),
        "admin_comment": g(job, "admin_comment", "") or "", "comment": g(job, "comment", "") or "",
        "job_resources": {"allocated_nodes": alloc} if alloc else {},
    }


def _cpu_ids(v) -> list:
    if isinstance(v, list):
        return v
    if isinstance(v, str) and v:
        n = 0
        for part in v.split(","):
            lo, _, hi = part.partition("-")
            n += int(hi) - int(lo) + 1 if hi else 1
        return [0] * n
    return []


class PySlurmJobs:
    """Jobs through pyslurm's API (no process per refresh); other calls through the commands."""

    def __init__(self, module, commands: SlurmCommands):
        self.module = module
        self.commands = commands

    def jobs(self, node: str) -> list[SlurmJob]:
        try:
            loaded = self.module.Jobs.load()
        except Exception as e:  # pyslurm.RPCError: the controller does not answer
            raise SlurmError(f"pyslurm Jobs.load: {e}") from None
        out = []
        for job in loaded.values():
            try:
                out.append(job_from_json(_pyslurm_as_json(job), node))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                log.debug("pyslurm: skipping an unreadable job: %s", e)
        return out


# -- the cache ----------------------------------------------------------------------------------
@dataclass(slots=True)
class _WriteBack:
    job_id: str
    submit_time: int
    text: str
    queued: float
    attempts: int = 0


class SlurmMetadata:
    """The jobs Slurm has placed on this node, refreshed in the background; lookups never block.

    `refresh()` is what a scheduler runs (periodically, and once more when `request()` is called
    for a job id not yet known); a refresh asked for while one runs makes that one run again.
    """

    name = "slurm"

    def __init__(self, node: str, commands: SlurmCommands, *, use_pyslurm: bool = True,
                 write_back: WriteBack = "none", write_back_interval_s: float = 300.0,
                 clock: Callable[[], float] = time.time, give_up_s: float = 3600.0,
                 local=None):
        self.node = node
        self.commands = commands
        self.use_pyslurm = use_pyslurm
        self.write_back = write_back
        self.write_back_interval_s = write_back_interval_s
        """How often a running job's footprint so far is written (0: only when it ends)."""
        self.clock = clock
        self.give_up_s = give_up_s
        self.local = local
        """collectors/slurmlocal.py's LocalJobs in local discovery; None: the whole queue from
        squeue --json (or pyslurm) at each refresh."""
        self.discovery: Discovery = "squeue" if local is None else "local"
        self.status = CollectorStatus("slurm", detail=(local or commands).describe())
        self.on_request: Callable[[], None] | None = None
        self.backend = None
        self.slurm_version = ""
        self.generation = 0  # completed refreshes
        self.refreshed_at = 0.0
        self.requests = 0
        self.written = 0
        self.refused = 0  # final write-backs refused because the job had finished
        self._jobs: dict[str, SlurmJob] = {}
        self._writes: dict[tuple[str, int], _WriteBack] = {}
        self._busy = threading.Lock()
        self._queue_lock = threading.Lock()
        self._again = False

    def describe(self) -> str:
        return self.status.detail

    # -- read side (sampling thread) --------------------------------------------------------
    def get(self, job_id: str) -> SlurmJob | None:
        return self._jobs.get(job_id)

    def jobs(self) -> dict[str, SlurmJob]:
        return self._jobs

    def want(self, job_id: str) -> None:
        """A job on this node that the cache does not know yet (local discovery asks about it)."""
        if self.local is not None:
            self.local.want(job_id)

    def ended_here(self, job_id: str) -> None:
        """A job left this node (local discovery then asks slurmctld how it ended)."""
        if self.local is not None:
            self.local.ended_here(job_id)

    def request(self) -> None:
        """Ask for a refresh soon (a job id was seen that the cache does not know)."""
        self.requests += 1
        if self.on_request is not None:
            try:
                self.on_request()
            except Exception as e:  # the scheduler is shutting down
                log.debug("slurm: refresh request not scheduled: %s", e)

    def queue_write_back(self, job_id: str, submit_time: int, text: str) -> None:
        if self.write_back == "none":
            return
        with self._queue_lock:
            self._writes[(job_id, submit_time)] = _WriteBack(job_id, submit_time, text, self.clock())

    @property
    def pending_write_backs(self) -> int:
        return len(self._writes)

    # -- background side --------------------------------------------------------------------
    def refresh(self) -> None:
        if not self._busy.acquire(blocking=False):
            self._again = True
            return
        try:
            while True:
                self._again = False
                self._refresh_once()
                if not self._again:
                    break
        finally:
            self._busy.release()

    def _choose_backend(self):
        if self.local is not None:
            self.backend = self.local
            self.status.detail = self.local.describe()
            log.info("slurm: job metadata from %s", self.status.detail)
            return self.local
        try:
            self.slurm_version = self.commands.version()
        except SlurmError as e:
            log.debug("slurm: no version (%s)", e)
        how = self.commands
        why = "pyslurm not wanted (slurm.pyslurm = false)"
        if self.use_pyslurm:
            if self.commands.conf is not None and _installed("pyslurm"):
                # libslurm reads SLURM_CONF when pyslurm initialises it.
                os.environ.setdefault("SLURM_CONF", str(self.commands.conf))
            module, why = load_pyslurm(self.slurm_version)
            if module is not None:
                how = PySlurmJobs(module, self.commands)
        self.backend = how
        if how is self.commands:
            self.status.detail = f"{self.commands.describe()} ({why})"
        else:
            self.status.detail = why
        log.info("slurm: job metadata from %s", self.status.detail)
        return how

    def _refresh_once(self) -> None:
        st = self.status
        t0 = time.perf_counter()
        started = self.clock()
        try:
            backend = self.backend or self._choose_backend()
            jobs = backend.jobs(self.node)
        except Exception as e:  # SlurmError, or anything a broken backend raises
            msg = str(e) if isinstance(e, SlurmError) else f"{type(e).__name__}: {e}"
            if st.ok:
                log.warning("slurm: job metadata unavailable: %s", msg)
            st.ok, st.error = False, msg
            st.errors_total += 1
            st.last_duration_s = time.perf_counter() - t0
            return
        self._jobs = {j.job_id: j for j in jobs if self.node in j.nodes}
        self.refreshed_at = started
        self.generation += 1
        partial = getattr(backend, "error", None)  # local discovery: the node's jobs, slurmctld not
        if partial is not None:
            if st.ok:
                log.warning("slurm: job metadata incomplete: %s", partial)
            st.ok, st.error = False, str(partial)
            st.errors_total += 1
        else:
            if not st.ok:
                log.warning("slurm: job metadata available again")
            st.ok, st.error = True, ""
        self._write_back()
        st.last_duration_s = time.perf_counter() - t0

    def _write_back(self) -> None:
        with self._queue_lock:
            pending = list(self._writes.values())
        for w in pending:
            job = self._jobs.get(w.job_id)
            if self.local is not None and job is not None:
                # The comment as slurmctld has it now (other nodes write theirs too): one by-id
                # question per write, which write_back_interval_s bounds.
                from .slurmlocal import show_job

                try:
                    job = show_job(self.commands, w.job_id, self.node) or job
                except SlurmError as e:
                    log.debug("slurm: job %s not read before writing back: %s", w.job_id, e)
            done = False
            if job is None or job.submit_time != w.submit_time:
                # The controller no longer (or not yet) knows this job: never write onto another
                # job that reuses the id.
                done = self.clock() - w.queued > self.give_up_s
                if done:
                    log.info("slurm: job %s no longer known to the controller, not written back",
                             w.job_id)
            else:
                field = WRITE_BACK_FIELD[self.write_back]
                current = job.admin_comment if self.write_back == "admin_comment" else job.comment
                text = merge_comment(current, w.text, self.node)
                try:
                    if text != current:
                        self.commands.update_comment(w.job_id, field, text)
                    self.written += 1
                    done = True
                except SlurmError as e:
                    w.attempts += 1
                    if "already finished" in str(e):
                        # Slurm (22.05 at least) refuses updates of a finished job: the comment
                        # keeps the footprint written while it ran ("so far").
                        done = True
                        self.refused += 1
                        log.info("slurm: job %s had finished before its final footprint could be "
                                 "written; its %s keeps the one written while it ran", w.job_id, field)
                    else:
                        done = w.attempts >= 3
                        log.warning("slurm: writing job %s's footprint to its %s failed%s: %s",
                                    w.job_id, field, " (giving up)" if done else "", e)
            if done:
                with self._queue_lock:
                    if self._writes.get((w.job_id, w.submit_time)) is w:
                        del self._writes[(w.job_id, w.submit_time)]


# Where Slurm's commands find their configuration without SLURM_CONF: the usual install paths,
# and the copies slurmd keeps in configless mode.
DEFAULT_CONFS = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf", "/usr/local/etc/slurm.conf",
                 "/run/slurm/conf/slurm.conf", "/var/spool/slurmd/conf-cache/slurm.conf")


def slurm_here(commands: SlurmCommands) -> bool:
    """Whether this node looks like a Slurm node: squeue is there and has a configuration."""
    if commands.which("squeue") is None:
        return False
    if commands.conf is not None or commands.env.get("SLURM_CONF"):
        return True
    return any(os.path.exists(p) for p in DEFAULT_CONFS)


def from_config(scfg, node: str, cgroupfs: Path = Path("/sys/fs/cgroup"),
                procfs: Path = Path("/proc")) -> SlurmMetadata | None:
    """The metadata cache of the [slurm] section; None where Slurm is off, or (auto) where this
    node has no Slurm client with a configuration. Local discovery (the default) looks for the
    node's jobs under `cgroupfs` and `procfs`."""
    commands = SlurmCommands(scfg.conf, scfg.bin_dir, scfg.timeout_s)
    if scfg.enabled is False or (scfg.enabled == "auto" and not slurm_here(commands)):
        return None
    local = None
    if getattr(scfg, "discovery", "squeue") == "local":
        from .slurmlocal import LocalJobs

        local = LocalJobs(commands, scfg.spool_dir, cgroupfs=cgroupfs, procfs=procfs,
                          per_minute=scfg.lookups_per_minute, burst=scfg.lookup_burst)
    return SlurmMetadata(node, commands, use_pyslurm=scfg.pyslurm, write_back=scfg.write_back,
                         write_back_interval_s=scfg.write_back_interval_s, local=local)
