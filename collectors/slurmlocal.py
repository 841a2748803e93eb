"""This node's Slurm jobs without asking slurmctld for the whole queue (docs/slurm.md, "Discovery").

A node finds its jobs locally: the records slurmd's Prolog and Epilog leave through
`greend slurmd-hook` in a root-owned spool directory, the job cgroups (v1 and v2 layouts), or
SLURM_JOB_ID in its processes' environments. slurmctld is asked only about one job at a time, by id
(`scontrol --local show job ID`: one REQUEST_JOB_INFO_SINGLE, never REQUEST_JOB_INFO), at a rate bounded
by a token bucket: once when a job appears (for its submit time and allocation) and once after it
ends (for its final state, which only slurmctld knows).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from .slurm import (
    FINAL_STATES,
    SlurmCommands,
    SlurmError,
    SlurmJob,
    _gres_gpus,
    expand_hostlist,
    mem_bytes,
    parse_tres,
)

log = logging.getLogger(__name__)

DEFAULT_SPOOL = Path("/run/greend/slurm-jobs")
RECORD_MAX_BYTES = 8192
"""A hook record is a few hundred bytes; anything larger is not ours and is not read."""
HOOK_ENV = ("SLURM_JOB_ID", "SLURM_JOB_UID", "SLURM_JOB_USER", "SLURM_JOB_ACCOUNT",
            "SLURM_JOB_PARTITION", "SLURM_JOB_NAME", "SLURM_CLUSTER_NAME", "SLURM_JOB_NODELIST",
            "SLURM_JOB_GPUS", "SLURMD_NODENAME", "SLURM_JOB_CONSTRAINTS", "SLURM_SCRIPT_CONTEXT")
"""What slurmd gives Prolog and Epilog (`man slurm.conf`, "Prolog and Epilog Scripts") that greend
keeps. Slurm 22.05 gives neither the submit time nor the allocation's CPUs and memory."""
PROLOG_MAX_AGE_S = 31 * 86400.0
"""A prolog record whose job is no longer on the node is dropped after this long."""
EPILOG_KEEP_S = 3600.0
"""An epilog record is kept this long (the job's end reaches the books well before)."""
FINAL_RETRY_S = 20.0
"""Between two by-id questions about a job that has ended here but is still COMPLETING there."""
FINAL_TRIES = 4


# -- the hook side ------------------------------------------------------------------------------
def write_record(spool: Path, kind: str, env: Mapping[str, str], now: float) -> Path | None:
    """Write the hook record `kind` ("prolog" or "epilog") of the job in `env`; None without a
    job id. One small file, written under a temporary name and renamed: a reader sees all or none."""
    job_id = env.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        return None
    rec = {k: env[k] for k in HOOK_ENV if env.get(k)}
    rec["t"] = now
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = spool / f"{job_id}.{kind}"
    tmp = spool / f".{job_id}.{kind}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, path)
    if kind == "prolog":  # an id used again: the previous job's end is not this one's
        (spool / f"{job_id}.epilog").unlink(missing_ok=True)
    return path


@dataclass(frozen=True, slots=True)
class HookRecord:
    job_id: str
    prolog: dict | None = None
    epilog: dict | None = None
    prolog_t: float = 0.0
    epilog_t: float | None = None


def _trusted(st: os.stat_result) -> bool:
    # Records name a job's owner: only root (or greend's own user, in tests) may have written them.
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def read_spool(spool: Path) -> dict[str, HookRecord]:
    """The hook records in `spool` by job id; a spool that is missing, or writable by others, or a
    record that is unreadable or not owned by root, is skipped (logged at debug level)."""
    try:
        st = os.stat(spool)
    except OSError:
        return {}
    if not _trusted(st):
        log.warning("slurm: ignoring the hook spool %s: it must be owned by root and writable by "
                    "its owner only", spool)
        return {}
    found: dict[str, dict[str, tuple[dict, float]]] = {}
    try:
        entries = list(os.scandir(spool))
    except OSError:
        return {}
    for e in entries:
        job_id, _, kind = e.name.partition(".")
        if not job_id.isdigit() or kind not in ("prolog", "epilog"):
            continue
        try:
            fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd) as f:
                fst = os.fstat(f.fileno())
                if not stat.S_ISREG(fst.st_mode) or not _trusted(fst) or fst.st_size > RECORD_MAX_BYTES:
                    continue
                rec = json.load(f)
            if not isinstance(rec, dict) or rec.get("SLURM_JOB_ID") != job_id:
                continue
            found.setdefault(job_id, {})[kind] = (rec, float(rec.get("t") or fst.st_mtime))
        except (OSError, ValueError, TypeError) as err:
            log.debug("slurm: hook record %s unreadable: %s", e.path, err)
    out = {}
    for job_id, kinds in found.items():
        p, ep = kinds.get("prolog"), kinds.get("epilog")
        if p and ep and ep[1] < p[1]:
            ep = None  # the end of an earlier job under this id
        out[job_id] = HookRecord(job_id, p[0] if p else None, ep[0] if ep else None,
                                 p[1] if p else (ep[1] if ep else 0.0), ep[1] if ep else None)
    return out


def job_from_hook(rec: HookRecord, node: str) -> SlurmJob:
    """What the hooks say of a job: its identity, not its submit time (0 marks that: the books keep
    a provisional identity until slurmctld is asked) nor its allocation, except GPUs."""
    env = rec.prolog or rec.epilog or {}
    uid = env.get("SLURM_JOB_UID", "")
    gpus = env.get("SLURM_JOB_GPUS")
    return SlurmJob(
        job_id=rec.job_id, submit_time=0, state="",
        cluster=env.get("SLURM_CLUSTER_NAME", ""), name=env.get("SLURM_JOB_NAME", ""),
        user=env.get("SLURM_JOB_USER", ""), uid=int(uid) if uid.isdigit() else None,
        account=env.get("SLURM_JOB_ACCOUNT", ""), partition=env.get("SLURM_JOB_PARTITION", ""),
        nodes=tuple(expand_hostlist(env.get("SLURM_JOB_NODELIST", "")) or (node,)),
        alloc_gpus=len([g for g in gpus.split(",") if g]) if gpus is not None else None,
        start_time=int(rec.prolog_t) if rec.prolog is not None else None,
        end_time=int(rec.epilog_t) if rec.epilog_t is not None else None,
    )


# -- what is on the node ------------------------------------------------------------------------
def scan_job_ids(cgroupfs: Path, procfs: Path, node: str) -> set[str]:
    """Ids of the jobs on this node: from the job cgroups (v1: <ctl>/slurm[_<node>]/uid_*/job_*;
    v2: .../[<node>_]slurmstepd.scope/job_*), and where there are none, from SLURM_JOB_ID in the
    environments of processes (slurmstepd's children; a node tracking jobs by process tree)."""
    ids: set[str] = set()
    for name in (f"slurm_{node}", "slurm"):
        base = Path(cgroupfs) / "cpuacct" / name
        if base.is_dir():
            for udir in _scan(base):
                if udir.name.startswith("uid_"):
                    ids |= {j.name[4:] for j in _scan(Path(udir.path)) if j.name.startswith("job_")
                            and j.name[4:].isdigit()}
            return ids
    if (Path(cgroupfs) / "cgroup.controllers").exists():
        for pattern in (f"*/{node}_slurmstepd.scope", "*/slurmstepd.scope",
                        f"{node}_slurmstepd.scope", "slurmstepd.scope"):
            for scope in sorted(Path(cgroupfs).glob(pattern)):
                ids |= {j.name[4:] for j in _scan(scope) if j.name.startswith("job_")
                        and j.name[4:].isdigit()}
            if ids:
                return ids
    return environ_job_ids(procfs)


def _scan(path: Path) -> list[os.DirEntry]:
    try:
        return [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def environ_job_ids(procfs: Path) -> set[str]:
    ids = set()
    for e in _scan(Path(procfs)):
        if not e.name.isdigit():
            continue
        try:
            raw = (Path(e.path) / "environ").read_bytes()
        except OSError:
            continue
        m = re.search(rb"(?:^|\0)SLURM_JOB_ID=(\d+)(?:\0|$)", raw)
        if m:
            ids.add(m[1].decode())
    return ids


# -- asking slurmctld, by id --------------------------------------------------------------------
class TokenBucket:
    """At most `burst` at once and `per_minute` on average."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


_KEY = re.compile(r"[A-Z][A-Za-z0-9_/:]*=")


def parse_show_job(text: str, node: str) -> SlurmJob | None:
    """The job of `scontrol [--local] show job [-d] --oneliner ID` with its allocation on `node`; None when
    slurmctld no longer knows it. Values are split at the next "Key=" (Slurm's keys start with a
    capital letter; greend's footprint entries in a comment do not)."""
    text = text.strip()
    if not text or "Invalid job id" in text:
        return None
    fields: dict[str, str] = {}
    per_node: list[dict[str, str]] = []
    key = None
    for tok in text.split(" "):
        m = _KEY.match(tok)
        if m:
            key, val = tok[: m.end() - 1], tok[m.end():]
            if key == "Nodes" and "JobId" in fields:  # -d: one "Nodes=... CPU_IDs=... Mem=..." per node
                per_node.append({})
        elif key is None:
            continue
        target = per_node[-1] if per_node and key in ("Nodes", "CPU_IDs", "Mem", "GRES") else fields
        if m:
            target[key] = val
        else:
            target[key] += " " + tok
    if "JobId" not in fields:
        raise SlurmError(f"scontrol show job: no JobId in the answer: {text[:200]!r}")
    state = fields.get("JobState", "").split(" ")[0]
    names = expand_hostlist(fields.get("NodeList", "") if fields.get("NodeList") != "(null)" else "")
    tres = parse_tres(fields.get("TRES", "") if fields.get("TRES") != "(null)" else "")
    cpus = mem = gpus = None
    if node in names:
        mine = next((p for p in per_node if node in expand_hostlist(p.get("Nodes", ""))), None)
        if mine is not None:
            cpus = float(_count_cpus(mine.get("CPU_IDs", ""))) or None
            mem = int(mine["Mem"]) * (1 << 20) if mine.get("Mem", "").isdigit() else None
            gpus = _gres_gpus(mine.get("GRES", "").replace("(", ",(")) if mine.get("GRES") else 0
        elif len(names) == 1:
            cpus = float(fields["NumCPUs"]) if fields.get("NumCPUs", "").isdigit() else None
            mem = mem_bytes(tres.get("mem", ""))
        # else (several nodes, no -d): this node's share is left to its job cgroup's cpuset and
        # memory limit, which the cgroups collector reads
        if gpus is None or (not gpus and tres.get("gres/gpu", "").isdigit() and len(names) == 1):
            total = int(tres["gres/gpu"]) if tres.get("gres/gpu", "").isdigit() else (0 if tres else None)
            gpus = total // len(names) if total is not None else None
    user, _, uid = fields.get("UserId", "").partition("(")
    submit = _time(fields.get("SubmitTime"))
    return SlurmJob(
        job_id=fields["JobId"], submit_time=int(submit or 0), state=state,
        cluster=fields.get("ClusterName", ""), name=fields.get("JobName", ""), user=user,
        uid=int(uid.rstrip(")")) if uid.rstrip(")").isdigit() else None,
        account=_null(fields.get("Account")), partition=_null(fields.get("Partition")),
        nodes=tuple(names), alloc_cpus=cpus, alloc_mem_bytes=mem, alloc_gpus=gpus,
        start_time=_time(fields.get("StartTime")) if state != "PENDING" else None,
        end_time=_time(fields.get("EndTime")) if state in FINAL_STATES else None,
        admin_comment=_null(fields.get("AdminComment")), comment=_null(fields.get("Comment")),
    )


def _null(v: str | None) -> str:
    return "" if v in (None, "(null)") else str(v)


def _count_cpus(text: str) -> int:
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            n += int(hi) - int(lo) + 1 if hi.isdigit() else 1
    return n


def _time(v: str | None) -> int | None:
    """Epoch seconds of scontrol's local "2026-12-01T11:33:47"; None for Unknown/None/N/A."""
    try:
        return int(time.mktime(time.strptime(v or "", "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def show_job(commands: SlurmCommands, job_id: str, node: str) -> SlurmJob | None:
    """One job by id: `scontrol --local show job --oneliner ID`, one REQUEST_JOB_INFO_SINGLE and
    nothing else (measured with sdiag on 22.05: without --local scontrol also asks
    REQUEST_FED_INFO, and -d adds a whole REQUEST_NODE_INFO)."""
    try:
        out = commands.run("scontrol", "--local", "show", "job", "--oneliner", str(job_id))
    except SlurmError as e:
        if "Invalid job id" in str(e):
            return None
        raise
    return parse_show_job(out, node)


# -- the backend --------------------------------------------------------------------------------
@dataclass(slots=True)
class _Known:
    job: SlurmJob | None
    asked_at: float
    final_tries: int = 0


class LocalJobs:
    """SlurmMetadata's backend in local discovery: jobs() lists this node's jobs from the hooks'
    spool and the node itself, with what slurmctld said when asked about each by id."""

    def __init__(self, commands: SlurmCommands, spool: Path = DEFAULT_SPOOL, *,
                 cgroupfs: Path = Path("/sys/fs/cgroup"), procfs: Path = Path("/proc"),
                 per_minute: float = 12.0, burst: int = 30, clock: Callable[[], float] = time.time):
        self.commands = commands
        self.spool = Path(spool)
        self.cgroupfs = Path(cgroupfs)
        self.procfs = Path(procfs)
        self.clock = clock
        self.bucket = TokenBucket(per_minute, burst, clock)
        self.lookups = 0  # by-id questions asked
        self.deferred = 0  # by-id questions put off by the rate bound
        self._known: dict[str, _Known] = {}
        self._present: set[str] = set()  # on the node at the last scan
        self._gone: dict[str, float] = {}  # left the node (cgroup gone) at
        self._wanted: set[str] = set()
        self._lock = threading.Lock()
        self.error: SlurmError | None = None
        """Why the last round's by-id questions stopped (the jobs from the node are still given)."""

    def describe(self) -> str:
        return (f"local discovery (hooks' spool {self.spool}, job cgroups or process environments; "
                f"by id: {self.commands.which('scontrol') or 'scontrol (not found)'} show job, at most "
                f"{self.bucket.rate * 60:g}/min)")

    def want(self, job_id: str) -> None:
        """A job the books see on the node (found by a collector) that needs its metadata."""
        with self._lock:  # the sampling thread calls this, jobs() runs in the refresh thread
            self._wanted.add(str(job_id))

    def ended_here(self, job_id: str) -> None:
        """The books saw the job leave the node: slurmctld is asked how it ended."""
        with self._lock:
            self._wanted.discard(str(job_id))
            self._gone.setdefault(str(job_id), self.clock())

    def jobs(self, node: str) -> list[SlurmJob]:
        now = self.clock()
        hooks = read_spool(self.spool)
        here = scan_job_ids(self.cgroupfs, self.procfs, node)
        with self._lock:
            for j in self._present - here:
                self._gone.setdefault(j, now)
            for j in here - self._present:
                if j in self._gone:  # the id is back: another job (ids restart with a new controller)
                    del self._gone[j]
                    self._known.pop(j, None)
            for j, r in hooks.items():
                k = self._known.get(j)
                if k is not None and r.epilog is None and r.prolog_t > k.asked_at and (
                        k.job is None or k.job.ended):
                    self._known.pop(j)  # a Prolog after the last answer: a new job under this id
                    self._gone.pop(j, None)
            self._present = here
            ids = here | self._wanted | {j for j, r in hooks.items() if r.epilog is None} | set(self._gone)
            gone = set(self._gone)
        ids |= {j for j, r in hooks.items() if r.epilog_t is not None and now - r.epilog_t < EPILOG_KEEP_S}
        out = []
        error: SlurmError | None = None
        for job_id in sorted(ids, key=int):
            rec = hooks.get(job_id)
            ended_here = job_id in gone or (rec is not None and rec.epilog is not None)
            k = self._known.get(job_id)
            # Asked once when it appears, and after it ended here until slurmctld says how it
            # ended (a job slurmctld did not know is not asked about again).
            need = k is None or (
                ended_here and k.job is not None and not k.job.ended and k.final_tries < FINAL_TRIES
                and now - k.asked_at >= (0 if k.final_tries == 0 else FINAL_RETRY_S))
            if need and error is None:
                if self.bucket.take():
                    self.lookups += 1
                    try:
                        job = show_job(self.commands, job_id, node)
                    except SlurmError as e:
                        error = e  # slurmctld unreachable: no more questions this round
                    else:
                        if k is None:
                            k = self._known[job_id] = _Known(job, now)
                        else:
                            k.job, k.asked_at = job or k.job, now
                        if ended_here:
                            k.final_tries += 1
                else:
                    self.deferred += 1
            job = k.job if k is not None else None
            if job is None and rec is not None:
                job = job_from_hook(rec, node)
            elif job is not None and rec is not None:
                if not job.cluster:  # scontrol show job does not name the cluster; the hook does
                    job = replace(job, cluster=job_from_hook(rec, node).cluster)
                if rec.epilog_t is not None and not job.ended and job.end_time is None:
                    # ended here (Epilog) while slurmctld still holds it COMPLETING
                    job = replace(job, end_time=int(rec.epilog_t))
            if job is not None:
                out.append(job)
        self._forget(hooks, here, now)
        self.error = error
        if error is not None and not out:
            raise error
        return out

    def _forget(self, hooks: dict[str, HookRecord], here: set[str], now: float) -> None:
        with self._lock:
            for job_id, t in list(self._gone.items()):
                if now - t > EPILOG_KEEP_S and job_id not in here:
                    del self._gone[job_id]
                    self._known.pop(job_id, None)
        for job_id, rec in hooks.items():
            old = (rec.epilog_t is not None and now - rec.epilog_t > EPILOG_KEEP_S) or (
                rec.epilog_t is None and job_id not in here and now - rec.prolog_t > PROLOG_MAX_AGE_S)
            if old:
                for kind in ("prolog", "epilog"):
                    try:
                        (self.spool / f"{job_id}.{kind}").unlink(missing_ok=True)
                    except OSError:
                        pass
        if len(self._known) > 20000:
            for job_id in sorted(self._known, key=lambda j: self._known[j].asked_at)[:10000]:
                if job_id not in here:
                    del self._known[job_id]
