"""Reaching a cluster of another administrative domain: its Slurm REST API (slurmrestd with
auth/jwt), with the user's own token from that centre (docs/slurm.md, "Transports").

greend never holds a token on a user's behalf beyond the request: the token is read from the
user's environment (SlurmAccess.token_env) or the user's own file (token_file) for each request,
sent in X-SLURM-USER-TOKEN and dropped. The job runs as the token's user.
"""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path


class RestError(Exception):
    """A REST request that failed; `unreachable` when slurmrestd never took the request."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        raise RestError(f"uid {os.getuid()} has no user name: slurmrestd needs X-SLURM-USER-NAME") from None


def token(spec, env: dict[str, str] | None = None) -> str:
    """The user's own token for this cluster: ${token_env}, else token_file; RestError naming
    both when neither holds one."""
    env = os.environ if env is None else env
    tok = env.get(spec.token_env, "").strip()
    if tok:
        return tok
    if spec.token_file is not None:
        path = Path(os.path.expanduser(str(spec.token_file)))
        try:
            tok = path.read_text().strip()
        except OSError as e:
            raise RestError(f"token_file {path}: cannot read the token: {e.strerror}") from None
        if tok:
            return tok
        raise RestError(f"token_file {path} is empty: expected the token from that centre "
                        "(e.g. `scontrol token` there)")
    raise RestError(f"no token for {spec.rest_url}: set ${spec.token_env} to your own token from that "
                    "centre (e.g. `scontrol token` on its login node)")


def request(spec, method: str, path: str, body: dict | None, timeout_s: float,
            env: dict[str, str] | None = None) -> dict:
    """One request to the cluster's slurmrestd as the invoking user; the answer's JSON. Raises
    RestError (unreachable: the service never answered) and TimeoutError."""
    import urllib.error
    import urllib.request

    url = f"{spec.rest_url}/slurm/{spec.rest_api}/{path.lstrip('/')}"
    headers = {"X-SLURM-USER-NAME": user_name(), "X-SLURM-USER-TOKEN": token(spec, env),
               "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raw = e.read()
        msg = _errors(raw) or f"HTTP {e.code} {e.reason}"
        if e.code in (401, 403):
            msg = f"{msg} (HTTP {e.code}: is the token yours, from that centre, and not expired?)"
        raise RestError(f"slurmrestd {spec.rest_url}: {msg}") from None
    except TimeoutError:
        raise TimeoutError(f"slurmrestd {spec.rest_url} did not answer within {timeout_s:g} s") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RestError(f"slurmrestd {spec.rest_url}: connect failure: {reason}", unreachable=True) from None
    try:
        out = json.loads(raw or b"{}")
    except ValueError:
        raise RestError(f"slurmrestd {url}: the answer is not JSON") from None
    errs = _errors(raw)
    if errs:
        raise RestError(f"slurmrestd {spec.rest_url}: {errs}")
    return out


def _errors(raw: bytes) -> str:
    try:
        errs = json.loads(raw).get("errors") or []
    except (ValueError, AttributeError):
        return ""
    return "; ".join(str(e.get("description") or e.get("error") or e) if isinstance(e, dict) else str(e)
                     for e in errs)


def job_description(request, plan, comment: str, cwd: str) -> dict:
    """The job of a routed request as slurmrestd takes it (v0.0.38 job_properties): slurmrestd
    does not read the script's #SBATCH lines, so everything greend parsed from them is given here."""
    r = request
    if r.array_tasks > 1:
        raise RestError("array jobs are not submitted through slurmrestd by greend: submit it on that "
                        "centre's login node")
    job: dict = {"name": r.job_name or "greend-job", "comment": comment,
                 "current_working_directory": cwd,
                 "environment": {"PATH": "/usr/local/bin:/usr/bin:/bin",
                                 "GREEND_SUBMIT": comment.split()[-1]},
                 "nodes": r.nodes, "tasks": r.ntasks, "cpus_per_task": r.cpus_per_task}
    if plan.partition:
        job["partition"] = plan.partition
    if r.account:
        job["account"] = r.account
    if r.qos:
        job["qos"] = r.qos
    if r.walltime_s:
        job["time_limit"] = max(1, -(-r.walltime_s // 60))
    if r.mem_mb and not r.mem_whole_node:
        job["memory_per_node"] = int(-(-r.mem_mb // max(1, r.nodes)))  # total MB -> per node
    if r.gpus:
        job["tres_per_node"] = f"gres/gpu:{r.gpu_type}:{r.gpus}" if r.gpu_type else f"gres/gpu:{r.gpus}"
    begin = plan.begin if plan.begin is not None and plan.begin > (r.begin or 0) else r.begin
    if begin:
        job["begin_time"] = int(begin)
    nice = max(plan.nice, r.nice or 0) if plan.nice is not None else r.nice
    if nice:
        job["nice"] = nice
    job["standard_output"] = os.path.join(cwd, "slurm-%j.out")
    return job


def submit(spec, script_text: str, job: dict, timeout_s: float) -> str:
    """POST job/submit; the new job's id."""
    out = request(spec, "POST", "job/submit", {"script": script_text, "job": job}, timeout_s)
    job_id = out.get("job_id")
    if job_id is None:
        raise RestError(f"slurmrestd {spec.rest_url}: the answer names no job id")
    return str(job_id)
