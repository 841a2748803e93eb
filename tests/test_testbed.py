"""The Slurm testbed really behaves like the clusters greend monitors (needs root)."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import pytest
from slurmbed import TEST_UID, TEST_USER, Testbed, ensure_testbed, job_state

pytestmark = pytest.mark.slurm

EXPECTED_NODES = {
    "local": {"local-n1": 2},
    "site": {"site-n1": 4, "site-n2": 4},
    "national": {"national-n1": 8},
}

# CPU-bound until the stop file appears (at most 120 s). Pure bash, so nothing but /bin/bash is
# needed in the job's environment.
BURN_SCRIPT = """#!/bin/bash
#SBATCH --job-name=greend-burn
while [ ! -e {stop} ] && (( SECONDS < 120 )); do :; done
"""


@pytest.fixture(scope="module")
def tb():
    if os.geteuid() != 0:
        pytest.skip("the Slurm testbed needs root (slurmd manages cgroups, SlurmUser=root)")
    testbed = ensure_testbed()
    testbed.cancel_all()
    yield testbed
    testbed.cancel_all()


@pytest.fixture(autouse=True)
def no_jobs_left(tb):
    """A test that fails half-way leaves no job behind to hold the next test's CPUs."""
    yield
    tb.cancel_all()


def stop_file(tb: Testbed, cluster: str) -> Path:
    path = tb.base / cluster / "jobs" / f"stop-{uuid.uuid4().hex}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o1777)
    return path


def slurm_seconds(text: str) -> float:
    """Seconds of a Slurm duration: [D-]HH:MM:SS, MM:SS(.fff)."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    secs = 0.0
    for part in text.split(":"):
        secs = secs * 60 + float(part)
    return days * 86400 + secs


def node_info(tb: Testbed, cluster: str) -> dict[str, dict[str, str]]:
    out = tb.run(cluster, "scontrol", "-o", "show", "node").stdout
    nodes = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        nodes[fields["NodeName"]] = fields
    return nodes


@pytest.mark.parametrize("cluster", sorted(EXPECTED_NODES))
def test_cluster_answers_with_configured_nodes(tb: Testbed, cluster: str):
    assert "is UP" in tb.run(cluster, "scontrol", "ping").stdout
    config = tb.run(cluster, "scontrol", "show", "config").stdout
    assert re.search(rf"^ClusterName\s*=\s*{cluster}$", config, re.M)

    nodes = node_info(tb, cluster)
    assert {name: int(n["CPUTot"]) for name, n in nodes.items()} == EXPECTED_NODES[cluster]
    for n in nodes.values():
        assert n["RealMemory"] == "4000"
        assert n["State"] == "IDLE"

    partitions = tb.run(cluster, "sinfo", "-h", "-o", "%P").stdout.split()
    assert sorted(partitions) == ["batch", "debug*"]


def test_site_job_is_tracked_from_submit_to_completion(tb: Testbed):
    stop = stop_file(tb, "site")
    job_id = tb.submit("site", BURN_SCRIPT.format(stop=stop), extra_args=["--account=proj-green"])
    tb.wait_started("site", job_id, timeout=30)

    # squeue --json: the fields greend attributes jobs by.
    (job,) = [j for j in tb.jobs("site") if j["job_id"] == job_id]
    assert job["user_name"] == TEST_USER
    assert job["user_id"] == TEST_UID
    assert job["account"] == "proj-green"
    assert job["partition"] == "debug"
    assert job["cluster"] == "site"
    assert job["cpus"] == 1
    assert job["memory_per_cpu"] == 256
    assert "cpu=1" in job["tres_alloc_str"]
    assert job["start_time"] >= job["submit_time"] > 0
    node = job["nodes"]
    assert node in EXPECTED_NODES["site"]

    # scontrol listpids: the job's processes, owned by the test user.
    pids = tb.pids("site", job_id)
    assert pids
    for pid in pids:
        uid_line = Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()
        assert int(uid_line[0]) == TEST_UID

    # cgroup v1: slurm_<node>/uid_<uid>/job_<id> in each controller; CPU time grows.
    if Path("/sys/fs/cgroup/cpuacct/cgroup.procs").exists():
        assert tb.uses_cgroups("site"), "cgroup v1 is mounted but the testbed does not use it"
    if tb.uses_cgroups("site"):
        cpuacct = tb.job_cgroup("cpuacct", node, job_id)
        assert cpuacct.is_dir(), cpuacct
        first = int((cpuacct / "cpuacct.usage").read_text())
        time.sleep(1.0)
        second = int((cpuacct / "cpuacct.usage").read_text())
        assert second - first > 100_000_000  # > 0.1 s of CPU in 1 s of a busy loop
        assert (cpuacct / "step_batch").is_dir()
        memory = tb.job_cgroup("memory", node, job_id)
        assert int((memory / "memory.limit_in_bytes").read_text()) == 256 * 2**20
        assert tb.job_cgroup("cpuset", node, job_id).is_dir()
        assert tb.job_cgroup("freezer", node, job_id).is_dir()
        # No other cluster's slurmd tracks this job.
        assert not tb.job_cgroup("cpuacct", "local-n1", job_id).exists()

    # sstat: CPU time of the running batch step (gathered every 5 s).
    deadline = time.monotonic() + 20
    cpu = 0.0
    while cpu < 1.0:
        assert time.monotonic() < deadline, f"sstat reported only {cpu}s CPU"
        time.sleep(1)
        out = tb.run(
            "site",
            "sstat",
            "--allsteps",
            "-j",
            str(job_id),
            "-n",
            "-P",
            "--format=JobID,AveCPU,TRESUsageInTot",
        ).stdout
        for line in out.splitlines():
            step, ave_cpu, tres = line.split("|")
            if step == f"{job_id}.batch":
                tres_cpu = dict(kv.split("=", 1) for kv in tres.split(","))["cpu"]
                cpu = slurm_seconds(tres_cpu)
                assert slurm_seconds(ave_cpu) == pytest.approx(cpu, abs=1)

    # greend writes its figures into AdminComment.
    tb.run("site", "scontrol", "update", f"job={job_id}", "AdminComment=greend energy_kwh=0.001")
    assert tb.job("site", job_id)["admin_comment"] == "greend energy_kwh=0.001"

    stop.touch()
    done = tb.wait_state("site", job_id, "COMPLETED", timeout=30)
    assert done["exit_code"] == 0
    assert done["end_time"] >= done["start_time"]
    # A finished job stays visible (MinJobAge) and is written to the jobcomp file.
    assert job_state(tb.job("site", job_id)) == "COMPLETED"
    jobcomp = (tb.log_dir("site") / "jobcomp.txt").read_text()
    assert re.search(
        rf"^JobId={job_id} UserId={TEST_USER}\({TEST_UID}\).* JobState=COMPLETED ", jobcomp, re.M
    )
    # Slurm removes the job's cgroups once it has ended.
    cpuacct = tb.job_cgroup("cpuacct", node, job_id)
    deadline = time.monotonic() + 10
    while tb.uses_cgroups("site") and cpuacct.exists():
        assert time.monotonic() < deadline, f"{cpuacct} still there after the job ended"
        time.sleep(0.2)


def test_declared_cpus_are_used_for_placement(tb: Testbed):
    # The host has fewer CPUs than site (2 x 4) and national (8) declare; Slurm must still place
    # jobs by the declared counts.
    big = tb.submit("national", "sleep 60", extra_args=["--partition=batch", "--cpus-per-task=8"])
    halves = [tb.submit("site", "sleep 60", extra_args=["--cpus-per-task=4"]) for _ in range(2)]
    job = tb.wait_started("national", big, timeout=30)
    assert job["cpus"] == 8 and job["nodes"] == "national-n1" and job["partition"] == "batch"
    nodes = {tb.wait_state("site", j, "RUNNING", timeout=30)["nodes"] for j in halves}
    assert nodes == {"site-n1", "site-n2"}
    # A third 4-CPU job does not fit anywhere on site.
    third = tb.submit("site", "sleep 60", extra_args=["--cpus-per-task=4"])
    time.sleep(2)
    assert job_state(tb.job("site", third)) == "PENDING"

    # Same host, different clusters: each node has its own cgroup tree.
    small = tb.submit("local", "sleep 60")
    tb.wait_started("local", small, timeout=30)
    if tb.uses_cgroups("local"):
        # slurmd creates the job's cgroup a moment after its processes appear: give it that moment.
        mine = tb.job_cgroup("cpuacct", "local-n1", small)
        deadline = time.monotonic() + 10
        while not mine.is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mine.is_dir()
        assert tb.job_cgroup("cpuacct", "national-n1", big).is_dir()

    tb.cancel_all()
    assert job_state(tb.job("national", big)) == "CANCELLED"
    assert job_state(tb.job("site", third)) == "CANCELLED"
