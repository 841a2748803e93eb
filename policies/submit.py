"""Submitting a routed job: sbatch on the chosen cluster (its SLURM_CONF), as the invoking user,
recorded in the ledger's `decisions` table with the job id.

A job is never submitted twice: every submission carries a unique token in --comment; when sbatch
times out, squeue is asked whether a job with that name and token exists before anything else is
tried. Only a controller that demonstrably did not take the job (it refused the connection, or
squeue shows no such job) makes greend try the next cluster.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path

from greend.collectors.slurmcli import first_error, json_failure

from .records import Record
from .state import run_slurm

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NOT_SUBMITTED = 1
EXIT_UNKNOWN = 75  # EX_TEMPFAIL: the job may or may not be queued; the message says how to check

# sbatch's messages when the controller never got the job.
_UNREACHABLE = ("unable to contact slurm controller", "connection refused", "connect failure",
                "zero bytes were transmitted", "slurm.conf", "command not found", "no route to host")


class DecisionLog:
    """The `decisions` table of the ledger (ledger migration 3 creates it when the ledger opens)."""

    def __init__(self, ledger):
        self.ledger = ledger

    def record(self, token: str, t: float, user: str, uid: int, decision, outcome: str) -> None:
        r = decision.request
        plan = decision.plan
        est = plan.estimate if plan else None
        with self.ledger.transaction() as db:
            db.execute(
                "INSERT INTO decisions (token, t, user, uid, script, job_name, account, outcome, cluster,"
                " tier, partition, begin, nice, energy_j, carbon_g, water_l, decision) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (token, t, user, uid, str(r.script) if r.script else None, r.job_name, r.account or "",
                 outcome, plan.cluster if plan else None, plan.tier if plan else None,
                 plan.partition if plan else None, plan.begin if plan else None,
                 plan.nice if plan else None,
                 est.footprint.facility_energy_j if est else None, est.footprint.carbon_g if est else None,
                 est.footprint.water_l if est else None, json.dumps(decision.to_dict())),
            )

    def update(self, token: str, outcome: str, plan=None, job_id: str | None = None,
               tried: list | None = None) -> None:
        sets, args = ["outcome = ?"], [outcome]
        if plan is not None:
            sets += ["cluster = ?", "tier = ?", "partition = ?", "begin = ?", "nice = ?"]
            args += [plan.cluster, plan.tier, plan.partition, plan.begin, plan.nice]
            if plan.estimate is not None:
                f = plan.estimate.footprint
                sets += ["energy_j = ?", "carbon_g = ?", "water_l = ?"]
                args += [f.facility_energy_j, f.carbon_g, f.water_l]
        if job_id is not None:
            sets.append("job_id = ?")
            args.append(job_id)
        if tried is not None:
            sets.append("tried = ?")
            args.append(json.dumps(tried))
        with self.ledger.transaction() as db:
            db.execute(f"UPDATE decisions SET {', '.join(sets)} WHERE token = ?", (*args, token))

    def get(self, token: str) -> dict | None:
        row = self.ledger.db.execute("SELECT * FROM decisions WHERE token = ?", (token,)).fetchone()
        return dict(row) if row else None


class Submission(Record):
    outcome: str  # submitted, refused, no_cluster, failed, unknown
    token: str
    cluster: str | None
    partition: str | None
    job_id: str | None
    plan: object
    tried: list[dict]
    message: str
    command: list[str]

    __slots__ = ("cluster", "command", "job_id", "message", "outcome", "partition", "plan", "token", "tried")

    def __init__(
        self,
        outcome: str,
        token: str,
        cluster: str | None = None,
        partition: str | None = None,
        job_id: str | None = None,
        plan: object = None,
        tried: list[dict] | None = None,
        message: str = "",
        command: list[str] | None = None,
    ):
        self.outcome = outcome
        self.token = token
        self.cluster = cluster
        self.partition = partition
        self.job_id = job_id
        self.plan = plan
        self.tried = [] if tried is None else tried
        self.message = message
        self.command = [] if command is None else command

    @property
    def exit_status(self) -> int:
        if self.outcome == "submitted":
            return EXIT_OK
        return EXIT_UNKNOWN if self.outcome == "unknown" else EXIT_NOT_SUBMITTED

    def to_dict(self) -> dict:
        return {"outcome": self.outcome, "token": self.token, "cluster": self.cluster,
                "partition": self.partition, "job_id": self.job_id, "tried": self.tried,
                "message": self.message, "command": self.command}


def _unreachable(rc: int, err: str) -> bool:
    low = err.lower()
    return rc in (126, 127) or any(s in low for s in _UNREACHABLE)


def find_by_token(cluster, job_name: str, token: str) -> str | bool | None:
    """The job id of a job named job_name whose comment carries token; False when squeue answers
    and there is none; None when squeue does not answer either."""
    try:
        rc, out, _ = run_slurm(cluster.slurm, ["squeue", "--json"], cluster.slurm.timeout_s * 3)
    except TimeoutError:
        return None
    if rc != 0:
        return None
    try:
        data = json.loads(out)
    except ValueError:
        return None
    if json_failure(data, "jobs"):  # exit 0 with only an error: the controller did not answer
        return None
    for j in data["jobs"]:
        if j.get("name") == job_name and token in str(j.get("comment") or ""):
            # an array's tasks are listed one by one: the job is the array's own id
            return str(j.get("array_job_id") or j.get("job_id"))
    return False


def _rest_submit(spec, request, plan, comment: str, script: Path) -> tuple[int, str, str]:
    """Submit through the cluster's slurmrestd with the user's own token: sbatch's (exit status,
    stdout, stderr), an unreachable service reported as sbatch reports a controller it cannot
    contact (so the next cluster is tried)."""
    from . import transport

    try:
        text = Path(script).read_text()
        job = transport.job_description(request, plan, comment, os.getcwd())
        return 0, transport.submit(spec, text, job, spec.submit_timeout_s), ""
    except OSError as e:
        return 1, "", f"sbatch: error: cannot read {script}: {e.strerror}"
    except transport.RestError as e:
        if e.unreachable:
            return 1, "", f"sbatch: error: {e} (connect failure)"
        return 1, "", f"sbatch: error: {e}"


def ssh_sbatch_argv(request, plan, comment: str) -> list[str]:
    """sbatch's command line on an ssh cluster's login node (the script comes on stdin, so the job
    is named here: sbatch would call it "sbatch")."""
    name = [f"--job-name={request.job_name}"] if request.job_name else []
    return ["sbatch", "--parsable", f"--comment={comment}", *name, *plan.sbatch_options(request)]


def _ssh_submit(spec, request, plan, comment: str, script: Path) -> tuple[int, str, str]:
    """Submit on the cluster's login node through the user's own ssh, the script on stdin:
    sbatch's (exit status, stdout, stderr); a login node that cannot be reached is reported as
    sbatch reports a controller it cannot contact (so the next cluster is tried)."""
    from . import transport

    try:
        text = Path(script).read_text()
    except OSError as e:
        return 1, "", f"sbatch: error: cannot read {script}: {e.strerror}"
    try:
        return transport.ssh_run(spec, ssh_sbatch_argv(request, plan, comment), spec.submit_timeout_s,
                                 stdin=text)
    except transport.SshError as e:
        return 1, "", f"sbatch: error: {e}" + (" (connect failure)" if e.unreachable else "")


def submit(engine, decision, script: Path, decisions: DecisionLog | None, *,
           user: str, now: float | None = None) -> Submission:
    """sbatch the script where the decision says; fall back to the next eligible clusters only when
    a controller did not take the job. The invoking user's own identity is used: never setuid."""
    if os.geteuid() != os.getuid():
        raise PermissionError("greend submit must run with the invoking user's own identity "
                              "(real and effective uid differ)")
    now = time.time() if now is None else now
    token = f"greend-{secrets.token_hex(6)}"
    r = decision.request
    sub = Submission(outcome="pending", token=token)
    if decisions is not None:
        decisions.record(token, now, user, os.getuid(), decision, "pending")
    if decision.plan is None:
        sub.outcome, sub.message = "no_cluster", decision.summary()
    elif decision.plan.refused:
        sub.outcome, sub.message = "refused", decision.plan.refused
    else:
        order = [decision.plan.cluster, *decision.fallbacks]
        comment = f"{r.comment} {token}" if r.comment else token
        for i, name in enumerate(order):
            plan = decision.plan if i == 0 else engine.plan_for(decision, name)
            if plan.refused:
                sub.tried.append({"cluster": name, "result": f"refused: {plan.refused}"})
                continue
            cluster = engine.site.cluster(name)
            argv = ["sbatch", "--parsable", f"--comment={comment}", *plan.sbatch_options(r), str(script)]
            sub.command = cluster.slurm.argv(argv)
            try:
                if cluster.slurm.transport == "rest":
                    from .transport import url

                    sub.command = ["POST", url(cluster.slurm, "job/submit")]
                    rc, out, err = _rest_submit(cluster.slurm, r, plan, comment, script)
                elif cluster.slurm.transport == "ssh":
                    from .transport import ssh_argv

                    spec = cluster.slurm
                    sub.command = ssh_argv(spec, ssh_sbatch_argv(r, plan, comment), spec.submit_timeout_s)
                    rc, out, err = _ssh_submit(spec, r, plan, comment, script)
                else:
                    # GREEND_SUBMIT tells a greend cli_filter (docs/policy.md) that this job is routed.
                    rc, out, err = run_slurm(cluster.slurm, argv, cluster.slurm.submit_timeout_s,
                                             extra_env={"GREEND_SUBMIT": token})
                # "Socket timed out": the controller may have queued the job before the reply was lost.
                timed_out = rc != 0 and "timed out" in err.lower()
            except TimeoutError:
                rc, out, err, timed_out = -1, "", "", True
            if timed_out:
                found = find_by_token(cluster, r.job_name, token)
                if found is None:
                    sub.outcome = "unknown"
                    sub.cluster, sub.partition, sub.plan = name, plan.partition, plan
                    conf = cluster.slurm.conf or "(default)"
                    how = (f"ssh {cluster.slurm.ssh_host} squeue" if cluster.slurm.transport == "ssh"
                           else f"SLURM_CONF={conf} squeue")
                    sub.message = (f"sbatch on {name} did not answer within "
                                   f"{cluster.slurm.submit_timeout_s:g} s and squeue does not answer either: "
                                   f"the job may be queued there. Check with {how} "
                                   f"--name={r.job_name} -o '%i %k' for comment {token} before submitting "
                                   "again")
                    sub.tried.append({"cluster": name, "result": "sbatch timed out; squeue did not answer"})
                    break
                if found is not False:
                    sub.outcome, sub.job_id = "submitted", found
                    sub.cluster, sub.partition, sub.plan = name, plan.partition, plan
                    sub.tried.append({"cluster": name,
                                      "result": f"sbatch timed out; squeue shows job {found}"})
                    break
                sub.tried.append({"cluster": name, "result": "sbatch timed out; squeue shows no such job: "
                                  "not submitted"})
                continue
            if rc == 0:
                sub.outcome = "submitted"
                sub.job_id = out.strip().split(";")[0]
                sub.cluster, sub.partition, sub.plan = name, plan.partition, plan
                sub.tried.append({"cluster": name, "result": f"job {sub.job_id}"})
                break
            msg = first_error(err or out)
            if _unreachable(rc, err):
                sub.tried.append({"cluster": name, "result": f"controller did not take the job: {msg}"})
                continue
            sub.outcome, sub.cluster, sub.plan = "failed", name, plan
            sub.message = f"sbatch on {name} refused the job: {msg}"
            sub.tried.append({"cluster": name, "result": f"sbatch failed: {msg}"})
            break
        else:
            sub.outcome = "failed"
            sub.message = "no cluster's controller took the job: " + "; ".join(
                f"{t['cluster']}: {t['result']}" for t in sub.tried)
    if decisions is not None:
        decisions.update(token, sub.outcome, plan=sub.plan, job_id=sub.job_id, tried=sub.tried)
    return sub
