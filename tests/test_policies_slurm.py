"""`greend submit` on the real three-cluster Slurm testbed: jobs land where the policy says.

greend runs as root here; the clusters' `sbatch` is a wrapper that runs the real one as the test
user (runuser), as if that user had run greend. The site is saturated with real running jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurmbed import CLUSTERS, TEST_USER, Testbed, ensure_testbed, job_state
from test_policies import _toml, add_jobs

pytestmark = pytest.mark.slurm

GREEND = Path(sys.executable).with_name("greend")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "testbed.toml"
HOUR = 3600


def hour0() -> float:
    return (time.time() // HOUR) * HOUR


@pytest.fixture(scope="module")
def tb() -> Testbed:
    if os.geteuid() != 0:
        pytest.skip("the Slurm testbed needs root (slurmd manages cgroups, SlurmUser=root)")
    testbed = ensure_testbed()
    testbed.cancel_all()
    yield testbed
    testbed.cancel_all()


@pytest.fixture(scope="module")
def work(tb) -> Path:
    d = Path(tempfile.mkdtemp(prefix="greend-policy-", dir="/tmp"))
    d.chmod(0o755)  # the test user's sbatch reads scripts and starts in this directory
    bindir = d / "bin"
    bindir.mkdir()
    for cmd in ("sbatch", "squeue", "sinfo", "scontrol"):
        real = shutil.which(cmd) or f"/usr/bin/{cmd}"
        run_as = f"runuser -u {TEST_USER} -- " if cmd == "sbatch" else ""
        (bindir / cmd).write_text(f'#!/bin/sh\nexec {run_as}{real} "$@"\n')
        (bindir / cmd).chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_config(work: Path, tb: Testbed, name: str = "greend.toml", dead: set[str] = frozenset(),
                 lowest_hours: tuple[int, ...] = (3, 4), h0: float | None = None) -> Path:
    """The example configuration with this testbed's paths, a carbon series for site that is low in
    `lowest_hours` (hours from the start of this hour), budgets, and a 10-minute overflow threshold."""
    import tomllib

    data = tomllib.loads(EXAMPLE.read_text())
    for c in CLUSTERS:
        conf, timeout_s = tb.conf(c), 5.0
        if c in dead:  # Slurm's commands retry a dead controller: greend's timeout ends them
            conf, timeout_s = dead_conf(work, tb, c), 2.0
        data["clusters"][c]["slurm"] = {"conf": str(conf), "bin_dir": str(work / "bin"),
                                        "timeout_s": timeout_s}
    data["clusters"]["site"]["accounts"] += ["proj-refuse", "proj-defer"]
    h0 = hour0() if h0 is None else h0
    rows = ["timestamp,g_per_kwh"]
    for i in range(-1, 48):
        v = 20 if i in lowest_hours else 300
        rows.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S+00:00', time.gmtime(h0 + i * HOUR))},{v}")
    (work / "site-ci.csv").write_text("\n".join(rows) + "\n")
    data["clusters"]["site"]["carbon_intensity_series"] = str(work / "site-ci.csv")
    data["policy"] = {
        "state_max_age_s": 0, "state_cache": str(work / "state.json"),
        "ledger": str(work / "ledger.sqlite"),
        "rules": [
            {"rule": "cluster_open"}, {"rule": "hds"}, {"rule": "account_allowed"},
            {"rule": "fits_partition"},
            {"rule": "tier_conditions", "tier": "local"}, {"rule": "reachable"},
            {"rule": "overflow", "tier": "site", "max_wait": "10m"},
            {"rule": "tier_preference", "weight": 4}, {"rule": "expected_wait", "weight": 2},
            {"rule": "carbon", "weight": 1}, {"rule": "water", "weight": 1},
            {"rule": "budget"}, {"rule": "carbon_deferral"}, {"rule": "right_sizing"},
        ],
        "budgets": [
            {"account": "proj-budget", "energy_kwh": 1.0, "action": "nice", "nice": 5000},
            {"account": "proj-refuse", "energy_kwh": 1.0, "action": "refuse"},
            {"account": "proj-defer", "energy_kwh": 1.0, "action": "defer"},
        ],
    }
    p = work / name
    p.write_text(_toml(data))
    return p


def dead_conf(work: Path, tb: Testbed, cluster: str) -> Path:
    """A copy of the cluster's slurm.conf whose controller port nobody listens on. Slurm's commands
    try to connect for MessageTimeout seconds (default 10): 2 here, as a short test's patience."""
    d = work / f"dead-{cluster}"
    d.mkdir(exist_ok=True)
    text = re.sub(r"^SlurmctldPort=\d+", "SlurmctldPort=16999", tb.conf(cluster).read_text(), flags=re.M)
    text += "MessageTimeout=2\n"
    (d / "slurm.conf").write_text(text)
    return d / "slurm.conf"


def job_script(work: Path, name: str, body: str) -> Path:
    p = work / f"{name}.sh"
    p.write_text(f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --output=/dev/null\n{body.strip()}\n"
                 "sleep 120\n")
    p.chmod(0o644)
    return p


def greend(work: Path, config: Path, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(work)}
    env.pop("GREEND_CONFIG", None)
    return subprocess.run([str(GREEND), "-c", str(config), *map(str, argv)], capture_output=True, text=True,
                          cwd=work, env=env, timeout=120)


def submit(work: Path, config: Path, script: Path, *extra) -> dict:
    p = greend(work, config, "submit", "--json", *extra, script)
    assert p.returncode in (0, 1), p.stderr + p.stdout
    return json.loads(p.stdout)


def saturate_site(tb: Testbed) -> list[int]:
    """Fill both site nodes with real running 4-CPU jobs (30-minute limit)."""
    ids = [tb.submit("site", "sleep 600", extra_args=["--cpus-per-task=4", "--time=30", "--job-name=gp-fill",
                                                      "--output=/dev/null"]) for _ in range(2)]
    for i in ids:
        tb.wait_state("site", i, "RUNNING", timeout=30)
    return ids


def scontrol_job(tb: Testbed, cluster: str, job_id: str) -> dict[str, str]:
    """`scontrol show job` fields. Slurm 22.05 shows a job's --begin as EligibleTime (no BeginTime)."""
    out = tb.run(cluster, "scontrol", "-o", "show", "job", str(job_id)).stdout
    info = dict(re.findall(r"(\w+)=(\S*)", out))
    info.setdefault("BeginTime", info.get("EligibleTime", ""))
    return info


@pytest.fixture
def clean(tb):
    tb.cancel_all()
    yield
    tb.cancel_all()


CASES = [
    # name, script body, site saturated?, expected cluster, expected state there
    ("small-site", "#SBATCH -c 2\n#SBATCH -t 10\n#SBATCH -A proj-green", False, "site", None),
    ("long-site-batch", "#SBATCH -c 4\n#SBATCH -t 2:00:00\n#SBATCH -A proj-green", False, "site", None),
    ("big-national", "#SBATCH -c 8\n#SBATCH -t 10\n#SBATCH -A proj-green", False, "national", None),
    ("saturated-national", "#SBATCH -c 2\n#SBATCH -t 10\n#SBATCH -A proj-green", True, "national",
     "RUNNING"),
    ("hds-saturated-waits", "#SBATCH -c 2\n#SBATCH -t 10\n#SBATCH -A proj-hds\n#GREEND --data-class=hds",
     True, "site", "PENDING"),
    ("no-account-national", "#SBATCH -c 2\n#SBATCH -t 10", False, "national", None),
]


@pytest.mark.parametrize("name,body,saturated,expected,state", CASES, ids=[c[0] for c in CASES])
def test_jobs_land_where_the_policy_says(tb, work, clean, name, body, saturated, expected, state):
    cfg = write_config(work, tb)
    if saturated:
        saturate_site(tb)
    out = submit(work, cfg, job_script(work, name, body))
    sub, dec = out["submission"], out["decision"]
    assert sub["outcome"] == "submitted", sub
    assert sub["cluster"] == expected, dec["summary"]
    job = tb.job(expected, sub["job_id"])
    assert job is not None and job["name"] == name
    assert sub["token"] in job["comment"]
    assert job["user_name"] == TEST_USER
    assert job["partition"] == sub["partition"]
    if state:
        deadline = time.monotonic() + 20
        while job_state(tb.job(expected, sub["job_id"])) != state and time.monotonic() < deadline:
            time.sleep(0.3)
        assert job_state(tb.job(expected, sub["job_id"])) == state
    if saturated:
        held = [r for r in dec["rules"] if r["rule"] == "overflow" and r["cluster"] == "site"]
        assert held[0]["verdict"] == "hold" and held[0]["numbers"]["load"] == 1.0
        assert held[0]["numbers"]["expected_wait_s"] > 600
    if name == "hds-saturated-waits":
        assert dec["relaxed"] == ["site"]
        hds = {r["cluster"]: r["verdict"] for r in dec["rules"] if r["rule"] == "hds"}
        assert hds["national"] == "reject"
    # the decision is recorded with the job id
    import sqlite3

    db = sqlite3.connect(work / "ledger.sqlite")
    row = db.execute("SELECT outcome, cluster, job_id FROM decisions WHERE token = ?",
                     (sub["token"],)).fetchone()
    assert row == ("submitted", expected, sub["job_id"])


@pytest.mark.parametrize("account,action", [("proj-budget", "nice"), ("proj-refuse", "refuse"),
                                            ("proj-defer", "defer")])
def test_budget_exceeded_takes_the_configured_action(tb, work, clean, account, action):
    cfg = write_config(work, tb)
    add_jobs(work / "ledger.sqlite", [dict(account=account, job_id=f"b-{account}", facility_j=2 * 3.6e6,
                                           first_seen=time.time() - 60, last_seen=time.time() - 30)])
    body = f"#SBATCH -c 1\n#SBATCH -t 10\n#SBATCH -A {account}"
    out = submit(work, cfg, job_script(work, f"gp-{action}", body))
    sub, dec = out["submission"], out["decision"]
    (budget,) = [r for r in dec["rules"] if r["rule"] == "budget"]
    assert budget["verdict"] == action and budget["numbers"]["energy_used"] == pytest.approx(2.0)
    if action == "refuse":
        assert sub["outcome"] == "refused" and sub["job_id"] is None
        for c in CLUSTERS:
            assert not [j for j in tb.jobs(c) if sub["token"] in (j.get("comment") or "")]
        return
    assert sub["outcome"] == "submitted" and sub["cluster"] == "site"
    info = scontrol_job(tb, "site", sub["job_id"])
    if action == "nice":
        assert info["Nice"] == "5000"
    else:
        from greend.policies.rules import period_start

        _, end = period_start("month", time.time())
        assert info["BeginTime"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(end))
        assert job_state(tb.job("site", sub["job_id"])) == "PENDING"


def test_deferrable_job_begins_in_the_low_carbon_window(tb, work, clean):
    h0 = hour0()
    cfg = write_config(work, tb, lowest_hours=(3, 4), h0=h0)
    script = job_script(work, "gp-defer", "#SBATCH -c 1\n#SBATCH -t 60\n#SBATCH -A proj-green\n"
                        "#GREEND --deferrable --deadline=+8h")
    out = submit(work, cfg, script)
    sub = out["submission"]
    assert sub["outcome"] == "submitted" and sub["cluster"] == "site"
    begin = h0 + 3 * HOUR
    info = scontrol_job(tb, "site", sub["job_id"])
    assert info["BeginTime"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(begin))
    assert info["StartTime"] >= info["BeginTime"]  # Slurm holds it until then
    assert info["JobState"] == "PENDING" and info["Reason"] == "BeginTime"
    (v,) = [r for r in out["decision"]["rules"] if r["rule"] == "carbon_deferral"]
    assert v["verdict"] == "defer" and v["numbers"]["mean_best_g_per_kwh"] == 20.0
    # never past its deadline: a deadline before the low window starts the job now
    late = job_script(work, "gp-nodefer", "#SBATCH -c 1\n#SBATCH -t 60\n#SBATCH -A proj-green\n"
                      "#GREEND --deferrable --deadline=+2h")
    sub2 = submit(work, cfg, late)["submission"]
    info2 = scontrol_job(tb, "site", sub2["job_id"])
    assert info2["BeginTime"] <= time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 5))


def test_dead_controller_is_stated_and_submission_falls_back(tb, work, clean):
    cfg = write_config(work, tb, name="dead.toml", dead={"site"})
    r = greend(work, cfg, "route", "--json", "-c", "1", "-t", "10", "-A", "proj-green")
    d = json.loads(r.stdout)
    assert d["cluster"] == "national"
    reach = {x["cluster"]: x for x in d["rules"] if x["rule"] == "reachable"}
    assert reach["site"]["verdict"] == "reject" and "did not answer" in reach["site"]["reason"]
    # Without live state greend does not know: sbatch finds out, and the next choice is taken.
    script = job_script(work, "gp-fallback", "#SBATCH -c 1\n#SBATCH -t 10\n#SBATCH -A proj-green")
    p = greend(work, cfg, "submit", "--no-live", script)
    assert p.returncode == 0, p.stderr
    assert "site: controller did not take the job" in p.stdout
    assert "submitted job" in p.stdout and "to national" in p.stdout
    m = re.search(r"submitted job (\d+) to national", p.stdout)
    assert tb.job("national", m.group(1))["name"] == "gp-fallback"
