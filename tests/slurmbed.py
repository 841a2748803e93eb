"""Helpers for tests that use the real Slurm testbed (testbed/slurm-testbed).

    tb = ensure_testbed()              # starts the three clusters once per process
    job_id = tb.submit("site", "#!/bin/bash\\nsleep 30\\n")
    job = tb.wait_started("site", job_id, timeout=30)
    tb.run("site", "scontrol", "listpids", str(job_id))
    tb.cancel_all()

Clusters (see `testbed/slurm-testbed --help`): local (local-n1, 2 CPUs), site (site-n1, site-n2,
4 CPUs each), national (national-n1, 8 CPUs); partitions debug (default) and batch. Jobs are
submitted as the unprivileged user greendtest (uid 4242) and run in /tmp.

Accounting: the clusters report to slurmdbd (local and site to one, national to another), so
`tb.sacct(cluster, job_id)` reads a finished job's record. Hooks: slurmctld's EpilogSlurmctld and
MailProg, and slurmd's Prolog and Epilog, run <base>/<cluster>/etc/<name>.hook (epilog-slurmctld,
mailprog, prolog, epilog) when a test installs one (`with tb.hook("site", "mailprog", script): ...`),
with SLURM_CONF set.

Two testbeds on one host: set GREEND_TESTBED_DIR and GREEND_TESTBED_PORT_BASE (the script's
own variables; job ids then start at (PORT_BASE - 16800) * 100 + 1, so their cgroups differ).

Slurm 22.05 notes: `scontrol show job` has no --json (that came in 23.02); use `job()` instead,
which reads `squeue --json`. In 22.05 `squeue --json` ignores its filters and returns every job
the controller knows, including finished ones for MinJobAge (600 s). "job_state" is a string
in 22.05 and a list in later versions; `job_state()` accepts both. sstat has no TotalCPU field:
use AveCPU or the cpu= part of TRESUsageInTot, with --allsteps (or -j <id>.batch), since a batch
job has no step that plain `sstat -j <id>` would pick.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "testbed" / "slurm-testbed"
CLUSTERS = ("local", "site", "national")
TEST_USER = "greendtest"
TEST_UID = 4242
CGROUP_ROOT = Path("/sys/fs/cgroup")

# Job states after which a job does not change any more.
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


class TestbedError(RuntimeError):
    """The testbed could not be started or a Slurm command failed."""

    __test__ = False  # not a test class, despite the name


def base_dir() -> Path:
    return Path(os.environ.get("GREEND_TESTBED_DIR", "/tmp/greend-testbed"))


def job_state(job: dict) -> str:
    """The job's base state: "RUNNING", "COMPLETED", ... (22.05 string or 23.x list)."""
    state = job.get("job_state")
    if isinstance(state, list):
        state = state[0] if state else ""
    return str(state or "")


@dataclass(frozen=True)
class Testbed:
    """The running clusters, addressed by name ("local", "site", "national")."""

    __test__ = False  # not a test class, despite the name

    base: Path

    # -- configuration ---------------------------------------------------------------------

    def conf(self, cluster: str) -> Path:
        """Path of the cluster's slurm.conf (what SLURM_CONF must point to)."""
        if cluster not in CLUSTERS:
            raise ValueError(f"unknown cluster {cluster!r}, expected one of {CLUSTERS}")
        return self.base / cluster / "etc" / "slurm.conf"

    def env(self, cluster: str) -> dict[str, str]:
        """os.environ plus SLURM_CONF for the cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf(cluster))}

    def log_dir(self, cluster: str) -> Path:
        return self.base / cluster / "log"

    def uses_cgroups(self, cluster: str) -> bool:
        """Whether jobs get cgroup v1 directories (the testbed falls back to process tracking
        on hosts without cgroup v1, see GREEND_TESTBED_CGROUP in `slurm-testbed --help`)."""
        return "ProctrackType=proctrack/cgroup" in self.conf(cluster).read_text()

    def job_cgroup(self, controller: str, node: str, job_id: int | str, uid: int = TEST_UID) -> Path:
        """cgroup v1 directory of a job, e.g. /sys/fs/cgroup/cpuacct/slurm_site-n1/uid_4242/job_7."""
        return CGROUP_ROOT / controller / f"slurm_{node}" / f"uid_{uid}" / f"job_{job_id}"

    # -- commands --------------------------------------------------------------------------

    def run(
        self,
        cluster: str,
        *argv: str,
        user: str | None = None,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command against one cluster, as root or (via runuser) as `user`.

        It runs in /tmp, a directory every user can enter (a job submitted without --chdir
        inherits it as working directory). With check=True a non-zero exit raises TestbedError
        carrying the command's stderr.
        """
        cmd = [str(a) for a in argv]
        if user is not None:
            # runuser keeps the environment, so SLURM_CONF reaches the command.
            cmd = ["runuser", "-u", user, "--", *cmd]
        proc = subprocess.run(
            cmd,
            env=self.env(cluster),
            cwd="/tmp",
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise TestbedError(
                f"[{cluster}] {' '.join(cmd)} exited {proc.returncode}: "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def submit(
        self,
        cluster: str,
        script_text: str,
        user: str = TEST_USER,
        extra_args: Sequence[str] = (),
    ) -> int:
        """sbatch a script (text, given on stdin) as `user`; return the job id.

        The job runs in /tmp. Unless the script or extra_args choose an output file, it goes to
        <base>/<cluster>/jobs/slurm-<id>.out (job ids of different clusters overlap, so /tmp
        would mix them up).
        """
        if not script_text.startswith("#!"):
            script_text = "#!/bin/bash\n" + script_text
        args = ["sbatch", "--parsable", "--chdir=/tmp"]
        if not _sets_output(script_text, extra_args):
            out_dir = self.base / cluster / "jobs"
            out_dir.mkdir(parents=True, exist_ok=True)
            out_dir.chmod(0o1777)  # the job's user writes here
            args.append(f"--output={out_dir}/slurm-%j.out")
        proc = self.run(cluster, *args, *extra_args, user=user, input=script_text)
        # --parsable prints "<id>" or "<id>;<cluster>".
        return int(proc.stdout.strip().split(";")[0])

    def jobs(self, cluster: str) -> list[dict]:
        """All jobs the controller knows, as `squeue --json` gives them.

        Slurm 22.05's `squeue --json` ignores filters (--states, --jobs, --user ...) and always
        returns every job, finished ones (kept for MinJobAge) included; filter in Python.
        """
        proc = self.run(cluster, "squeue", "--json")
        return json.loads(proc.stdout).get("jobs", [])

    def job(self, cluster: str, job_id: int | str) -> dict | None:
        """One job as `squeue --json` reports it, finished ones included; None if unknown."""
        # The filters are ignored by 22.05 (see jobs()) but honoured by later versions.
        proc = self.run(cluster, "squeue", "--json", "--states=all", f"--jobs={job_id}", check=False)
        if proc.returncode != 0:
            # Later versions fail on unknown (e.g. purged) job ids: "Invalid job id specified".
            return None
        for job in json.loads(proc.stdout).get("jobs", []):
            if str(job.get("job_id")) == str(job_id):
                return job
        return None

    def wait_state(
        self,
        cluster: str,
        job_id: int | str,
        states: str | Iterable[str],
        timeout: float = 60.0,
    ) -> dict:
        """Poll until the job is in one of `states`; return its squeue JSON entry.

        Raises TimeoutError (with the last state seen) after `timeout` seconds, and TestbedError
        at once if the job reaches a final state that was not asked for.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = "unknown"
        while True:
            job = self.job(cluster, job_id)
            if job is not None:
                state = job_state(job)
                if state in wanted:
                    return job
                if state in FINAL_STATES:
                    raise TestbedError(
                        f"[{cluster}] job {job_id} ended {state} "
                        f"(reason {job.get('state_reason')}), expected {sorted(wanted)}"
                    )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"[{cluster}] job {job_id} still {state} after {timeout}s, expected {sorted(wanted)}"
                )
            time.sleep(0.2)

    def pids(self, cluster: str, job_id: int | str) -> list[int]:
        """Process ids of a job from `scontrol listpids` (empty if it has no processes yet)."""
        proc = self.run(cluster, "scontrol", "listpids", str(job_id), check=False)
        if proc.returncode != 0:
            return []
        # Header "PID JOBID STEPID LOCALID GLOBALID", then one line per process. A step that is
        # still starting is listed with PID -1 (as collectors/slurm.py's listpids, skip it).
        return [int(f[0]) for f in map(str.split, proc.stdout.splitlines()[1:]) if f and f[0].isdigit()]

    def wait_started(self, cluster: str, job_id: int | str, timeout: float = 30.0) -> dict:
        """Wait until the job is RUNNING *and* its processes exist; return its squeue entry.

        The controller marks a job RUNNING when it allocates it; slurmd creates the job's cgroups
        and starts its processes a moment later. Tests that look at cgroups or pids must wait for
        the latter.
        """
        deadline = time.monotonic() + timeout
        job = self.wait_state(cluster, job_id, "RUNNING", timeout=timeout)
        while not self.pids(cluster, job_id):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"[{cluster}] job {job_id} RUNNING but no processes after {timeout}s")
            time.sleep(0.1)
        return job

    def cancel_all(self, timeout: float = 30.0) -> None:
        """Cancel every job on every cluster and wait until none is pending or running."""
        for cluster in CLUSTERS:
            ids = self.run(cluster, "squeue", "-h", "-o", "%A").stdout.split()
            if ids:
                self.run(cluster, "scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        for cluster in CLUSTERS:
            while self.run(cluster, "squeue", "-h", "-o", "%A").stdout.strip():
                if time.monotonic() >= deadline:
                    raise TestbedError(f"[{cluster}] jobs still listed {timeout}s after scancel")
                time.sleep(0.2)


    # -- accounting and hooks ------------------------------------------------------------------

    def sacct(self, cluster: str, job_id: int | str, fields: str = "State,End,AdminComment") -> dict:
        """The job's allocation line in accounting as {field: value} ({} if not recorded yet)."""
        proc = self.run(cluster, "sacct", "-X", "-n", "-P", "--delimiter=\x1f", "-j", str(job_id),
                        "-o", fields, check=False)
        names = fields.split(",")
        for line in proc.stdout.splitlines():
            parts = line.split("\x1f")
            if len(parts) == len(names):
                return dict(zip(names, parts, strict=True))
        return {}

    def wait_accounted(self, cluster: str, job_id: int | str, timeout: float = 60.0) -> dict:
        """Wait until accounting records the job in a final state; return its sacct line."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.sacct(cluster, job_id)
            if rec and rec["State"].split()[0] in FINAL_STATES:
                return rec
            if time.monotonic() >= deadline:
                raise TimeoutError(f"[{cluster}] job {job_id} not ended in sacct after {timeout}s: {rec}")
            time.sleep(0.2)

    @contextlib.contextmanager
    def hook(self, cluster: str, name: str, script: str):
        """Install etc/<name>.hook (name: "epilog-slurmctld", "mailprog", or slurmd's "prolog" and
        "epilog", run on every node with SLURMD_NODENAME set) for the block."""
        if name not in ("epilog-slurmctld", "mailprog", "prolog", "epilog"):
            raise ValueError(f"unknown hook {name!r}")
        path = self.base / cluster / "etc" / f"{name}.hook"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(script)
        tmp.chmod(0o755)
        tmp.rename(path)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


def _sets_output(script_text: str, extra_args: Sequence[str]) -> bool:
    for arg in extra_args:
        if arg in ("-o", "--output") or arg.startswith(("-o", "--output=")):
            return True
    for line in script_text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "#SBATCH" and words[1].startswith(("-o", "--output")):
            return True
    return False


_lock = threading.Lock()
_testbed: Testbed | None = None
_failure: TestbedError | None = None


# A batch script that keeps one CPU busy for {secs} seconds (BURN.format(secs=...)).
BURN = """#!/bin/bash
end=$((SECONDS + {secs}))
while (( SECONDS < end )); do :; done
"""


def root_testbed() -> Testbed:
    """ensure_testbed() for a test module's `tb` fixture; the test is skipped without root."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("the Slurm testbed needs root")
    return ensure_testbed()


def ensure_testbed(timeout: float = 180) -> Testbed:
    """Start the testbed (`testbed/slurm-testbed start`, once per process) and return it.

    `start` is idempotent and fast when the clusters already run. A failure is remembered, so
    that every later test fails at once with the same message instead of retrying.
    """
    global _testbed, _failure
    with _lock:
        if _testbed is not None:
            return _testbed
        if _failure is not None:
            raise _failure
        base = base_dir()
        try:
            proc = subprocess.run(
                [str(SCRIPT), "start"],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            _failure = TestbedError(
                f"{SCRIPT} start did not finish within {timeout}s; logs: {base}/<cluster>/log/"
            )
            raise _failure from exc
        if proc.returncode != 0:
            # The script's last "error:" line names the daemon that failed and its log file.
            errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
            headline = errors[-1] if errors else f"exit status {proc.returncode}"
            logs = sorted(str(p) for p in base.glob("*/log/*.log"))
            _failure = TestbedError(
                f"Slurm testbed failed to start: {headline}\n"
                f"All log files: {', '.join(logs) or f'none under {base}'}\n"
                f"Output of {SCRIPT} start:\n{proc.stderr.strip()}\n{proc.stdout.strip()}"
            )
            raise _failure
        _testbed = Testbed(base)
        return _testbed
