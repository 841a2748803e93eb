"""greend against Slurm's own accounting, on the testbed: a real `greend run` as node site-n1 of
cluster site, two CPU-bound jobs sharing that node.

Checked: each job's CPU seconds in greend's ledger agree, within 2 %, with what Slurm's
jobacct_gather/cgroup reads (the job cgroup's cpuacct.stat user + system) and with cpuacct.usage,
at the same moment, and with sstat's TRESUsageInTot cpu (read once the jobs have stopped burning and
the 5 s gather has caught up) within 2 % plus sstat's resolution (whole seconds); the node's
CPU energy splits between the jobs in proportion to their CPU time (idle power unattributed) and the
books balance to the microjoule; the rows carry Slurm's metadata and end time. (Write-back is
left off: other tests' jobs may share the node; tests/test_slurm.py covers it.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

GREEND = str(Path(sys.executable).with_name("greend"))
BURN_SECONDS = 10
# Burn until the stop file appears, then idle (no CPU to speak of) until the done file appears.
SCRIPT = """#!/bin/bash
while [ ! -e {stop} ] && (( SECONDS < 60 )); do :; done
while [ ! -e {done} ] && (( SECONDS < 90 )); do sleep 0.5; done
"""


@pytest.fixture(scope="module")
def tb():
    if os.geteuid() != 0:
        pytest.skip("the Slurm testbed needs root")
    from slurmbed import ensure_testbed

    testbed = ensure_testbed()
    if not testbed.uses_cgroups("site"):
        pytest.skip("the testbed runs without job cgroups on this host")
    return testbed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def sstat_cpu_s(tb, job_id: int) -> tuple[float, float]:
    """(TRESUsageInTot cpu, AveCPU) of the batch step, in seconds (sstat prints whole seconds)."""
    out = tb.run("site", "sstat", "--allsteps", "-j", str(job_id), "-n", "-P",
                 "--format=JobID,AveCPU,TRESUsageInTot").stdout
    for line in out.splitlines():
        step, ave, tres = line.split("|")
        if step == f"{job_id}.batch":
            return seconds(dict(kv.split("=", 1) for kv in tres.split(","))["cpu"]), seconds(ave)
    raise AssertionError(f"no batch step in sstat's answer: {out!r}")


def seconds(text: str) -> float:
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    s = 0.0
    for part in text.split(":"):
        s = s * 60 + float(part)
    return days * 86400 + s


def ledger_rows(path: Path, job_ids: list[int]) -> tuple[dict, list, dict]:
    """This node's rows of the jobs, all rows, and node totals, from one consistent read."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        db.execute("BEGIN")
        rows = [dict(r) for r in db.execute("SELECT * FROM jobs WHERE node = 'site-n1'")]
        totals = {r["domain"]: dict(r) for r in db.execute(
            "SELECT * FROM node_totals WHERE node = 'site-n1'")}
        db.execute("COMMIT")
    finally:
        db.close()
    mine = {}
    for r in rows:
        r["meta"] = json.loads(r["meta"])
        if r["cluster"] == "site" and int(r["job_id"]) in job_ids:
            mine.setdefault(int(r["job_id"]), []).append(r)
    return mine, rows, totals


def test_two_jobs_sharing_a_node_agree_with_slurms_accounting(tb, tmp_path):
    t_start = time.monotonic()
    cgroot = Path("/sys/fs/cgroup/cpuacct/slurm_site-n1")
    if not cgroot.is_dir():  # slurmd creates its cgroup tree with its first job
        first = tb.submit("site", "true", extra_args=["-w", "site-n1"])
        tb.wait_state("site", first, "COMPLETED", timeout=30)
    port = free_port()
    state = tmp_path / "state"
    cfg = tmp_path / "greend.toml"
    cfg.write_text(f"""
cluster = "site"
node = "site-n1"
state_dir = "{state}"

[sampling]
interval_s = 1.0
checkpoint_interval_s = 1.0

[attribution]
jobs_from = "cgroup"
idle_power = "unattributed"

[power]
memory_w_per_gb = 0.0

[slurm]
conf = "{tb.conf('site')}"
timeout_s = 5.0
refresh_s = 2.0

[clusters.site]
tier = "site"
""")
    log = (tmp_path / "greend.log").open("w")
    greend = subprocess.Popen([GREEND, "--config", str(cfg), "run", "--listen", f"127.0.0.1:{port}",
                               "--socket", ""], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    jobs: list[int] = []
    stop = tb.base / "site" / "jobs" / f"stop-{uuid.uuid4().hex}"
    done = stop.with_name(stop.name + "-done")
    stop.parent.mkdir(parents=True, exist_ok=True)
    stop.parent.chmod(0o1777)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert greend.poll() is None, (tmp_path / "greend.log").read_text()
            try:
                code, health = get_json(f"{url}/healthz")
                if health.get("samples", 0) >= 1:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "greend did not come up"
            time.sleep(0.2)

        script = SCRIPT.format(stop=stop, done=done)
        for name in ("acc-a", "acc-b"):
            jobs.append(tb.submit("site", script, extra_args=[
                "-w", "site-n1", "-c", "1", f"--account=proj-{name}", f"--job-name={name}"]))
        for j in jobs:
            tb.wait_started("site", j, timeout=30)
        time.sleep(BURN_SECONDS)
        stop.touch()
        # Idle now: wait for Slurm's 5 s gather (JobAcctGatherFrequency) and for greend's samples
        # and checkpoints to settle, then read everything at the same moment.
        time.sleep(6.5)
        mine, _, _ = ledger_rows(state / "ledger.sqlite", jobs)
        running = {j: mine[j][0]["cpu_time_ns"] / 1e9 for j in jobs}
        cgroup_s = {j: int((cgroot / "uid_4242" / f"job_{j}" / "cpuacct.usage").read_text()) / 1e9
                    for j in jobs}
        # What jobacct_gather/cgroup itself reads: user + system ticks of cpuacct.stat.
        gather_s = {}
        for j in jobs:
            ticks = dict(line.split() for line in
                         (cgroot / "uid_4242" / f"job_{j}" / "cpuacct.stat").read_text().splitlines())
            gather_s[j] = (int(ticks["user"]) + int(ticks["system"])) / os.sysconf("SC_CLK_TCK")
        sstat = {j: sstat_cpu_s(tb, j) for j in jobs}
        code, health = get_json(f"{url}/healthz")
        assert code == 200 and health["status"] == "ok", health
        assert health["collectors"]["slurm"]["ok"] and health["collectors"]["cgroups"]["ok"]

        done.touch()  # the jobs end; their cgroups vanish a moment later
        deadline = time.monotonic() + 30
        while True:
            mine, rows, totals = ledger_rows(state / "ledger.sqlite", jobs)
            if all(len(mine.get(j, [])) == 1 and mine[j][0]["meta"].get("end_time_from") == "slurm"
                   for j in jobs):
                break
            assert time.monotonic() < deadline, {j: mine.get(j) for j in jobs}
            time.sleep(0.5)
    finally:
        for f in (stop, done):
            f.touch()
        if jobs:
            tb.run("site", "scancel", *map(str, jobs), check=False)
        greend.send_signal(signal.SIGTERM)
        try:
            greend.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(greend.pid, signal.SIGKILL)
            greend.wait()
        log.close()
    assert greend.returncode == 0, (tmp_path / "greend.log").read_text()

    final = {j: mine[j][0] for j in jobs}
    sq = {j: tb.job("site", j) for j in jobs}
    figures = {}
    for j in jobs:
        r, s = final[j], sq[j]
        greend_s = r["cpu_time_ns"] / 1e9
        tres_s, ave_s = sstat[j]
        # Metadata and lifecycle from Slurm.
        assert (r["state"], r["user"], r["uid"], r["partition"]) == ("ended", "greendtest", 4242, "debug")
        assert (r["account"], r["name"]) == (s["account"], s["name"])
        assert (r["submit_time"], r["end_time"]) == (s["submit_time"], s["end_time"])
        assert (r["alloc_cpus"], r["alloc_mem_bytes"]) == (1.0, 256 << 20)
        assert "provisional" not in r["meta"] and r["meta"]["slurm_state"] == "COMPLETED"
        # CPU time: the job stopped burning before the readings, so they are all final.
        assert greend_s == pytest.approx(running[j], rel=0.005)
        assert greend_s == pytest.approx(cgroup_s[j], rel=0.02)
        assert greend_s == pytest.approx(gather_s[j], rel=0.02)
        assert greend_s > BURN_SECONDS * 0.3, "the job hardly ran"
        # sstat prints whole seconds, truncated.
        assert tres_s <= greend_s * 1.02 and greend_s < (tres_s + 1) * 1.02, (greend_s, tres_s)
        assert ave_s == tres_s  # one task
        figures[j] = {"greend_cpu_s": round(greend_s, 3), "cgroup_cpu_s": round(cgroup_s[j], 3),
                      "sstat_tres_cpu_s": tres_s, "vs_sstat": round(greend_s / tres_s - 1, 4),
                      "vs_cgroup": round(greend_s / cgroup_s[j] - 1, 5),
                      "jobacct_gather_cpu_s": gather_s[j],
                      "vs_jobacct_gather": round(greend_s / gather_s[j] - 1, 5),
                      "energy_j": r["cpu_uj"] / 1e6}
    a, b = jobs
    # The node's energy splits between the two in proportion to their CPU time.
    e_ratio = final[a]["cpu_uj"] / final[b]["cpu_uj"]
    c_ratio = final[a]["cpu_time_ns"] / final[b]["cpu_time_ns"]
    assert e_ratio == pytest.approx(c_ratio, rel=0.02)
    # Books: every job's energy plus the unattributed rest is the node's energy, to the µJ.
    cpu = totals["cpu"]
    assert sum(r["cpu_uj"] for r in rows) + cpu["unattributed_uj"] == cpu["energy_uj"]
    elapsed = time.monotonic() - t_start
    print(f"\nslurm accuracy: {json.dumps(figures)}; energy ratio {e_ratio:.4f} vs CPU ratio "
          f"{c_ratio:.4f}; node CPU energy {cpu['energy_uj'] / 1e6:.1f} J, unattributed "
          f"{cpu['unattributed_uj'] / 1e6:.1f} J; {elapsed:.0f} s")
