"""Past jobs from Slurm's accounting (`sacct`): what Slurm recorded about each job, as typed records.

The site's whole record, including jobs greend never saw. Read with `sacct --parsable2` and a
unit-separator delimiter rather than `sacct --json`: 22.05's JSON leaves a job's `user` null and is
about fifty times larger, and a job name or comment may contain `|`. Times come as epoch seconds
(SLURM_TIME_FORMAT=%s).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .slurm import FINAL_STATES, SlurmCommands, SlurmError, mem_bytes, parse_tres

log = logging.getLogger(__name__)

DELIM = "\x1f"
FIELDS = (
    "JobIDRaw", "JobID", "Cluster", "User", "UID", "Account", "Partition", "JobName", "State",
    "Submit", "Start", "End", "ElapsedRaw", "TimelimitRaw", "TotalCPU", "AllocTRES", "NNodes",
    "NodeList", "MaxRSS", "AdminComment", "ExitCode",
)


class SacctError(SlurmError):
    """sacct failed or answered something unreadable; the message says which."""


@dataclass(frozen=True, slots=True)
class SacctJob:
    """One job as Slurm's accounting records it (its steps folded in)."""

    cluster: str
    job_id: str
    """JobID as users write it: "123", or "120_3" for an array task."""
    job_id_raw: str
    name: str
    user: str
    uid: int | None
    account: str
    partition: str
    state: str
    """Base state: COMPLETED, FAILED, CANCELLED, RUNNING, ... ("CANCELLED by 0" -> CANCELLED)."""
    submit_time: int | None
    start_time: int | None
    end_time: int | None
    elapsed_s: float
    time_limit_s: float | None
    cpu_time_s: float
    """TotalCPU: user + system CPU time of all steps (Slurm's own accounting)."""
    alloc_cpus: float
    alloc_mem_bytes: int | None
    alloc_gpus: int
    alloc_nodes: int
    nodes: str
    max_rss_bytes: int | None
    """Highest MaxRSS of any step (per task, as Slurm measures it); None if not recorded (0 is
    taken as not recorded: jobacct_gather/cgroup on cgroup v1 reports 0 on 22.05)."""
    admin_comment: str
    exit_code: str

    @property
    def ended(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def cpu_efficiency(self) -> float | None:
        """CPU time / (allocated CPUs x elapsed), as seff computes it."""
        den = self.alloc_cpus * self.elapsed_s
        return self.cpu_time_s / den if den > 0 else None

    @property
    def mem_efficiency(self) -> float | None:
        if not self.alloc_mem_bytes or self.max_rss_bytes is None:
            return None
        return self.max_rss_bytes / self.alloc_mem_bytes


def _epoch(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) > 0 else None


_CPU_RE = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)$")


def cpu_seconds(text: str) -> float:
    """sacct's TotalCPU: "[D-][HH:]MM:SS[.mmm]" -> seconds (0 for empty or unreadable)."""
    m = _CPU_RE.match(text.strip())
    if not m:
        return 0.0
    days, hours, mins, secs = m.groups()
    return int(days or 0) * 86400 + int(hours or 0) * 3600 + int(mins) * 60 + float(secs)


def _rss(text: str) -> int | None:
    # MaxRSS is "1234K", "12M", ... (K by default); empty for steps without data.
    if not text:
        return None
    return mem_bytes(text if text[-1].isalpha() else text + "K")


def _when(t: float) -> str:
    # sacct takes local time for --starttime/--endtime (epoch seconds are refused).
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def _base_state(text: str) -> str:
    return text.split()[0] if text.split() else ""


def parse_sacct(text: str) -> list[SacctJob]:
    """Jobs from `sacct -P --delimiter=<US> -o <FIELDS>` output (with or without the header)."""
    jobs: dict[str, dict] = {}
    rss: dict[str, int] = {}
    order: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("JobIDRaw" + DELIM):
            continue
        parts = line.split(DELIM)
        if len(parts) != len(FIELDS):
            log.warning("sacct line %d has %d fields, expected %d: skipped", lineno, len(parts),
                        len(FIELDS))
            continue
        row = dict(zip(FIELDS, parts, strict=True))
        raw = row["JobIDRaw"]
        if "." in raw:  # a step: its MaxRSS counts for the job
            job = raw.split(".", 1)[0]
            r = _rss(row["MaxRSS"])
            if r is not None:
                rss[job] = max(rss.get(job, 0), r)
            continue
        if raw not in jobs:
            order.append(raw)
        jobs[raw] = row
    out = []
    for raw in order:
        row = jobs[raw]
        tres = parse_tres(row["AllocTRES"])
        gpus = tres.get("gres/gpu", "0")
        limit = row["TimelimitRaw"]
        out.append(SacctJob(
            cluster=row["Cluster"], job_id=row["JobID"], job_id_raw=raw, name=row["JobName"],
            user=row["User"], uid=int(row["UID"]) if row["UID"].isdigit() else None,
            account=row["Account"], partition=row["Partition"], state=_base_state(row["State"]),
            submit_time=_epoch(row["Submit"]), start_time=_epoch(row["Start"]),
            end_time=_epoch(row["End"]),
            elapsed_s=float(row["ElapsedRaw"]) if row["ElapsedRaw"].isdigit() else 0.0,
            time_limit_s=float(limit) * 60 if limit.isdigit() else None,
            cpu_time_s=cpu_seconds(row["TotalCPU"]),
            alloc_cpus=float(tres["cpu"]) if tres.get("cpu", "").isdigit() else 0.0,
            alloc_mem_bytes=mem_bytes(tres["mem"]) if "mem" in tres else None,
            alloc_gpus=int(gpus) if gpus.isdigit() else 0,
            alloc_nodes=int(row["NNodes"]) if row["NNodes"].isdigit() else 0,
            nodes=row["NodeList"], max_rss_bytes=rss.get(raw) or None,
            admin_comment=row["AdminComment"], exit_code=row["ExitCode"],
        ))
    return out


class Sacct:
    """sacct for one cluster's accounting (SLURM_CONF), bounded by a timeout."""

    def __init__(self, conf: Path | None = None, bin_dir: Path | None = None, timeout_s: float = 30.0):
        self.commands = SlurmCommands(conf, bin_dir, timeout_s)
        self.commands.env["SLURM_TIME_FORMAT"] = "%s"

    def _query(self, *args: str) -> list[SacctJob]:
        try:
            out = self.commands.run("sacct", "--parsable2", "--noheader", f"--delimiter={DELIM}",
                                    "--format=" + ",".join(FIELDS), *args)
        except SlurmError as e:
            raise SacctError(str(e)) from None
        return parse_sacct(out)

    def job(self, job_id: str, cluster: str | None = None) -> SacctJob | None:
        """The job (newest record where a reused id has several), or None if sacct does not know it."""
        args = ["--jobs", str(job_id)]
        if cluster:
            args += ["--clusters", cluster]
        jobs = [j for j in self._query(*args) if str(job_id) in (j.job_id, j.job_id_raw)]
        if not jobs:
            return None
        return max(jobs, key=lambda j: j.submit_time or 0)

    def jobs(self, since: float, until: float | None = None, *, user: str | None = None,
             name: str | None = None, account: str | None = None, cluster: str | None = None,
             ended_only: bool = True) -> list[SacctJob]:
        """Jobs that ran between since and until (epoch seconds), every user's unless `user`."""
        # With --state, sacct needs --endtime too (without it, it matches nothing); "now" to the
        # second would miss a job that ended in the current second.
        end = until if until is not None else time.time() + 60
        args = ["--starttime", _when(since), "--endtime", _when(end)]
        args += ["--user", user] if user else ["--allusers"]
        if name:
            args += ["--name", name]
        if account:
            args += ["--accounts", account]
        if cluster:
            args += ["--clusters", cluster]
        if ended_only:
            args += ["--state", ",".join(sorted(FINAL_STATES - {"REVOKED", "SPECIAL_EXIT"}))]
        return self._query(*args)

    def set_admin_comment(self, job_id: str, text: str, cluster: str | None = None) -> None:
        """Write a finished job's AdminComment in accounting (needs root, SlurmUser or an admin)."""
        where = ["where", f"jobid={job_id}"] + ([f"cluster={cluster}"] if cluster else [])
        try:
            out = self.commands.run("sacctmgr", "-i", "modify", "job", *where, "set",
                                    f"AdminComment={text}")
        except SlurmError as e:
            raise SacctError(str(e)) from None
        if "Modified" not in out:
            raise SacctError(f"sacctmgr modify job {job_id}: nothing modified ({out.strip()[:200]})")
