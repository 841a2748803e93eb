"""Local Slurm job discovery (collectors/slurmlocal.py, `greend slurmd-hook`): a node learns its jobs
from slurmd's Prolog/Epilog hook, its job cgroups or its processes' environments, and asks slurmctld
only by id, within a token bucket. The testbed tests read slurmctld's own RPC counts (sdiag)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import make_cgroups, make_procfs
from greend.collectors.slurm import SlurmCommands, SlurmError
from greend.collectors.slurmlocal import (
    LocalJobs,
    TokenBucket,
    parse_show_job,
    read_spool,
    scan_job_ids,
    write_record,
)

from greend import config as config_mod

REPO = Path(__file__).resolve().parent.parent
GREEND = [sys.executable, "-m", "greend.cli"]
MIB = 1 << 20

# `scontrol --local show job --oneliner ID` as Slurm 22.05 writes it (the testbed's answers).
RUNNING = (
    "JobId=80001 JobName=wrap UserId=greendtest(4242) GroupId=root(0) MCS_label=N/A Priority=1 Nice=0 "
    "Account=proj-a QOS=normal JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:01 TimeLimit=00:05:00 TimeMin=N/A "
    "SubmitTime=2026-12-01T11:33:47 EligibleTime=2026-12-01T11:33:47 AccrueTime=2026-12-01T11:33:47 "
    "StartTime=2026-12-01T11:33:48 EndTime=2026-12-01T11:38:48 Deadline=N/A Partition=debug "
    "NodeList=site-n1 BatchHost=site-n1 NumNodes=1 NumCPUs=2 NumTasks=2 CPUs/Task=1 "
    "TRES=cpu=2,mem=512M,node=1,billing=2 Command=(null) WorkDir=/tmp "
    "AdminComment=greend (so far): energy_j=1.0 carbon_g=0.1 water_l=0 cpu_s=1.0 node=site-n2 | my note "
    "StdErr=/dev/null StdIn=/dev/null StdOut=/dev/null Power= "
)


def epoch(text: str) -> int:
    return int(time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))


# -- parsing scontrol's answer --------------------------------------------------------------------
def test_show_job_fields_and_a_comment_with_spaces():
    j = parse_show_job(RUNNING, "site-n1")
    assert (j.job_id, j.user, j.uid, j.account, j.partition, j.name, j.state) == (
        "80001", "greendtest", 4242, "proj-a", "debug", "wrap", "RUNNING")
    assert (j.alloc_cpus, j.alloc_mem_bytes, j.alloc_gpus) == (2.0, 512 * MIB, 0)
    assert (j.submit_time, j.start_time, j.end_time) == (
        epoch("2026-12-01T11:33:47"), epoch("2026-12-01T11:33:48"), None)  # a running job's
    assert j.admin_comment == ("greend (so far): energy_j=1.0 carbon_g=0.1 water_l=0 cpu_s=1.0 "
                               "node=site-n2 | my note")
    assert not j.ended


def test_show_job_completed_multi_node_and_unknown():
    done = RUNNING.replace("JobState=RUNNING", "JobState=COMPLETED").replace(
        "NodeList=site-n1", "NodeList=site-n[1-2]").replace("NumNodes=1", "NumNodes=2").replace(
        "TRES=cpu=2,mem=512M,node=1,billing=2", "TRES=cpu=4,mem=1G,node=2,gres/gpu=4")
    j = parse_show_job(done, "site-n2")
    assert j.ended and j.end_time == epoch("2026-12-01T11:38:48") and j.nodes == ("site-n1", "site-n2")
    # several nodes without -d: this node's CPUs and memory come from its cgroup, GPUs are shared
    assert (j.alloc_cpus, j.alloc_mem_bytes, j.alloc_gpus) == (None, None, 2)
    detailed = done + " Nodes=site-n2 CPU_IDs=0-2 Mem=700 GRES=gpu:a100:3(IDX:0-2)"
    assert parse_show_job(detailed, "site-n2").alloc_cpus == 3.0
    assert parse_show_job(detailed, "site-n2").alloc_mem_bytes == 700 * MIB
    assert parse_show_job("slurm_load_jobs error: Invalid job id specified", "n1") is None
    with pytest.raises(SlurmError, match="no JobId"):
        parse_show_job("slurm 22.05.8", "n1")


def test_token_bucket_bounds_a_burst_and_the_rate():
    now = [0.0]
    b = TokenBucket(per_minute=6, burst=3, clock=lambda: now[0])
    assert [b.take() for _ in range(5)] == [True, True, True, False, False]
    now[0] += 9.9
    assert not b.take()
    now[0] += 0.2  # 10 s: one more at 6 a minute
    assert b.take() and not b.take()
    now[0] += 3600
    assert sum(b.take() for _ in range(100)) == 3  # never more than the burst at once


# -- what is on the node --------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_job_ids_from_cgroup_trees(tmp_path, version):
    tree = make_cgroups(tmp_path / "cg", version, node="n7")
    tree.add_job("41", uid=os.getuid())
    tree.add_job("42", uid=os.getuid())
    assert scan_job_ids(tmp_path / "cg", tmp_path / "noproc", "n7") == {"41", "42"}
    tree.remove_job("41")
    assert scan_job_ids(tmp_path / "cg", tmp_path / "noproc", "n7") == {"42"}


def test_job_ids_from_process_environments_without_cgroups(tmp_path):
    proc = make_procfs(tmp_path / "proc", ncpu=2)
    proc.add_process(100, env={"SLURM_JOB_ID": "77", "HOME": "/x"})
    proc.add_process(101, env={"SLURM_JOB_IDX": "5"})
    proc.add_process(102, env={"PATH": "/bin"})
    assert scan_job_ids(tmp_path / "nocgroup", tmp_path / "proc", "n1") == {"77"}


# -- the hook -------------------------------------------------------------------------------------
def run_hook(action: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GREEND, "slurmd-hook", action, *args], env={**env, "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=30, cwd=REPO)


def test_hook_writes_a_record_the_daemon_reads(tmp_path):
    spool = tmp_path / "spool"
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_USER": "alice", "SLURM_JOB_UID": "1001",
           "SLURM_JOB_ACCOUNT": "proj", "SLURM_JOB_PARTITION": "gpu", "SLURM_JOB_GPUS": "0,1",
           "GREEND_SLURM_SPOOL": str(spool), "SECRET": "not kept"}
    r = run_hook("prolog", env, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["written"] == str(spool / "5.prolog")
    assert oct(spool.stat().st_mode & 0o777) == "0o700"
    assert "SECRET" not in (spool / "5.prolog").read_text()
    assert run_hook("epilog", env).returncode == 0
    (rec,) = read_spool(spool).values()
    assert rec.prolog["SLURM_JOB_USER"] == "alice" and rec.epilog_t >= rec.prolog_t
    # the node's view: identity from the hook (no submit time until slurmctld is asked)
    local = LocalJobs(SlurmCommands(bin_dir=tmp_path / "nobin"), spool, cgroupfs=tmp_path, procfs=tmp_path)
    (j,) = local.jobs("n1")
    assert (j.user, j.uid, j.account, j.partition, j.alloc_gpus, j.submit_time) == (
        "alice", 1001, "proj", "gpu", 2, 0)
    assert j.end_time == int(rec.epilog_t)


def test_hook_never_fails_the_job(tmp_path):
    """A Prolog that fails drains the node: the hook exits 0, fast, whatever goes wrong."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for env, args in [({"SLURM_JOB_ID": "5"}, ["--spool", str(blocker / "spool")]),
                      ({}, ["--spool", str(tmp_path / "s")]),
                      ({"SLURM_JOB_ID": "5", "GREEND_SLURM_SPOOL": str(blocker)}, [])]:
        t0 = time.monotonic()
        r = run_hook("prolog", env, *args)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 5
    assert "not recorded" in run_hook("prolog", {"SLURM_JOB_ID": "5"}, "--spool", str(blocker)).stderr


def test_spool_writable_by_others_or_foreign_records_are_ignored(tmp_path):
    spool = tmp_path / "spool"
    write_record(spool, "prolog", {"SLURM_JOB_ID": "9", "SLURM_JOB_USER": "root"}, 1.0)
    (spool / "10.prolog").write_text(json.dumps({"SLURM_JOB_ID": "11"}))  # names another job
    (spool / "12.prolog").write_text("{not json")
    assert set(read_spool(spool)) == {"9"}
    spool.chmod(0o777)
    assert read_spool(spool) == {}


# -- asking slurmctld, by id, within the bound ----------------------------------------------------
class CountingCommands(SlurmCommands):
    """Real parsing, answers from a dict: counts what would have been asked of slurmctld."""

    def __init__(self, answers: dict[str, str]):
        super().__init__()
        self.answers = answers
        self.asked: list[tuple[str, ...]] = []

    def run(self, *argv: str, timeout_s: float | None = None) -> str:
        self.asked.append(argv)
        if argv[:2] == ("squeue", "--json"):
            raise AssertionError("local discovery asked for the whole queue")
        job_id = argv[-1]
        if job_id not in self.answers:
            raise SlurmError("scontrol --local exited 1: slurm_load_jobs error: Invalid job id specified")
        return self.answers[job_id]


def test_many_new_jobs_are_asked_about_within_the_bucket(tmp_path):
    now = [1000.0]
    tree = make_cgroups(tmp_path / "cg", 1, node="site-n1")
    answers = {}
    for i in range(100):
        tree.add_job(str(500 + i), uid=os.getuid())
        answers[str(500 + i)] = RUNNING.replace("JobId=80001", f"JobId={500 + i}")
    cmds = CountingCommands(answers)
    local = LocalJobs(cmds, tmp_path / "spool", cgroupfs=tmp_path / "cg", procfs=tmp_path,
                      per_minute=12, burst=30, clock=lambda: now[0])
    assert len(local.jobs("site-n1")) == 30 and local.deferred == 70
    now[0] += 60  # 12 more a minute
    assert len(local.jobs("site-n1")) == 42
    assert len(local.jobs("site-n1")) == 42  # known jobs are not asked again
    assert len(cmds.asked) == 42 and all(a[:4] == ("scontrol", "--local", "show", "job") for a in cmds.asked)
    # a job that ends here is asked once more (its final state), not the others
    tree.remove_job("500")
    answers["500"] = answers["500"].replace("JobState=RUNNING", "JobState=FAILED")
    now[0] += 10
    jobs = {j.job_id: j for j in local.jobs("site-n1")}
    # 10 s: two tokens, one for the ended job, one for the next new one
    assert jobs["500"].state == "FAILED" and jobs["500"].ended and len(cmds.asked) == 44
    # a job slurmctld does not know (another cluster's, say) is asked about once
    tree.add_job("999", uid=os.getuid())
    for _ in range(3):
        now[0] += 3600
        local.jobs("site-n1")
    assert sum(1 for a in cmds.asked if a[-1] == "999") == 1


def test_local_mode_is_the_default_and_squeue_stays_an_option(tmp_path):
    cfg = config_mod.parse({})
    assert cfg.slurm.discovery == "local" and cfg.slurm.spool_dir == Path("/run/greend/slurm-jobs")
    with pytest.raises(config_mod.ConfigError, match="discovery"):
        config_mod.parse({"slurm": {"discovery": "everything"}})
    with pytest.raises(config_mod.ConfigError, match="lookups_per_minute"):
        config_mod.parse({"slurm": {"lookups_per_minute": 0}})
