"""Slurm job metadata: parsing squeue's JSON, the commands' faults, pyslurm's version check, and the
job lifecycle in the monitor (identity with submit time, provisional rows fixed by pk, id reuse,
jobs ending between samples, write-back). The tests marked slurm run against the real testbed.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures import Clock, FakeJobs, FakeProc, make_cgroups, make_procfs
from greend.collectors.cgroups import SlurmCgroups
from greend.collectors.procscan import NS_PER_TICK, ProcScan
from greend.collectors.slurm import (
    SlurmCommands,
    SlurmError,
    SlurmMetadata,
    expand_hostlist,
    footprint_comment,
    job_from_json,
    load_pyslurm,
    mem_bytes,
    merge_comment,
    parse_squeue_json,
)

from greend import config as config_mod
from greend.ledger import Ledger
from greend.monitor import Monitor

NCPU = 4
T0 = 1_800_000_000.0
MIB = 1 << 20


# -- squeue --json entries as Slurm 22.05 writes them ---------------------------------------------
def entry(job_id: int, submit: int, *, state="RUNNING", node="n1", user="alice", uid=1000,
          account="proj-green", partition="debug", name="train", cpus=2, mem_mb=512, start=None,
          end=None, gres=None, admin_comment="", cluster="c1") -> dict:
    start = submit + 1 if start is None else start
    return {
        "job_id": job_id, "submit_time": submit, "start_time": start,
        "end_time": end if end is not None else start + 1800, "job_state": state,
        "cluster": cluster, "name": name, "user_name": user, "user_id": uid, "account": account,
        "partition": partition, "nodes": node, "batch_host": node, "cpus": cpus,
        "memory_per_cpu": None, "memory_per_node": mem_mb,
        "tres_alloc_str": f"cpu={cpus},mem={mem_mb}M,node=1,billing={cpus}"
                          + (f",gres/gpu={gres}" if gres else ""),
        "gres_detail": [f"gpu:a100:{gres}(IDX:0-{gres - 1})"] if gres else [],
        "admin_comment": admin_comment, "comment": "",
        "job_resources": {"nodes": node, "allocated_cores": cpus, "allocated_hosts": 1,
                          "allocated_nodes": [{
                              "sockets": {"0": {"cores": {str(i): "allocated" for i in range(cpus)}}},
                              "nodename": node, "cpus_used": 0, "memory_used": 0,
                              "memory_allocated": mem_mb}]},
    }


MULTI_NODE = {  # as 22.05 printed it for `sbatch -N2 -n2 --mem=300`
    "job_id": 6, "submit_time": 1795928094, "start_time": 1795928095, "end_time": 1795929895,
    "job_state": "RUNNING", "cluster": "site", "name": "wrap", "user_name": "greendtest",
    "user_id": 4242, "account": "", "partition": "debug", "nodes": "site-n[1-2]",
    "batch_host": "site-n1", "cpus": 2, "memory_per_node": 300, "memory_per_cpu": None,
    "tres_alloc_str": "cpu=2,mem=600M,node=2,billing=2", "gres_detail": [],
    "admin_comment": "", "comment": "",
    "job_resources": {"nodes": "site-n[1-2]", "allocated_cores": 2, "allocated_hosts": 2,
                      "allocated_nodes": [
                          {"sockets": {"0": {"cores": {"0": "allocated"}}}, "nodename": "site-n1",
                           "cpus_used": 1, "memory_used": 300, "memory_allocated": 300},
                          {"sockets": {"0": {"cores": {"0": "allocated"}}}, "nodename": "site-n2",
                           "cpus_used": 1, "memory_used": 300, "memory_allocated": 300}]},
}


# -- parsing --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "names"), [
    ("site-n1", ["site-n1"]),
    ("site-n[1-2]", ["site-n1", "site-n2"]),
    ("gpu[01,03-04],cpu7", ["gpu01", "gpu03", "gpu04", "cpu7"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("", []),
])
def test_expand_hostlist(text, names):
    assert expand_hostlist(text) == names


@pytest.mark.parametrize(("text", "n"), [("600M", 600 * MIB), ("2G", 2 << 30), ("256", 256 * MIB),
                                         ("1.5G", 3 << 29), ("x", None)])
def test_mem_bytes(text, n):
    assert mem_bytes(text) == n


def test_single_node_job_fields():
    j = job_from_json(entry(42, 1000, gres=2, admin_comment="x"), "n1")
    assert (j.job_id, j.submit_time, j.state, j.cluster) == ("42", 1000, "RUNNING", "c1")
    assert (j.user, j.uid, j.account, j.partition, j.name) == ("alice", 1000, "proj-green", "debug",
                                                                "train")
    assert (j.alloc_cpus, j.alloc_mem_bytes, j.alloc_gpus) == (2.0, 512 * MIB, 2)
    assert j.nodes == ("n1",) and j.start_time == 1001
    assert j.end_time is None and not j.ended  # a running job's end_time is only the expected end
    done = job_from_json(entry(42, 1000, state="COMPLETED", end=1100), "n1")
    assert done.ended and done.end_time == 1100 and done.alloc_gpus == 0
    # gres_detail alone (no gres/gpu in the TRES string) still gives the GPUs
    bare = dict(entry(43, 1000, gres=2), tres_alloc_str="")
    assert job_from_json(bare, "n1").alloc_gpus == 2


def test_multi_node_job_gives_this_nodes_share():
    j = job_from_json(MULTI_NODE, "site-n2")
    assert j.nodes == ("site-n1", "site-n2")
    assert (j.alloc_cpus, j.alloc_mem_bytes, j.alloc_gpus) == (1.0, 300 * MIB, 0)
    other = job_from_json(MULTI_NODE, "site-n9")
    assert other.alloc_cpus is None and "site-n9" not in other.nodes


def test_later_openapi_shapes_are_read():
    # 23.02+: job_state is a list, numbers are {"set", "infinite", "number"}; 24.05+: nodes.allocation
    j = dict(entry(7, 500), job_state=["COMPLETED", "REQUEUED"],
             submit_time={"set": True, "infinite": False, "number": 500},
             end_time={"set": True, "infinite": False, "number": 900},
             job_resources={"nodes": {"allocation": [
                 {"name": "n1", "cpus": {"count": 3}, "memory": {"allocated": 1024}},
                 {"name": "n2", "cpus": {"count": 1}, "memory": {"allocated": 1024}}]}})
    got = job_from_json(j, "n1")
    assert (got.state, got.submit_time, got.end_time) == ("COMPLETED", 500, 900)
    assert (got.alloc_cpus, got.alloc_mem_bytes) == (3.0, 1024 * MIB)


def test_pending_job_has_no_node_and_no_start():
    j = job_from_json(dict(entry(9, 100, state="PENDING", start=0), nodes="", job_resources={}), "n1")
    assert j.nodes == () and j.start_time is None


@pytest.mark.parametrize("text", ["", "garbage{", "[]", '{"jobs": 3}'])
def test_unreadable_answers_are_errors(text):
    with pytest.raises(SlurmError, match="squeue --json"):
        parse_squeue_json(text, "n1")


def test_an_error_answer_without_jobs_is_an_error():
    text = json.dumps({"errors": [{"error": "Unable to contact slurm controller"}], "jobs": []})
    with pytest.raises(SlurmError, match="Unable to contact"):
        parse_squeue_json(text, "n1")


def test_comment_merge_keeps_other_nodes_and_text():
    a = footprint_comment("n1", 1234.56, 0.012345, 0.00567, 20.04)
    assert a == "greend: energy_j=1234.6 carbon_g=0.01235 water_l=0.00567 cpu_s=20.0 node=n1"
    so_far = footprint_comment("n1", 1.0, 0.1, 0.1, 1.0, final=False)
    assert so_far.startswith("greend (so far): energy_j=1.0 ")
    assert merge_comment(so_far, a, "n1") == a  # the final entry replaces the running one
    b = footprint_comment("n2", 1.0, 0.1, 0.1, 1.0)
    assert merge_comment("", a, "n1") == a
    assert merge_comment("charge to X", a, "n1") == f"charge to X | {a}"
    both = merge_comment(a, b, "n2")
    assert both == f"{a} | {b}"
    a2 = footprint_comment("n1", 2.0, 0.2, 0.2, 2.0)
    assert merge_comment(both, a2, "n1") == f"{b} | {a2}"  # n1's entry replaced, n2's kept


# -- the commands: timeouts, errors, garbage ------------------------------------------------------
def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = d / name
        p.write_text("#!/bin/sh\n" + body + "\n")
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return d


def _procs_with(marker: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
            except OSError:
                pass
    return out


def test_slow_command_is_killed_at_the_timeout(tmp_path):
    marker = f"{time.time_ns() % 10**6}.5"
    cmds = SlurmCommands(bin_dir=fake_bin(tmp_path, squeue=f"sleep {marker}"), timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(SlurmError, match=r"did not answer within 0.5 s"):
        cmds.jobs("n1")
    assert time.monotonic() - t0 < 3
    time.sleep(0.1)
    assert _procs_with(f"sleep\0{marker}") == []  # the command's children are gone too


def test_failing_and_garbage_commands(tmp_path):
    bindir = fake_bin(tmp_path, squeue="echo 'slurm_load_jobs error: Unable to contact slurm "
                      "controller (connect failure)' >&2; exit 1")
    with pytest.raises(SlurmError, match=r"squeue --json exited 1: slurm_load_jobs error: Unable"):
        SlurmCommands(bin_dir=bindir).jobs("n1")
    fake_bin(tmp_path, squeue="printf '\\377\\376 not json'")
    with pytest.raises(SlurmError, match="not JSON"):
        SlurmCommands(bin_dir=bindir).jobs("n1")
    with pytest.raises(SlurmError, match="command not found"):
        SlurmCommands(bin_dir=tmp_path / "empty").jobs("n1")


def test_commands_get_slurm_conf(tmp_path):
    bindir = fake_bin(tmp_path, scontrol='echo "slurm 22.05.8 $SLURM_CONF"')
    assert SlurmCommands(Path("/etc/x/slurm.conf"), bindir).version() == "slurm 22.05.8 /etc/x/slurm.conf"


# -- pyslurm: used only when built for the running Slurm ------------------------------------------
class _PyJob:
    def __init__(self, job_id, submit):
        self.id, self.submit_time, self.state, self.cluster = job_id, submit, "RUNNING", "c1"
        self.name, self.user_name, self.user_id, self.account = "py", "bob", 1001, "acct"
        self.partition, self.allocated_nodes, self.cpus, self.memory_per_node = "p", "n1", 4, 1024
        self.start_time, self.end_time, self.admin_comment, self.comment = submit + 5, None, "", ""


def _fake_pyslurm(monkeypatch, version: str):
    mod = types.ModuleType("pyslurm")
    mod.__version__ = version
    mod.Jobs = types.SimpleNamespace(load=lambda: {5: _PyJob(5, 100)})
    monkeypatch.setitem(sys.modules, "pyslurm", mod)
    return mod


def test_pyslurm_absent_falls_back_to_commands(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyslurm", None)  # import fails as if not installed
    mod, why = load_pyslurm("slurm-wlm 22.05.8")
    assert mod is None and "not installed" in why


def test_pyslurm_for_another_release_is_not_used(monkeypatch, tmp_path):
    _fake_pyslurm(monkeypatch, "25.11.2")
    mod, why = load_pyslurm("slurm-wlm 22.05.8")
    assert mod is None and "25.11.2" in why and "22.05.8" in why
    bindir = fake_bin(tmp_path, scontrol="echo slurm-wlm 22.05.8",
                      squeue="echo '" + json.dumps({"jobs": [entry(8, 50)]}) + "'")
    meta = SlurmMetadata("n1", SlurmCommands(bin_dir=bindir))
    meta.refresh()
    assert meta.backend is meta.commands and "not built for" in meta.status.detail
    assert meta.get("8").submit_time == 50


def test_pyslurm_matching_the_release_is_used(monkeypatch, tmp_path):
    _fake_pyslurm(monkeypatch, "22.5.0")
    bindir = fake_bin(tmp_path, scontrol="echo slurm-wlm 22.05.8", squeue="exit 1")
    meta = SlurmMetadata("n1", SlurmCommands(bin_dir=bindir))
    meta.refresh()
    assert meta.status.ok and meta.status.detail.startswith("pyslurm 22.5.0")
    j = meta.get("5")
    assert (j.user, j.submit_time, j.alloc_cpus, j.alloc_mem_bytes) == ("bob", 100, 4.0, 1024 * MIB)


# -- the monitor: identity, lifecycle, faults -----------------------------------------------------
class FakeSlurm:
    """Stands in for SlurmCommands: squeue entries the test edits, recorded comment updates."""

    conf = None

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}
        self.fail: Exception | None = None
        self.updates: list[tuple[str, str, str]] = []

    def describe(self) -> str:
        return "fake squeue"

    def version(self) -> str:
        return "slurm 22.05.8"

    def jobs(self, node: str):
        if self.fail is not None:
            raise self.fail
        return [job_from_json(e, node) for e in self.entries.values()]

    def update_comment(self, job_id: str, field: str, text: str) -> None:
        self.updates.append((job_id, field, text))
        self.entries[job_id]["admin_comment" if field == "AdminComment" else "comment"] = text


@dataclass
class Node:
    proc: FakeProc
    jobs: object
    clock: Clock
    cfg: config_mod.Config
    fake: FakeSlurm
    slurm: SlurmMetadata
    ledger: Ledger

    def monitor(self) -> Monitor:
        return Monitor(self.cfg, self.ledger, jobs_source=self.jobs, energy_sources=[],
                       clock=self.clock, slurm=self.slurm)

    def step(self, dt: float = 5.0, cpu_s: dict[str, float] | None = None) -> None:
        active = 0
        for key, s in (cpu_s or {}).items():
            self.jobs.run(key, int(s * 1e9))
            active += round(s * 1e9 / NS_PER_TICK)
        total = round(dt * NCPU * 1e9 / NS_PER_TICK)
        self.proc.advance(active, total - active)
        self.clock.advance(dt)

    def sampled(self, cpu_s: dict[str, float]) -> Monitor:
        """A monitor that sampled the node, then again after the jobs used `cpu_s` of CPU."""
        m = self.monitor()
        m.tick()
        self.step(cpu_s=cpu_s)
        m.tick()
        return m

    def rows(self, job_id: str):
        return self.ledger.get_job("c1", job_id, "n1")


@pytest.fixture
def node(tmp_path):
    proc = make_procfs(tmp_path / "proc", ncpu=NCPU, packages=1)
    cfg = config_mod.parse({
        "cluster": "c1", "node": "n1", "state_dir": str(tmp_path / "state"),
        "paths": {"procfs": str(tmp_path / "proc"), "sysfs": str(tmp_path / "sys"),
                  "cgroupfs": str(tmp_path / "cgroup")},
        "attribution": {"idle_power": "unattributed"},
        "power": {"rapl": False, "cpu_tdp_w": 100.0, "memory_w_per_gb": 0.0},
        "clusters": {"c1": {"pue": 1.5, "carbon_intensity_g_per_kwh": 100.0}},
    })
    fake = FakeSlurm()
    clock = Clock(T0)
    slurm = SlurmMetadata("n1", fake, use_pyslurm=False, write_back="admin_comment", clock=clock)
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    yield Node(proc, FakeJobs(), clock, cfg, fake, slurm, ledger)
    ledger.close()


def test_metadata_enriches_accounts_and_ledger_rows(node):
    node.fake.entries["42"] = entry(42, 1000, gres=1)
    node.slurm.refresh()
    key = node.jobs.add("42", alloc_cpus=1, uid=1000)  # the cpuset is narrower than the allocation
    m = node.sampled({key: 5.0})
    m.checkpoint()
    (row,) = node.rows("42")
    assert (row.user, row.uid, row.account, row.partition, row.name) == (
        "alice", 1000, "proj-green", "debug", "train")
    assert (row.submit_time, row.alloc_cpus, row.alloc_mem_bytes, row.alloc_gpus) == (
        1000, 2.0, 512 * MIB, 1)
    assert row.meta["slurm_state"] == "RUNNING" and "provisional" not in row.meta
    assert row.state == "running" and row.cpu_time_ns == 5 * 10**9 and row.cpu_uj > 0
    assert node.slurm.requests == 0  # known at once: no extra refresh asked for


def test_unknown_jobs_get_a_provisional_identity_fixed_by_pk(node):
    node.slurm.refresh()  # an empty cache
    a, b = node.jobs.add("42"), node.jobs.add("43")
    m = node.monitor()
    m.tick()
    assert node.slurm.requests == 1  # two unknown jobs in one tick: one refresh asked for
    node.step(cpu_s={a: 2.0, b: 1.0})
    m.tick()
    assert node.slurm.requests == 1  # not again for the same jobs
    c = node.jobs.add("44")
    node.step(cpu_s={a: 2.0, b: 1.0})
    m.tick()
    assert node.slurm.requests == 2  # a new one: one more
    m.checkpoint()
    (row,) = node.rows("42")
    assert row.submit_time == int(T0) and row.meta["provisional"]
    pk, energy = row.pk, row.cpu_uj
    # Slurm's metadata arrives: the same row gets the real identity (updated by pk).
    for j in ("42", "43", "44"):
        node.fake.entries[j] = entry(int(j), 900, start=int(T0) - 50)
    node.slurm.refresh()
    node.step(cpu_s={a: 2.0, b: 1.0, c: 1.0})
    m.tick()
    m.checkpoint()
    (row,) = node.rows("42")
    assert (row.pk, row.submit_time, row.user) == (pk, 900, "alice")
    assert "provisional" not in row.meta and row.cpu_uj > energy
    assert row.cpu_time_ns == 6 * 10**9


def test_a_job_that_started_after_its_id_was_first_seen_is_another_job(node):
    node.slurm.refresh()
    key = node.jobs.add("42")
    m = node.sampled({key: 2.0})
    # The cache now shows a job 42 that started after greend first saw a job_42 cgroup: the
    # provisional account was another (unknown) job's.
    node.fake.entries["42"] = entry(42, int(T0) + 3, start=int(T0) + 4)
    node.slurm.refresh()
    node.step(cpu_s={key: 3.0})
    m.tick()
    m.checkpoint()
    old, new = node.rows("42")
    assert old.state == "ended" and old.meta["provisional"] and old.cpu_time_ns == 2 * 10**9
    assert new.state == "running" and new.submit_time == int(T0) + 3
    assert new.cpu_time_ns == 3 * 10**9


def test_job_id_reuse_gives_two_rows_never_merged(node):
    node.fake.entries["42"] = entry(42, 1000)
    node.slurm.refresh()
    key = node.jobs.add("42")
    m = node.sampled({key: 4.0})
    m.checkpoint()
    (first,) = node.rows("42")
    # The controller lost its state and gave id 42 to another job; its cgroup starts from 0.
    node.fake.entries["42"] = entry(42, 5000, user="bob", uid=1001, start=5001)
    node.slurm.refresh()
    node.jobs.jobs[key].cpu_time_ns = 0
    node.step(cpu_s={key: 1.0})
    m.tick()
    node.step(cpu_s={key: 1.0})
    m.tick()
    m.checkpoint()
    old, new = sorted(node.rows("42"), key=lambda r: r.submit_time)
    assert (old.submit_time, old.user, old.state) == (1000, "alice", "ended")
    assert (old.cpu_time_ns, old.cpu_uj) == (first.cpu_time_ns, first.cpu_uj)  # nothing added
    assert (new.submit_time, new.user, new.state) == (5000, "bob", "running")
    assert new.cpu_time_ns == 2 * 10**9
    assert old.pk != new.pk


def test_a_stale_cache_never_merges_a_new_job_into_a_closed_one(node):
    node.fake.entries["42"] = entry(42, 1000)
    node.slurm.refresh()
    key = node.jobs.add("42")
    m = node.sampled({key: 4.0})
    node.jobs.end(key)
    node.step()
    m.tick()
    m.checkpoint()
    # No refresh since (controller down): the cache still says job 42 is the one submitted at 1000.
    key = node.jobs.add("42")
    node.step(cpu_s={key: 1.0})
    m.tick()
    m.checkpoint()
    rows = sorted(node.rows("42"), key=lambda r: r.first_seen)
    assert len(rows) == 2
    assert (rows[0].submit_time, rows[0].state, rows[0].cpu_time_ns) == (1000, "ended", 4 * 10**9)
    assert rows[1].meta["provisional"] and rows[1].submit_time != 1000
    assert rows[1].cpu_time_ns == 1 * 10**9


def test_job_ending_between_samples_is_closed_at_its_last_sample_with_slurms_end(node):
    node.fake.entries["42"] = entry(42, 1000, start=int(T0) - 100)
    node.slurm.refresh()
    key, other = node.jobs.add("42"), node.jobs.add("43")
    node.fake.entries["43"] = entry(43, 1001, start=int(T0) - 100)
    m = node.sampled({key: 4.0, other: 4.0})
    last_sample = node.clock.t
    m.checkpoint()
    (before,) = node.rows("42")
    # The job ends and its cgroup vanishes between two samples.
    node.jobs.end(key)
    node.step(cpu_s={other: 4.0})
    m.tick()
    m.checkpoint()
    (row,) = node.rows("42")
    assert row.state == "ended" and row.last_seen == last_sample
    assert (row.cpu_uj, row.cpu_time_ns) == (before.cpu_uj, before.cpu_time_ns)
    assert row.end_time == node.clock.t  # greend's estimate until Slurm says
    # Slurm's record of the end arrives with the next refresh.
    node.fake.entries["42"] = entry(42, 1000, start=int(T0) - 100, state="COMPLETED",
                                    end=int(last_sample) + 1)
    node.slurm.refresh()
    node.step(cpu_s={other: 4.0})
    m.tick()
    m.checkpoint()
    (row,) = node.rows("42")
    assert row.end_time == int(last_sample) + 1 and row.meta["end_time_from"] == "slurm"
    assert row.meta["slurm_state"] == "COMPLETED" and row.pk == before.pk
    # ... and the frozen footprint is written back to the job's AdminComment.
    node.slurm.refresh()
    (upd,) = [u for u in node.fake.updates if u[0] == "42"]
    assert upd[:2] == ("42", "AdminComment")
    assert upd[2] == footprint_comment("n1", row.it_energy_uj / 1e6, row.carbon_g,
                                       row.water_site_l + row.water_offsite_l, 4.0)
    assert node.fake.entries["42"]["admin_comment"] == upd[2]
    assert node.slurm.pending_write_backs == 0


def test_running_jobs_footprint_so_far_is_written_and_kept_if_slurm_refuses_the_final(node):
    node.slurm.write_back_interval_s = 10
    node.fake.entries["42"] = entry(42, 1000, start=int(T0) - 100, admin_comment="charge X")
    node.slurm.refresh()
    key = node.jobs.add("42")
    m = node.monitor()
    m.tick()
    for _ in range(4):  # refreshes every 5 s, the footprint so far written every 10 s
        node.step(cpu_s={key: 5.0})
        m.tick()
        node.slurm.refresh()
    texts = [u[2] for u in node.fake.updates]
    assert len(texts) == 2 and all(t.startswith("charge X | greend (so far): energy_j=") for t in texts)
    assert "cpu_s=5.0 node=n1" in texts[0] and "cpu_s=15.0 node=n1" in texts[1]
    # Slurm 22.05 refuses any update once the job has finished.
    node.jobs.end(key)
    node.step()
    m.tick()
    node.fake.entries["42"].update(job_state="COMPLETED", end_time=int(node.clock.t))
    node.slurm.refresh()
    node.step()
    m.tick()
    assert node.slurm.pending_write_backs == 1

    def refuse(job_id, field, text):
        raise SlurmError(f"scontrol update exited 1: Job has already finished for job {job_id}")

    node.fake.update_comment = refuse
    node.slurm.refresh()
    assert node.slurm.pending_write_backs == 0 and node.slurm.refused == 1
    assert node.fake.entries["42"]["admin_comment"] == texts[-1]


def test_write_back_never_goes_to_another_job_with_the_same_id(node):
    node.slurm.queue_write_back("42", 1000, "greend: energy_j=1.0 node=n1")
    node.fake.entries["42"] = entry(42, 2000)  # id 42 is now another job
    node.slurm.refresh()
    assert node.fake.updates == [] and node.slurm.pending_write_backs == 1
    node.clock.advance(7200)  # after the give-up delay it is dropped, never written
    node.slurm.refresh()
    assert node.fake.updates == [] and node.slurm.pending_write_backs == 0


@pytest.mark.parametrize("fault", [
    SlurmError("squeue --json did not answer within 2 s (controller down or overloaded?)"),
    SlurmError("squeue --json: not JSON (Expecting value: line 1 column 1 (char 0))"),
    RuntimeError("backend crashed"),
])
def test_slurm_faults_keep_sampling_and_are_reported(node, fault):
    node.fake.entries["42"] = entry(42, 1000)
    node.slurm.refresh()
    key = node.jobs.add("42")
    m = node.monitor()
    m.tick()
    node.fake.fail = fault
    node.slurm.refresh()
    st = m.status["slurm"]
    assert not st.ok and st.errors_total == 1 and str(fault) in st.error
    new = node.jobs.add("43")
    for _ in range(3):
        node.step(cpu_s={key: 2.0, new: 1.0})
        assert m.tick() is not None
    m.checkpoint()
    (known,) = node.rows("42")
    (unknown,) = node.rows("43")
    assert known.submit_time == 1000 and known.cpu_time_ns == 6 * 10**9  # the last good cache
    assert unknown.meta["provisional"] and unknown.cpu_time_ns == 3 * 10**9
    node.fake.fail = None
    node.slurm.refresh()
    assert st.ok and st.error == ""


@pytest.mark.parametrize("version", [1, 2], ids=["cgroup-v1", "cgroup-v2"])
def test_enrichment_with_job_cgroups(node, tmp_path, version):
    tree = make_cgroups(tmp_path / f"cg{version}", version, node="n1")
    tree.add_job("77", uid=1000, cpus="0", mem_limit=256 * MIB, cpu_ns=0)
    node.fake.entries["77"] = entry(77, 700, cpus=2, mem_mb=512)
    node.slurm.refresh()
    node.jobs = SlurmCgroups(tree.root, "c1", "n1")
    m = node.monitor()
    m.tick()
    tree.set_cpu("77", 3 * 10**9)
    node.step()
    m.tick()
    tree.remove_job("77")
    node.step()
    m.tick()
    m.checkpoint()
    (row,) = node.rows("77")
    assert (row.submit_time, row.user, row.alloc_cpus, row.alloc_mem_bytes) == (700, "alice", 2.0,
                                                                               512 * MIB)
    assert row.state == "ended" and row.cpu_time_ns == 3 * 10**9
    m.close()


def test_enrichment_with_the_process_scan(node, tmp_path):
    # proctrack/linuxproc: no job cgroups; the job's processes carry SLURM_JOB_ID.
    node.proc.add_process(500, comm="python", utime=100,
                          env={"SLURM_JOB_ID": "88", "SLURM_CLUSTER_NAME": "c1"})
    node.fake.entries["88"] = entry(88, 800)
    node.slurm.refresh()
    node.jobs = ProcScan(node.proc.root, "c1")
    m = node.monitor()
    m.tick()
    node.proc.set_process(500, comm="python", utime=400)
    node.step()
    m.tick()
    m.checkpoint()
    (row,) = node.rows("88")
    # from the first sample on: 300 of the process's 400 ticks
    assert (row.submit_time, row.account, row.cpu_time_ns) == (800, "proj-green", 300 * NS_PER_TICK)
    m.close()


@pytest.mark.parametrize(("squeue", "reason"), [
    ("sleep 30", "did not answer within 1 s"),
    ("echo 'squeue: error: slurm_load_jobs error: Unable to contact slurm controller "
     "(connect failure)' >&2; exit 1", "exited 1: squeue: error: slurm_load_jobs error: Unable"),
    ("echo '<html>garbage'", "not JSON"),
], ids=["slow", "error", "garbage"])
def test_daemon_with_a_broken_squeue_on_path(tmp_path, monkeypatch, squeue, reason):
    """A fake squeue first in PATH: greend samples on, /healthz says why it is degraded, and a job
    id seen twice (two cgroups, no metadata to tell them apart) still gives two rows."""
    from greend.daemon import Daemon

    bindir = fake_bin(tmp_path, squeue=squeue, scontrol="echo slurm 22.05.8")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    proc = make_procfs(tmp_path / "proc", ncpu=2)
    tree = make_cgroups(tmp_path / "cgroup", 2, node="n1")
    tree.add_job("5", cpu_ns=0)
    cfg = config_mod.parse({
        "cluster": "c1", "node": "n1", "state_dir": str(tmp_path / "state"),
        "paths": {"procfs": str(tmp_path / "proc"), "sysfs": str(tmp_path / "sys"),
                  "cgroupfs": str(tmp_path / "cgroup")},
        "attribution": {"jobs_from": "cgroup"},
        "power": {"rapl": False},
        # the whole-queue mode, which this test is about (local discovery: test_discovery.py)
        "slurm": {"timeout_s": 1, "conf": str(tmp_path / "slurm.conf"), "discovery": "squeue"},
        "clusters": {"c1": {}},
    })
    d = Daemon(cfg, listen="127.0.0.1:0", socket_path=None)
    try:
        assert d.slurm is not None and d.monitor.slurm is d.slurm
        d.slurm.refresh()
        samples = d.monitor.ticks
        d.sample()
        h = d.health()
        assert h["status"] == "degraded"
        assert any(r.startswith("collector slurm failing: ") and reason in r for r in h["reasons"]), \
            h["reasons"]
        assert h["collectors"]["slurm"]["ok"] is False and h["collectors"]["slurm"]["errors_total"] == 1
        for n in (1, 2):
            tree.set_cpu("5", n * 10**9)
            proc.advance(100, 100)
            d.sample()
        assert d.monitor.ticks == samples + 3  # sampling goes on
        d.checkpoint()
        # The job ends and a new job gets the same id (the controller restarted) while Slurm
        # cannot be asked: its provisional identity keeps it apart from the first one.
        tree.remove_job("5")
        proc.advance(100, 100)
        time.sleep(1.1)  # provisional submit times are whole seconds of first sight
        d.sample()
        tree.add_job("5", cpu_ns=0)
        d.sample()
        tree.set_cpu("5", 5 * 10**9)
        proc.advance(100, 100)
        d.sample()
        d.checkpoint()
        rows = sorted(d.ledger.get_job("c1", "5", "n1"), key=lambda r: r.first_seen)
        assert [r.state for r in rows] == ["ended", "running"]
        assert [r.cpu_time_ns for r in rows] == [2 * 10**9, 5 * 10**9]
        assert all(r.meta.get("provisional") for r in rows)
        assert rows[0].submit_time != rows[1].submit_time
    finally:
        d.monitor.close()
        d.ledger.close()


def test_slurm_off_or_absent_means_no_metadata(tmp_path, monkeypatch):
    from greend.collectors import slurm as slurm_mod
    from greend.collectors.slurm import from_config

    off = config_mod.parse({"slurm": {"enabled": False}}).slurm
    assert from_config(off, "n1") is None
    absent = config_mod.parse({"slurm": {"bin_dir": str(tmp_path)}}).slurm
    assert from_config(absent, "n1") is None  # auto, and no squeue there
    bindir = fake_bin(tmp_path, squeue="exit 1")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.setattr(slurm_mod, "DEFAULT_CONFS", (str(tmp_path / "slurm.conf"),))
    unconfigured = config_mod.parse({"slurm": {"bin_dir": str(bindir)}}).slurm
    assert from_config(unconfigured, "n1") is None  # a client without a configuration
    (tmp_path / "slurm.conf").write_text("ClusterName=c1\n")
    assert from_config(unconfigured, "n1") is not None
    monkeypatch.setattr(slurm_mod, "DEFAULT_CONFS", ())
    conf = config_mod.parse({"slurm": {"bin_dir": str(bindir), "conf": "/x/slurm.conf"}}).slurm
    assert from_config(conf, "n1") is not None
    forced = config_mod.parse({"slurm": {"enabled": True, "bin_dir": str(tmp_path),
                                         "write_back": "comment"}}).slurm
    meta = from_config(forced, "n1")
    assert meta is not None and meta.write_back == "comment"
    with pytest.raises(config_mod.ConfigError, match=r"slurm\.write_back"):
        config_mod.parse({"slurm": {"write_back": "everywhere"}})


# -- against the real testbed ---------------------------------------------------------------------
from slurmbed import BURN, root_testbed  # noqa: E402 - with the testbed tests it serves


@pytest.fixture(scope="module")
def tb():
    return root_testbed()


def wait_cgroup(tb, cluster: str, node: str, job_id: int, timeout: float = 30) -> None:
    tb.wait_state(cluster, job_id, "RUNNING", timeout=timeout)
    deadline = time.monotonic() + timeout
    while not (tb.job_cgroup("cpuacct", node, job_id) / "cpuacct.usage").exists():
        assert time.monotonic() < deadline, f"no cgroup for job {job_id} on {node}"
        time.sleep(0.1)


@pytest.mark.slurm
def test_testbed_squeue_metadata_and_listpids(tb):
    cmds = SlurmCommands(tb.conf("site"), timeout_s=10)
    # site-n1: in the testbed, `scontrol listpids` reaches only the first slurmd of the host.
    job_id = tb.submit("site", BURN.format(secs=20), extra_args=["-w", "site-n1", "-c", "1",
                                                                 "--account=proj-meta", "-J", "meta"])
    try:
        tb.wait_started("site", job_id, timeout=30)
        jobs = {j.job_id: j for j in cmds.jobs("site-n1")}
        j = jobs[str(job_id)]
        assert (j.user, j.uid, j.account, j.partition, j.name, j.cluster) == (
            "greendtest", 4242, "proj-meta", "debug", "meta", "site")
        assert (j.alloc_cpus, j.alloc_mem_bytes, j.state) == (1.0, 256 * MIB, "RUNNING")
        assert j.nodes == ("site-n1",) and j.start_time >= j.submit_time > 0
        got: object = None
        for _ in range(20):  # a process may start or exit between the two calls
            want = set(tb.pids("site", job_id))
            try:
                if set(cmds.listpids(str(job_id))) == want:
                    break
            except SlurmError as e:  # slurmd busy: try again
                got = e
            time.sleep(0.2)
        else:
            raise AssertionError(f"scontrol listpids {job_id} never gave {want} ({got})")
        assert "slurm" in cmds.version()
        # Process scan (proctrack/linuxproc's view): the job's processes carry SLURM_JOB_ID.
        scan = ProcScan(Path("/proc"), "site")
        try:
            scan.read()
            groups = {pid: scan.procs[pid].group for pid in tb.pids("site", job_id) if pid in scan.procs}
            assert groups and set(groups.values()) == {f"slurm/site/{job_id}"}
        finally:
            scan.close()
    finally:
        tb.run("site", "scancel", str(job_id), check=False)


@pytest.mark.slurm
def test_testbed_lifecycle_end_time_and_write_back(tb, tmp_path):
    """A real job on site-n2: metadata, ended with Slurm's end time, footprint in AdminComment."""
    if not tb.uses_cgroups("site"):
        pytest.skip("the testbed runs without job cgroups on this host")
    cfg = config_mod.parse({
        "cluster": "site", "node": "site-n2", "state_dir": str(tmp_path / "state"),
        "attribution": {"jobs_from": "cgroup"}, "power": {"rapl": False},
        "clusters": {"site": {"tier": "site"}},
    })
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    meta = SlurmMetadata("site-n2", SlurmCommands(tb.conf("site"), timeout_s=10),
                         write_back="admin_comment", write_back_interval_s=1)
    meta.on_request = meta.refresh  # in the daemon, a scheduler thread does this
    job_id = tb.submit("site", BURN.format(secs=6), extra_args=["-w", "site-n2", "-c", "1",
                                                                "--account=proj-life"])
    # Other tests may run jobs on site-n2 meanwhile: write back to this one only.
    queue = meta.queue_write_back
    meta.queue_write_back = lambda j, *a: queue(j, *a) if j == str(job_id) else None
    m = None
    try:
        wait_cgroup(tb, "site", "site-n2", job_id)
        m = Monitor(cfg, ledger, slurm=meta)  # the node's cgroup tree exists once a job ran there
        deadline = time.monotonic() + 40
        while True:
            m.tick()
            m.checkpoint()
            meta.refresh()  # the daemon's periodic refresh, which also writes back
            rows = ledger.get_job("site", str(job_id), "site-n2")
            if rows and rows[0].meta.get("end_time_from") == "slurm" and not meta.pending_write_backs:
                break
            assert time.monotonic() < deadline, (rows, m.accounts.keys())
            time.sleep(0.5)
        (row,) = rows
        sq = tb.job("site", job_id)
        assert row.state == "ended" and row.end_time == sq["end_time"]
        assert (row.submit_time, row.user, row.account, row.alloc_cpus) == (
            sq["submit_time"], "greendtest", "proj-life", 1.0)
        assert 0.5 < row.cpu_time_ns / 1e9 < 6.6  # from greend's first sample on
        # Slurm 22.05 refuses to update a finished job: the comment shows the footprint written
        # while it ran; a Slurm that accepts it shows the final one.
        comment = sq["admin_comment"]
        assert comment.startswith(("greend (so far): energy_j=", "greend: energy_j=")), comment
        assert comment.endswith(" node=site-n2")
        if comment.startswith("greend:"):
            assert f"cpu_s={row.cpu_time_ns / 1e9:.1f}" in comment
        else:
            assert meta.refused >= 1
    finally:
        tb.run("site", "scancel", str(job_id), check=False)
        if m is not None:
            m.close()
        ledger.close()


@pytest.mark.slurm
def test_testbed_controller_stopped_and_back(tb, tmp_path):
    """slurmctld stopped: the refresh fails with the reason, sampling goes on; back after restart."""
    if not tb.uses_cgroups("local"):
        pytest.skip("the testbed runs without job cgroups on this host")
    import subprocess

    from slurmbed import SCRIPT

    cfg = config_mod.parse({
        "cluster": "local", "node": "local-n1", "state_dir": str(tmp_path / "state"),
        "attribution": {"jobs_from": "cgroup"}, "power": {"rapl": False},
        "clusters": {"local": {}},
    })
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    meta = SlurmMetadata("local-n1", SlurmCommands(tb.conf("local"), timeout_s=3))
    job_id = tb.submit("local", BURN.format(secs=60), extra_args=["-c", "1"])
    key = f"slurm/local/{job_id}"
    pidfile = tb.base / "local" / "run" / "slurmctld.pid"
    m = starter = None
    try:
        tb.wait_started("local", job_id, timeout=30)
        m = Monitor(cfg, ledger, slurm=meta)
        meta.refresh()
        m.tick()
        row = m.accounts[key].row
        assert meta.status.ok and row.user == "greendtest" and "provisional" not in row.meta
        submit = row.submit_time
        # SIGTERM: slurmctld saves its state and exits, so the restarted one still knows the job
        # as running (a SIGKILL right after the allocation can lose it and run the job again).
        ctld = int(pidfile.read_text())
        os.kill(ctld, 15)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{ctld}").exists():
            assert time.monotonic() < deadline, "slurmctld did not stop"
            time.sleep(0.1)
        t0 = time.monotonic()
        meta.refresh()
        assert time.monotonic() - t0 < 3.0 + 3  # bounded by the timeout
        st = m.status["slurm"]
        assert not st.ok and st.error, st
        ticks = m.ticks
        for _ in range(3):
            time.sleep(0.3)
            assert m.tick() is not None
        assert m.ticks == ticks + 3
        assert m.accounts[key].row is row and row.cpu_time_ns > 0  # the same account goes on
        # Back: `start` brings the controller up again, which recovers the running job.
        starter = subprocess.Popen([str(SCRIPT), "start"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while "is UP" not in tb.run("local", "scontrol", "ping", check=False).stdout:
            assert time.monotonic() < deadline, "slurmctld did not come back"
            time.sleep(0.2)
        meta.refresh()
        assert st.ok, st.error
        m.tick()
        assert m.accounts[key].row is row and row.submit_time == submit  # same job, same row
    finally:
        # A finished job makes the restarted controller's scheduler run, which `start` waits for.
        tb.run("local", "scancel", str(job_id), check=False)
        if starter is None:
            subprocess.run([str(SCRIPT), "start"], capture_output=True, timeout=120, check=True)
        else:
            _, err = starter.communicate(timeout=120)
            assert starter.returncode == 0, err
        if m is not None:
            m.close()
        ledger.close()
