"""Reaching each tier the way sites do (docs/slurm.md, "Transports"), on the real testbed:

- local and site share one slurmdbd: site is reached with Slurm's multi-cluster option
  (`sbatch/squeue/sinfo -M site`) through the local cluster's slurm.conf;
- national is another domain: greend submits through its slurmrestd (auth/jwt) with a token made
  for the test user, and the job runs as that user (squeue and sacct say so).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import test_policies_props as props
import test_policies_slurm as tps
from greend.policies.engine import Engine
from greend.policies.site import compile_site
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slurmbed import TEST_USER, Testbed
from test_policies import _toml
from test_policies_slurm import greend, job_script, submit, write_config

from greend import config as config_mod

# The Slurm policy tests' fixtures: the testbed, their working directory, jobs cancelled around.
tb, work, clean = tps.tb, tps.work, tps.clean

PORT_BASE = int(os.environ.get("GREEND_TESTBED_PORT_BASE", "16800"))
REST_URL = f"http://127.0.0.1:{PORT_BASE + 4}"


def rewrite(path: Path, change) -> Path:
    data = tomllib.loads(path.read_text())
    change(data)
    path.write_text(_toml(data))
    return path


def test_site_is_reached_with_multi_cluster_options(tb, work, clean):
    """site is configured with the local cluster's slurm.conf and `-M site`: the job lands on site,
    live state is site's own (2 nodes, 8 CPUs), and the decision names the transport."""
    cfg = write_config(work, tb, name="mc.toml")

    def mc(data):
        s = data["clusters"]["site"]["slurm"]
        s["conf"] = str(tb.conf("local"))
        s["transport"] = "multi-cluster"

    rewrite(cfg, mc)
    script = job_script(work, "mc-site", "#SBATCH -c 2\n#SBATCH -t 10\n#SBATCH -A proj-green")
    out = submit(work, cfg, script)
    assert out["submission"]["outcome"] == "submitted", out
    assert out["submission"]["cluster"] == "site"
    assert "--clusters=site" in out["submission"]["command"]
    d = out["decision"]
    assert d["transport"]["transport"] == "multi-cluster"
    assert "-M site" in d["transport"]["why"]
    site = next(c for c in d["candidates"] if c["cluster"] == "site")
    assert site["state"]["ok"] is True
    assert site["state"]["total_cpus"] == 8  # site's 2 x 4 CPUs, not local's 2
    job_id = out["submission"]["job_id"]
    job = tb.job("site", job_id)
    assert job is not None and job["user_name"] == TEST_USER
    assert tb.job("local", job_id) is None or tb.job("local", job_id)["name"] != "mc-site"
    p = greend(work, cfg, "submit", "--dry-run", script)
    assert "transport: multi-cluster" in p.stdout, p.stdout


@pytest.fixture
def user_work(tb):
    """A working directory the test user owns (greend runs as that user there)."""
    d = Path(tempfile.mkdtemp(prefix="greend-rest-", dir="/tmp"))
    shutil.chown(d, TEST_USER, TEST_USER)
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def token_for(tb: Testbed, user: str) -> str:
    out = tb.run("national", "scontrol", "token", f"username={user}", "lifespan=600").stdout
    return out.strip().split("=", 1)[1]


def rest_config(user_work: Path, tb: Testbed, token_file: Path | None = None) -> Path:
    cfg = write_config(user_work, tb, name="rest.toml")

    def rest(data):
        for c in data["clusters"].values():
            c["slurm"].pop("bin_dir", None)  # greend itself runs as the test user here
        n = data["clusters"]["national"]["slurm"]
        n.pop("conf")
        n.update({"transport": "rest", "rest_url": REST_URL})
        if token_file is not None:
            n["token_file"] = str(token_file)

    rewrite(cfg, rest)
    for p in user_work.iterdir():
        shutil.chown(p, TEST_USER, TEST_USER)
    return cfg


# greend as the test user: the venv's interpreter may live where only root can read (pyenv under
# /root), so the system's Python 3.11 runs it with the venv's packages.
_AS_USER = ("import site, sys; site.addsitedir(sys.argv.pop(1)); from greend.cli import main; "
            "sys.argv[0] = 'greend'; sys.exit(main())")


def greend_as_user(user_work: Path, cfg: Path, *argv, env: dict | None = None):
    if not Path("/usr/bin/python3").exists():
        pytest.skip("needs the system's python3 to run greend as the test user")
    e = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": f"/home/{TEST_USER}",
         # Not user_work itself, the command's cwd: the configuration cache's greend/ folder
         # there would shadow the greend package for `python3 -c` (cwd first on sys.path).
         "XDG_CACHE_HOME": str(user_work / ".cache"), **(env or {})}
    site_dir = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
    cmd = ["runuser", "-u", TEST_USER, "--", "env", "-i", *(f"{k}={v}" for k, v in e.items()),
           "/usr/bin/python3", "-c", _AS_USER, str(site_dir), "-c", str(cfg), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=user_work, timeout=120)


def wait_text(path: Path, timeout: float) -> str:
    """What the job wrote to `path`, once it has written something (or "" after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return path.read_text().strip() if path.exists() else ""


def accounted_user(tb: Testbed, cluster: str, job_id, name: str, timeout: float = 60) -> list[str]:
    """sacct's `JobName|User` lines for `job_id`, once one names the job `name` (or after
    `timeout`). (-j also lists older jobs with that id from earlier testbed runs, so the caller
    matches the job by name.)"""
    deadline = time.monotonic() + timeout
    while True:
        acct = tb.run(cluster, "sacct", "-X", "-n", "-P", "-j", str(job_id),
                      "-o", "JobName,User", check=False).stdout
        if f"{name}|" in acct or time.monotonic() > deadline:
            return acct.splitlines()
        time.sleep(0.5)


def test_national_job_goes_through_slurmrestd_as_the_user(tb, user_work, clean):
    """An 8-CPU job routed to national is submitted through slurmrestd with the test user's own
    token and runs as that user: squeue, the job's own `id -un` and sacct show greendtest."""
    cfg = rest_config(user_work, tb)
    script = job_script(user_work, "rest-national",
                        "#SBATCH -c 8\n#SBATCH -t 10\n#SBATCH -A proj-green\nid -un > whoami.txt")
    shutil.chown(script, TEST_USER, TEST_USER)
    # --dry-run names the request it would make, and makes none
    p = greend_as_user(user_work, cfg, "submit", "--dry-run", script,
                       env={"SLURM_JWT": token_for(tb, TEST_USER)})
    assert p.returncode == 0, p.stderr + p.stdout
    assert f"would POST {REST_URL}/slurm/v0.0.38/job/submit with $SLURM_JWT" in p.stdout, p.stdout
    assert not any(j["name"] == "rest-national" and j["job_state"] in ("PENDING", "RUNNING")
                   for j in tb.jobs("national"))
    p = greend_as_user(user_work, cfg, "submit", "--json", script,
                       env={"SLURM_JWT": token_for(tb, TEST_USER)})
    assert p.returncode == 0, p.stderr + p.stdout
    out = json.loads(p.stdout)
    sub, d = out["submission"], out["decision"]
    assert sub["outcome"] == "submitted" and sub["cluster"] == "national", sub
    assert sub["command"][0] == "POST" and sub["command"][1].startswith(REST_URL)
    assert d["transport"]["transport"] == "rest"
    assert REST_URL in d["transport"]["why"] and "own token" in d["transport"]["why"]
    # national's live state came from its slurmrestd with the same token: its one 8-CPU node
    national = next(c for c in d["candidates"] if c["cluster"] == "national")
    assert national["state"]["ok"] is True and national["state"]["total_cpus"] == 8, national
    assert national["transport"]["transport"] == "rest"
    job = tb.wait_state("national", sub["job_id"], "RUNNING", timeout=30)
    assert job["user_name"] == TEST_USER
    assert job["name"] == "rest-national" and job["cpus"] == 8
    assert sub["token"] in job["comment"]
    assert wait_text(user_work / "whoami.txt", 20) == TEST_USER
    tb.run("national", "scancel", str(sub["job_id"]))
    # Accounting records the job as the token's user.
    acct = accounted_user(tb, "national", sub["job_id"], "rest-national")
    assert f"rest-national|{TEST_USER}" in acct, acct


def test_array_job_goes_through_slurmrestd(tb, user_work, clean):
    """An array job (#SBATCH --array=0-2%2) routed to national is submitted through slurmrestd's
    v0.0.38 `array` field: three tasks of one array, throttle 2, all the test user's, and the
    running task's own `id -un` is that user."""
    cfg = rest_config(user_work, tb)
    script = job_script(user_work, "rest-array",
                        "#SBATCH -c 8\n#SBATCH -t 10\n#SBATCH -A proj-green\n#SBATCH --array=0-2%2\n"
                        "id -un > whoami-$SLURM_ARRAY_TASK_ID.txt")
    shutil.chown(script, TEST_USER, TEST_USER)
    p = greend_as_user(user_work, cfg, "submit", "--json", script,
                       env={"SLURM_JWT": token_for(tb, TEST_USER)})
    assert p.returncode == 0, p.stderr + p.stdout
    out = json.loads(p.stdout)
    sub = out["submission"]
    assert sub["outcome"] == "submitted" and sub["cluster"] == "national", sub
    assert out["decision"]["request"]["array"] == "0-2%2"
    assert out["decision"]["request"]["array_tasks"] == 3
    job_id = int(sub["job_id"])
    # One 8-CPU task runs at a time on national's 8 CPUs: task 0 runs, and squeue shows the rest as
    # the array's one pending record "1-2%2" (the throttle came through).
    deadline = time.monotonic() + 30
    while True:
        tasks = {(t.get("array_task_id"), t.get("array_task_string") or "", t["job_state"]): t
                 for t in tb.jobs("national") if t.get("array_job_id") == job_id}
        if (0, "", "RUNNING") in tasks or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert set(tasks) == {(0, "", "RUNNING"), (None, "1-2%2", "PENDING")}, tasks
    assert all(t["user_name"] == TEST_USER and t["name"] == "rest-array" for t in tasks.values())
    assert wait_text(user_work / "whoami-0.txt", 30) == TEST_USER
    tb.run("national", "scancel", str(job_id))


def test_rest_without_a_token_is_a_clear_error(tb, user_work, clean):
    cfg = rest_config(user_work, tb, token_file=user_work / "missing-token")
    script = job_script(user_work, "rest-notoken", "#SBATCH -c 8\n#SBATCH -t 10\n#SBATCH -A proj-green")
    p = greend_as_user(user_work, cfg, "submit", "--json", script)
    assert p.returncode == 1, p.stderr + p.stdout
    assert "Traceback" not in p.stderr
    out = json.loads(p.stdout)
    sub = out["submission"]
    # Without the user's token greend cannot even read national's queue: it is not reachable, and
    # the decision says why (the file it looked for).
    assert sub["outcome"] == "no_cluster", sub
    national = next(c for c in out["decision"]["candidates"] if c["cluster"] == "national")
    assert national["state"]["ok"] is False
    assert f"token_file {user_work / 'missing-token'}: cannot read the token" in national["state"]["error"]
    assert "cannot read the token" in sub["message"]
    assert not [j for j in tb.jobs("national") if j["name"] == "rest-notoken"]


@pytest.mark.parametrize("slurm, expected", [
    ({"transport": "rest"}, "needs rest_url"),
    ({"transport": "rest", "rest_url": "127.0.0.1:6820"}, "http:// or https://"),
    ({"rest_url": "http://x:6820"}, "rest_url is only used with transport"),
    ({"transport": "multi-cluster", "cluster_name": "a b"}, "cluster_name 'a b'"),
    ({"transport": "ssh"}, "needs ssh_host"),
    ({"transport": "ssh", "ssh_host": "-oProxyCommand=x"}, "ssh_host '-oProxyCommand=x'"),
    ({"transport": "ssh", "ssh_host": "h", "ssh_user": "a b"}, "ssh_user 'a b'"),
    ({"transport": "ssh", "ssh_host": "h", "ssh_port": 0}, "ssh_port"),
    ({"transport": "ssh", "ssh_host": "h", "ssh_options": ["IdentityFile"]}, "ssh_options entry"),
    ({"transport": "ssh", "ssh_host": "h", "conf": "/etc/slurm/slurm.conf"}, "conf is not used with"),
    ({"ssh_host": "h"}, "ssh_host is only used with transport = \"ssh\""),
    ({"transport": "rest", "rest_url": "http://x", "ssh_options": ["Port=2"]}, "ssh_options is only used"),
])
def test_transport_settings_are_checked(tmp_path, slurm, expected):
    from pydantic import ValidationError

    from greend.policy_config import SlurmAccess

    with pytest.raises(ValidationError) as e:
        SlurmAccess(**slurm)
    assert expected in str(e.value)


# -- data to stage (the decision's `stage`) -------------------------------------------------------
def test_national_job_names_the_data_to_stage(tb, work, clean):
    """An 8-CPU job (only national fits) with data on site's Lustre: the decision names the store,
    where it lives and where it goes, in JSON, the summary and `greend route`'s text."""
    cfg = write_config(work, tb, name="stage.toml")
    p = greend(work, cfg, "route", "--json", "-c", "8", "-t", "10", "-A", "proj-green",
               "--data", "site-lustre,archive-s3")
    assert p.returncode == 0, p.stderr + p.stdout
    d = json.loads(p.stdout)
    assert d["cluster"] == "national"
    assert d["stage"] == [{"store": "site-lustre", "from": ["site"], "to": "national"},
                          {"store": "archive-s3", "from": [], "to": "national"}]
    assert "data to stage first: site-lustre (on site, not on national)" in d["summary"]
    text = greend(work, cfg, "route", "-c", "8", "-t", "10", "-A", "proj-green",
                  "--data", "site-lustre").stdout
    assert "stage first: data store site-lustre (from site) to national: national does not have it" in text


def test_nothing_to_stage_where_the_data_is(tb, work, clean):
    """The same data with a job that fits site: site holds site-lustre, so nothing is staged; a job
    without --data stages nothing either."""
    cfg = write_config(work, tb, name="stage.toml")
    p = greend(work, cfg, "route", "--json", "-c", "2", "-t", "10", "-A", "proj-green",
               "--data", "site-lustre")
    d = json.loads(p.stdout)
    assert d["cluster"] == "site" and d["stage"] == [], d["stage"]
    assert "stage" not in d["summary"]
    p = greend(work, cfg, "route", "--json", "-c", "8", "-t", "10", "-A", "proj-green")
    d = json.loads(p.stdout)
    assert d["cluster"] == "national" and d["stage"] == []
    assert "stage first" not in greend(work, cfg, "route", "-c", "8", "-t", "10", "-A", "proj-green").stdout


STORES = ["lustre-a", "lustre-b", "hds-vault", "s3"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stage_is_what_the_chosen_cluster_lacks_and_hds_stays_certified(data):
    """Any configuration, state and request (the policy property tests' own strategies) with data
    stores on clusters and jobs: the decision stages exactly what the chosen cluster lacks, says
    where each store lives, and health data is only ever staged to an HDS-certified cluster."""
    raw = data.draw(props.config())
    for c in raw["clusters"].values():
        c["data_stores"] = data.draw(st.lists(st.sampled_from(STORES), unique=True))
    site = compile_site(config_mod.parse(raw))
    states = {c.name: s for c in site.clusters if (s := props.state_for(data.draw, c.name)) is not None}
    r = data.draw(props.request())
    r.data_stores = tuple(data.draw(st.lists(st.sampled_from(STORES), unique=True)))
    d = Engine(site).decide(r, now=props.NOW, states=states)
    out = d.to_dict()
    if d.plan is None or d.plan.refused:
        assert out["stage"] == []
        return
    chosen = site.by_name[d.cluster]
    assert [s["store"] for s in out["stage"]] == [s for s in r.data_stores if s not in chosen.data_stores]
    for s in out["stage"]:
        assert s["to"] == d.cluster
        assert s["from"] == [c.name for c in site.clusters if s["store"] in c.data_stores]
        assert s["store"] in out["summary"]
    if r.data_class == "hds":
        assert chosen.hds and all(site.by_name[s["to"]].hds for s in out["stage"])
