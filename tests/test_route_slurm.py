"""examples/cli_filter.lua on the real Slurm testbed: a plain `sbatch` by the unprivileged test user
asks the root greend daemon (POST /api/v1/route on its unix socket) and lands where the engine says;
with the daemon stopped, or too slow, the job is still submitted, with a note (fail open)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import pytest
from daemonproc import Greend
from slurmbed import TEST_USER
from test_policies import _toml
from test_policies_slurm import clean, job_script, tb, work, write_config  # noqa: F401 (fixtures)
from test_route_api import curl

pytestmark = pytest.mark.slurm
LUA = Path(__file__).resolve().parent.parent / "examples" / "cli_filter.lua"


def node_config(work: Path, tb) -> str:  # noqa: F811
    """The testbed policy (live Slurm state) for a node daemon whose ledger is the history."""
    data = tomllib.loads(write_config(work, tb, name="route.toml").read_text())
    data["policy"].pop("ledger", None)
    data["policy"]["state_max_age_s"] = 5
    data.update({"node": "login1", "sampling": {"interval_s": 0.5, "checkpoint_interval_s": 1.0},
                 "attribution": {"jobs_from": "procscan"}, "power": {"rapl": False},
                 "daemon": {"route_warm": True}})
    return _toml(data)


def start_daemon(work: Path, tb, name: str) -> Greend:  # noqa: F811
    home = work / name
    g = Greend(home, args=["--socket", str(home / "api.sock")])
    g.write_config(node_config(work, tb))
    g.start()
    home.chmod(0o755)
    return g


@pytest.fixture(scope="module")
def confs(work, tb):  # noqa: F811
    """Each cluster's slurm.conf with the cli_filter, in a copy (the shared testbed is unchanged)."""
    out = {}
    for c in ("site", "national"):
        d = work / f"clif-{c}"
        d.mkdir(exist_ok=True)
        (d / "slurm.conf").write_text(tb.conf(c).read_text() + "\nCliFilterPlugins=cli_filter/lua\n")
        shutil.copy(LUA, d / "cli_filter.lua")
        out[c] = d / "slurm.conf"
    return out


def sbatch(work: Path, conf: Path, cluster: str, script: Path, sock: Path,  # noqa: F811
           mode: str = "enforce", timeout_s: str = "2") -> tuple[subprocess.CompletedProcess, float]:
    env = {"SLURM_CONF": str(conf), "GREEND_CLUSTER": cluster, "GREEND_SOCKET": str(sock),
           "GREEND_CLI_FILTER_MODE": mode, "GREEND_TIMEOUT_S": timeout_s}
    argv = ["runuser", "-u", TEST_USER, "--", "env", *(f"{k}={v}" for k, v in env.items()),
            shutil.which("sbatch") or "/usr/bin/sbatch", "--parsable", str(script)]
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=work, timeout=120)
    return p, time.monotonic() - t0


def job_id(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def test_plain_sbatch_lands_where_the_engine_says(tb, work, clean, confs):  # noqa: F811
    g = start_daemon(work, tb, "route-node")
    sock = g.home / "api.sock"
    try:
        hds = job_script(work, "gr-clif-hds", "#SBATCH -c 1\n#SBATCH -t 50\n#SBATCH -A proj-hds\n"
                         "#GREEND --data-class=hds")
        # What the engine says for this job, asked the same way as the filter does.
        status, out = curl(sock, json.dumps({"sbatch": {"cpus-per-task": 1, "time": "50",
                                                        "account": "proj-hds"},
                                             "script_text": hds.read_text()}), TEST_USER)
        assert status == 200, out
        plan = json.loads(out)["plan"]
        assert (plan["cluster"], plan["partition"]) == ("site", "batch")
        # On national (enforce) the #GREEND line, read by the filter as the user, sends it away.
        p, _ = sbatch(work, confs["national"], "national", hds, sock)
        assert p.returncode != 0
        assert "belongs on site, not national" in p.stderr and "greend submit" in p.stderr
        # On site it is accepted and lands in greend's partition, as the test user.
        p, _ = sbatch(work, confs["site"], "site", hds, sock)
        job = tb.job("site", job_id(p))
        assert job["partition"] == plan["partition"]  # debug is the default: set by greend
        assert job["user_name"] == TEST_USER
        assert "greend: -> site/batch" in p.stderr
        # advise: the job goes where it was asked, with the note.
        p, _ = sbatch(work, confs["national"], "national", hds, sock, mode="advise")
        assert tb.job("national", job_id(p)) is not None
        assert "belongs on site, not national" in p.stderr
    finally:
        g.stop()
    # The daemon stopped: the job is still submitted, as asked, with a note.
    small = job_script(work, "gr-clif-down", "#SBATCH -c 1\n#SBATCH -t 10\n#SBATCH -A proj-green")
    p, _ = sbatch(work, confs["site"], "site", small, sock)
    job = tb.job("site", job_id(p))
    assert job["partition"] == "debug"
    assert "did not answer" in p.stderr and "submitted as asked" in p.stderr


def test_a_slow_daemon_costs_at_most_the_timeout(tb, work, clean, confs):  # noqa: F811
    """A socket that accepts and never answers: sbatch goes on after GREEND_TIMEOUT_S."""
    d = work / "slow"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    path = d / "api.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o777)
    srv.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        script = job_script(work, "gr-clif-slow", "#SBATCH -c 1\n#SBATCH -t 10\n#SBATCH -A proj-green")
        baseline_p, baseline = sbatch(work, confs["site"], "site", script, work / "nobody.sock")
        job_id(baseline_p)
        p, took = sbatch(work, confs["site"], "site", script, path, timeout_s="0.5")
        assert tb.job("site", job_id(p)) is not None
        assert "did not answer within 0.5 s" in p.stderr
        assert took >= baseline + 0.4 and took < baseline + 3.0, (took, baseline)
        assert held, "the filter never connected"
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()
        os.unlink(path)
