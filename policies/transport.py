"""Reaching a cluster of another administrative domain (docs/slurm.md, "Transports"): its Slurm
REST API (slurmrestd with auth/jwt) with the user's own token from that centre, or its login node
through the user's own ssh.

greend never holds a token on a user's behalf beyond the request: the token is read from the
user's environment (SlurmAccess.token_env) or the user's own file (token_file) for each request,
sent in X-SLURM-USER-TOKEN and dropped. The job runs as the token's user.

ssh runs as the user who asked, with their own keys, agent and known_hosts, never as root (a root
greend, the daemon, does not reach such a cluster at all): `ssh -o BatchMode=yes HOST sbatch
--parsable ...` with the script on stdin, and `squeue --json` / `sinfo --json` for live state.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import shlex
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


def url(spec, path: str) -> str:
    """The address of `path` (e.g. "job/submit") on the cluster's slurmrestd, in its API version."""
    return f"{spec.rest_url}/slurm/{spec.rest_api}/{path.lstrip('/')}"


def request(spec, method: str, path: str, body: dict | None, timeout_s: float,
            env: dict[str, str] | None = None) -> dict:
    """One request to the cluster's slurmrestd as the invoking user; the answer's JSON. Raises
    RestError (unreachable: the service never answered) and TimeoutError."""
    import urllib.error
    import urllib.request

    where = url(spec, path)
    headers = {"X-SLURM-USER-NAME": user_name(), "X-SLURM-USER-TOKEN": token(spec, env),
               "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(where, data=data, headers=headers, method=method)
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
        raise RestError(f"slurmrestd {where}: the answer is not JSON") from None
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
    job: dict = {"name": r.job_name or "greend-job", "comment": comment,
                 "current_working_directory": cwd,
                 "environment": {"PATH": "/usr/local/bin:/usr/bin:/bin",
                                 "GREEND_SUBMIT": comment.split()[-1]},
                 "nodes": r.nodes, "tasks": r.ntasks, "cpus_per_task": r.cpus_per_task}
    if plan.partition:
        job["partition"] = plan.partition
    if r.array:
        job["array"] = r.array  # Slurm's own syntax, "%N" throttle included (v0.0.38 job_properties)
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
    # sbatch's default names: slurm-%A_%a.out for an array's tasks (one file each), else slurm-%j.out
    job["standard_output"] = os.path.join(cwd, "slurm-%A_%a.out" if r.array else "slurm-%j.out")
    return job


def submit(spec, script_text: str, job: dict, timeout_s: float) -> str:
    """POST job/submit; the new job's id."""
    out = request(spec, "POST", "job/submit", {"script": script_text, "job": job}, timeout_s)
    job_id = out.get("job_id")
    if job_id is None:
        raise RestError(f"slurmrestd {spec.rest_url}: the answer names no job id")
    return str(job_id)


# -- ssh -------------------------------------------------------------------------------------------
class SshError(Exception):
    """ssh itself failed (exit status 255: the remote command never ran); `unreachable` when the
    login node could not be reached at all, so the next cluster may be tried."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def ssh_argv(spec, remote: list[str], timeout_s: float) -> list[str]:
    """The ssh command line running `remote` (a Slurm command) on the cluster's login node. greend's
    own options come first: for ssh the first value of an option wins, so ssh_options cannot turn
    BatchMode off (no prompt for a password or a host key: greend has no terminal to ask on)."""
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, math.ceil(timeout_s))}"]
    if spec.ssh_port:
        argv += ["-p", str(spec.ssh_port)]
    if spec.ssh_user:
        argv += ["-l", spec.ssh_user]
    for opt in spec.ssh_options:
        argv += ["-o", opt]
    # ssh hands the remote command to the login shell as one string: each word is quoted.
    return [*argv, "--", spec.ssh_host, shlex.join([spec.command(remote[0]), *remote[1:]])]


def _ssh_failure(spec, err: str) -> SshError:
    """ssh's own error (exit status 255) as a message naming the cluster's settings to check."""
    where = f"{spec.ssh_user + '@' if spec.ssh_user else ''}{spec.ssh_host}" + (
        f" port {spec.ssh_port}" if spec.ssh_port else "")
    low = err.lower()
    last = " ".join(err.strip().splitlines()[-1:]) if err.strip() else "exit status 255"
    if "host key verification failed" in low or "host key for" in low:
        return SshError(f"ssh to {where} ({spec.key}.ssh_host): the login node's host key is unknown "
                        "or has changed in your known_hosts: check it and add it (e.g. `ssh "
                        f"{spec.ssh_host}` once, or UserKnownHostsFile in {spec.key}.ssh_options); "
                        "greend never accepts a host key for you")
    if "permission denied" in low or "too many authentication failures" in low:
        return SshError(f"ssh to {where}: authentication refused ({last}): greend uses your own keys "
                        f"and ssh-agent without a password prompt; check {spec.key}.ssh_user and the "
                        f"IdentityFile in {spec.key}.ssh_options, or load your key with ssh-add")
    if any(s in low for s in ("connection refused", "could not resolve", "timed out", "no route to host",
                              "network is unreachable", "connection closed", "connection reset")):
        return SshError(f"ssh to {where} ({spec.key}.ssh_host): cannot reach the login node: {last}",
                        unreachable=True)
    return SshError(f"ssh to {where} ({spec.key}): {last}")


def ssh_run(spec, remote: list[str], timeout_s: float, stdin: str | None = None) -> tuple[int, str, str]:
    """Run a Slurm command on the cluster's login node as the invoking user: the remote command's
    (exit status, stdout, stderr). Raises SshError when ssh itself fails, TimeoutError after
    timeout_s (ssh and what it started are killed)."""
    import signal
    import subprocess

    if os.geteuid() == 0:
        # root's keys are greend's, not the user's: a root greend never logs in for anyone.
        raise SshError(f"{spec.key}: transport = \"ssh\" is used as the user who asks (their own ssh), "
                       "never as root: run greend route/submit as yourself")
    argv = ssh_argv(spec, remote, timeout_s)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace", start_new_session=True)
    except OSError as e:
        raise SshError(f"{spec.key}: cannot run ssh: {e.strerror} (transport = \"ssh\" needs the "
                       "OpenSSH client)", unreachable=True) from None
    try:
        out, err = proc.communicate(input=stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.communicate()
        raise TimeoutError(f"ssh to {spec.ssh_host} ({spec.key}): {remote[0]} did not answer within "
                           f"{timeout_s:g} s") from None
    except BaseException:
        proc.kill()
        raise
    if proc.returncode == 255:
        raise _ssh_failure(spec, err)
    return proc.returncode, out, err
