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
from test_slurm import node  # noqa: F401 - the fixture: a fixture node with a fake Slurm

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
    assert run_hook("prolog", env).returncode == 0  # the id again: the old epilog goes
    assert read_spool(spool)["5"].epilog is None
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
    # the id comes back (slurmctld restarted from 1): another job, asked about afresh
    tree.add_job("500", uid=os.getuid())
    answers["500"] = RUNNING.replace("JobId=80001", "JobId=500").replace("11:33:47", "12:00:00")
    now[0] += 60
    jobs = {j.job_id: j for j in local.jobs("site-n1")}
    assert jobs["500"].state == "RUNNING" and jobs["500"].submit_time == epoch("2026-12-01T12:00:00")
    # a job slurmctld does not know (another cluster's, say) is asked about once
    tree.add_job("999", uid=os.getuid())
    for _ in range(3):
        now[0] += 3600
        local.jobs("site-n1")
    assert sum(1 for a in cmds.asked if a[-1] == "999") == 1


def test_a_job_still_completing_ends_at_its_epilog_here(tmp_path):
    """slurmctld names no cluster and holds the job COMPLETING (no end yet) after its Epilog ran on
    this node: the node takes the cluster and the end time from its hook records."""
    spool = tmp_path / "spool"
    env = {"SLURM_JOB_ID": "80001", "SLURM_JOB_USER": "greendtest", "SLURM_JOB_UID": "4242",
           "SLURM_CLUSTER_NAME": "site"}
    write_record(spool, "prolog", env, 1000.0)
    write_record(spool, "epilog", env, 1060.0)
    completing = RUNNING.replace("JobState=RUNNING", "JobState=COMPLETING").replace(
        "EndTime=2026-12-01T11:38:48", "EndTime=Unknown")
    local = LocalJobs(CountingCommands({"80001": completing}), spool, cgroupfs=tmp_path / "cg",
                      procfs=tmp_path, clock=lambda: 1070.0)
    (j,) = local.jobs("site-n1")
    assert not j.ended and j.cluster == "site" and j.end_time == 1060


def test_local_mode_is_the_default_and_squeue_stays_an_option(tmp_path):
    cfg = config_mod.parse({})
    assert cfg.slurm.discovery == "local" and cfg.slurm.spool_dir == Path("/run/greend/slurm-jobs")
    with pytest.raises(config_mod.ConfigError, match="discovery"):
        config_mod.parse({"slurm": {"discovery": "everything"}})
    with pytest.raises(config_mod.ConfigError, match="lookups_per_minute"):
        config_mod.parse({"slurm": {"lookups_per_minute": 0}})


def test_daemon_in_local_mode_with_slurmctld_down(tmp_path, monkeypatch):
    """The default mode in the daemon: squeue is never run (it would hang here); the job found in
    its cgroup and named by the Prolog hook is accounted under the hook's identity while slurmctld
    does not answer, and /healthz says why the metadata is incomplete."""
    from test_slurm import fake_bin

    from greend.daemon import Daemon

    bindir = fake_bin(tmp_path, squeue="sleep 60", scontrol=(
        "echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2; exit 1"))
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    proc = make_procfs(tmp_path / "proc", ncpu=2)
    tree = make_cgroups(tmp_path / "cgroup", 2, node="n1")
    tree.add_job("5", cpu_ns=0)
    write_record(tmp_path / "spool", "prolog", {
        "SLURM_JOB_ID": "5", "SLURM_JOB_USER": "alice", "SLURM_JOB_UID": "1001",
        "SLURM_JOB_ACCOUNT": "proj-x", "SLURM_JOB_PARTITION": "p"}, time.time())
    cfg = config_mod.parse({
        "cluster": "c1", "node": "n1", "state_dir": str(tmp_path / "state"),
        "paths": {"procfs": str(tmp_path / "proc"), "sysfs": str(tmp_path / "sys"),
                  "cgroupfs": str(tmp_path / "cgroup")},
        "attribution": {"jobs_from": "cgroup"}, "power": {"rapl": False},
        "slurm": {"timeout_s": 1, "conf": str(tmp_path / "slurm.conf"), "spool_dir": str(tmp_path / "spool")},
        "clusters": {"c1": {}},
    })
    d = Daemon(cfg, listen="127.0.0.1:0", socket_path=None)
    try:
        t0 = time.monotonic()
        d.slurm.refresh()
        assert time.monotonic() - t0 < 1  # no squeue: it would have been killed at 1 s
        d.sample()
        tree.set_cpu("5", 10**9)
        proc.advance(100, 100)
        d.sample()
        d.checkpoint()
        h = d.health()
        assert h["status"] == "degraded"
        assert any(r.startswith("collector slurm failing: scontrol --local exited 1: ")
                   and "Unable to contact" in r for r in h["reasons"]), h["reasons"]
        assert "local discovery" in h["collectors"]["slurm"]["detail"]
        (row,) = d.ledger.get_job("c1", "5", "n1")
        assert (row.user, row.uid, row.account, row.partition) == ("alice", 1001, "proj-x", "p")
        assert row.meta["provisional"] and row.cpu_time_ns == 10**9
    finally:
        d.monitor.close()
        d.ledger.close()


# -- the books: the hook's identity first, slurmctld's key after -----------------------------------
def test_hook_identity_is_provisional_until_slurmctld_gives_the_submit_time(node):  # noqa: F811
    """A job the Prolog hook named (no submit time) is accounted under its user and account at once
    with a provisional key; slurmctld's answer then fixes the same row (by pk), never a second one."""
    from greend.collectors.slurm import SlurmJob, job_from_json
    from test_slurm import T0, entry

    answer = [SlurmJob(job_id="42", submit_time=0, state="", user="alice", uid=1000,
                       account="proj-hook", partition="gpu", name="train", nodes=("n1",), alloc_gpus=1)]
    node.fake.jobs = lambda n: answer
    node.slurm.refresh()
    key = node.jobs.add("42")
    m = node.sampled({key: 2.0})
    m.checkpoint()
    (row,) = node.rows("42")
    assert (row.user, row.account, row.partition, row.alloc_gpus) == ("alice", "proj-hook", "gpu", 1)
    assert row.submit_time == int(T0) and row.meta["provisional"] and "slurm_state" not in row.meta
    pk = row.pk
    answer[:] = [job_from_json(entry(42, 900, start=int(T0) - 50, account="proj-hook"), "n1")]
    node.slurm.refresh()
    node.step(cpu_s={key: 2.0})
    m.tick()
    m.checkpoint()
    (row,) = node.rows("42")
    assert (row.pk, row.submit_time, row.alloc_cpus) == (pk, 900, 2.0)
    assert "provisional" not in row.meta and row.meta["slurm_state"] == "RUNNING"
    assert row.cpu_time_ns == 4 * 10**9


# -- against the real testbed: slurmctld's own counts (sdiag) -------------------------------------
from slurmbed import BURN, root_testbed  # noqa: E402 - with the testbed tests it serves


@pytest.fixture(scope="module")
def tb():
    return root_testbed()


def sdiag(tb, cluster: str, reset: bool = False) -> dict[str, int]:
    sys.path.insert(0, str(REPO / "bench"))
    from bench_slurm_rpc import sdiag as read

    return read(tb.conf(cluster), reset=reset)


def hook_script(spool_dir: Path, action: str) -> str:
    """slurmd's hook as a site installs it (docs/slurm.md): greend's command, bounded, exit 0."""
    return (f"#!/bin/sh\ntimeout 10 {sys.executable} -m greend.cli slurmd-hook {action} "
            f"--spool {spool_dir}/$SLURMD_NODENAME\nexit 0\n")


def wait_path(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.slurm
@pytest.mark.parametrize("hooks", [True, False], ids=["prolog", "cgroups"])
def test_testbed_local_discovery_finds_attributes_and_ends_a_job(tb, tmp_path, hooks):
    """A job of greendtest on site-n2, found by the node (Prolog hook, or its cgroup alone), with
    the identity and allocation Slurm gave it, ended with Slurm's end time and final state; the
    node asked slurmctld by id only (sdiag: no REQUEST_JOB_INFO, a few REQUEST_JOB_INFO_SINGLE)."""
    import contextlib

    from greend.collectors.slurm import from_config
    from greend.collectors.slurmlocal import FINAL_TRIES

    from greend.ledger import Ledger
    from greend.monitor import Monitor

    if not tb.uses_cgroups("site"):
        pytest.skip("the testbed runs without job cgroups on this host")
    spool = tmp_path / "spool"
    cfg = config_mod.parse({
        "cluster": "site", "node": "site-n2", "state_dir": str(tmp_path / "state"),
        "attribution": {"jobs_from": "cgroup"}, "power": {"rapl": False},
        "clusters": {"site": {"tier": "site"}},
        "slurm": {"conf": str(tb.conf("site")), "timeout_s": 10, "spool_dir": str(spool / "site-n2")},
    })
    assert cfg.slurm.discovery == "local"
    meta = from_config(cfg.slurm, "site-n2", Path("/sys/fs/cgroup"), Path("/proc"))
    meta.on_request = meta.refresh  # in the daemon, a scheduler thread does this
    # The host's site-n2 cgroup tree also holds jobs of other testbeds on this host (other job
    # ids), which this node asks about once each: count the questions about this job apart.
    asked: list[str] = []
    run = meta.commands.run
    meta.commands.run = lambda *argv, **kw: (asked.append(argv[-1]), run(*argv, **kw))[1]
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    m = None
    with contextlib.ExitStack() as stack:
        if hooks:
            stack.enter_context(tb.hook("site", "prolog", hook_script(spool, "prolog")))
            stack.enter_context(tb.hook("site", "epilog", hook_script(spool, "epilog")))
        sdiag(tb, "site", reset=True)
        job_id = tb.submit("site", BURN.format(secs=5), extra_args=[
            "-w", "site-n2", "-c", "2", "--account=proj-local", "-J", "local-job"])
        try:
            wait_path(tb.job_cgroup("cpuacct", "site-n2", job_id) / "cpuacct.usage")
            if hooks:
                wait_path(spool / "site-n2" / f"{job_id}.prolog", timeout=5)
            m = Monitor(cfg, ledger, slurm=meta)
            deadline = time.monotonic() + 60
            while True:
                m.tick()
                m.checkpoint()
                meta.refresh()  # the daemon's periodic refresh
                rows = ledger.get_job("site", str(job_id), "site-n2")
                if rows and rows[0].meta.get("end_time_from") == "slurm":
                    break
                assert time.monotonic() < deadline, (rows, meta.status)
                time.sleep(0.5)
            rpcs = sdiag(tb, "site")  # before this test's own squeue below
        finally:
            tb.run("site", "scancel", str(job_id), check=False)
            if m is not None:
                m.close()
            ledger.close()
        if hooks:
            assert (spool / "site-n2" / f"{job_id}.epilog").exists()
    assert rpcs.get("REQUEST_JOB_INFO", 0) == 0, rpcs
    assert 1 <= asked.count(str(job_id)) <= 1 + FINAL_TRIES, asked
    assert meta.local.lookups == len(asked) == rpcs["REQUEST_JOB_INFO_SINGLE"], (asked, rpcs)
    (row,) = rows
    sq = tb.job("site", job_id)
    assert row.state == "ended" and row.end_time == sq["end_time"]
    assert (row.submit_time, row.user, row.uid, row.account, row.partition, row.name, row.alloc_cpus,
            row.alloc_mem_bytes) == (sq["submit_time"], "greendtest", 4242, "proj-local", "debug",
                                     "local-job", 2.0, 512 * MIB)
    assert row.meta["slurm_state"] == "COMPLETED" and "provisional" not in row.meta
    from greend.report import outcome

    assert outcome(row) == "ok"


@pytest.mark.slurm
def test_testbed_hook_with_greend_broken_leaves_the_node_up(tb, tmp_path):
    """The Prolog hook cannot write (greend not installed right, spool unusable): the job still
    runs and completes, the node is not drained."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with tb.hook("site", "prolog", hook_script(blocker, "prolog")), \
            tb.hook("site", "epilog", hook_script(blocker, "epilog")):
        job_id = tb.submit("site", "true\n", extra_args=["-w", "site-n2", "-c", "1"])
        job = tb.wait_state("site", job_id, "COMPLETED", timeout=60)
    assert job["job_state"] in ("COMPLETED", ["COMPLETED"])
    state = tb.run("site", "sinfo", "-h", "-n", "site-n2", "-o", "%T").stdout.strip()
    assert state and "drain" not in state and "down" not in state, state


@pytest.mark.slurm
def test_testbed_unplaceable_jobs_are_asked_by_id_within_the_bound(tb, tmp_path):
    """Jobs on the node that nothing local describes: slurmctld is asked about them by id, at most
    the bucket's burst at once (sdiag: REQUEST_JOB_INFO_SINGLE only, never the whole queue)."""
    tree = make_cgroups(tmp_path / "cg", 1, node="site-n2")
    job_id = tb.submit("site", "sleep 30\n", extra_args=["-c", "1"])
    try:
        tb.wait_started("site", job_id, timeout=30)
        for j in [job_id, *range(900000, 900009)]:  # one real job, nine slurmctld never had
            tree.add_job(str(j), uid=0)
        local = LocalJobs(SlurmCommands(tb.conf("site"), timeout_s=10), tmp_path / "spool",
                          cgroupfs=tmp_path / "cg", procfs=tmp_path, per_minute=1, burst=4)
        sdiag(tb, "site", reset=True)
        first = local.jobs("site-n2")
        for _ in range(3):
            local.jobs("site-n2")
        rpcs = sdiag(tb, "site")
    finally:
        tb.run("site", "scancel", str(job_id), check=False)
    assert [j.job_id for j in first] == [str(job_id)] and first[0].user == "greendtest"
    assert rpcs.get("REQUEST_JOB_INFO_SINGLE") == 4 and "REQUEST_JOB_INFO" not in rpcs, rpcs
    assert local.lookups == 4 and local.deferred >= 6


@pytest.mark.slurm
def test_testbed_rpcs_per_node_hour_local_vs_squeue(tb):
    """bench_slurm_rpc.py's measurement, short: 8 simulated nodes, each refreshing every 2.5 s for
    10 s while real jobs come and go. squeue mode: one full-queue dump per node per refresh; local mode: none,
    and by-id questions within the bound (about two per job: at its start and after its end)."""
    sys.path.insert(0, str(REPO / "bench"))
    import argparse

    from bench_slurm_rpc import run_mode

    args = argparse.Namespace(nodes=8, seconds=10.0, interval=2.5, job_every=1.5, job_seconds=3.0,
                              lookups_per_minute=12.0, lookup_burst=30)
    local = run_mode("local", args, tb.conf("site"), tb)
    squeue = run_mode("squeue", args, tb.conf("site"), tb)
    refreshes_per_node_hour = 3600 / args.interval
    assert local["full_queue_rpcs_per_node_hour"] == 0, local
    assert squeue["full_queue_rpcs_per_node_hour"] >= 0.7 * refreshes_per_node_hour, squeue
    singles = local["rpcs"].get("REQUEST_JOB_INFO_SINGLE", 0)
    budget = args.nodes * (args.lookup_burst + args.lookups_per_minute * local["seconds"] / 60)
    assert 0 < singles <= min(budget, 2 * local["jobs_submitted"] + args.nodes), local
    assert singles == local["by_id_lookups"] and local["refresh_errors"] == 0
