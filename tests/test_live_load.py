"""Live load and queue of the clusters, for displays (TUI, /api/v1/clusters), from real Slurm."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from daemonproc import GREEND, free_port, get_json, wait_for
from greend.policies.state import live_load

from greend import config

EXAMPLE = Path(__file__).parent.parent / "examples" / "testbed.toml"


def test_embedded_default_asks_no_controller():
    # A machine without a routing configuration never calls Slurm from a display.
    assert live_load(config.Config()) == {}


@pytest.mark.slurm
def test_load_and_queue_of_the_testbed_through_the_api(tmp_path):
    from slurmbed import ensure_testbed

    bed = ensure_testbed()
    bed.cancel_all()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    # Two 4-CPU jobs on site: its two nodes are fully allocated; a third one waits.
    ids = [bed.submit("site", "#!/bin/sh\nsleep 60\n", extra_args=("-c", "4")) for _ in range(3)]
    try:
        bed.wait_state("site", ids[0], "RUNNING", timeout=30)
        bed.wait_state("site", ids[1], "RUNNING", timeout=30)
        cfg = config.load(EXAMPLE)
        os.environ["XDG_CACHE_HOME"] = env["XDG_CACHE_HOME"]
        try:
            live = live_load(cfg, EXAMPLE, max_age_s=0)
        finally:
            del os.environ["XDG_CACHE_HOME"]
        assert live["site"]["ok"] and live["site"]["total_cpus"] == 8
        assert live["site"]["load"] == pytest.approx(1.0)
        assert live["site"]["pending"] == 1 and live["site"]["running"] == 2
        assert live["national"]["ok"] and live["national"]["load"] == 0.0

        port = free_port()
        daemon = subprocess.Popen(
            [GREEND, "-c", str(EXAMPLE), "--state-dir", str(tmp_path / "state"), "run",
             "--listen", f"127.0.0.1:{port}", "--socket", ""],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: get_json(port, "/healthz")[0] == 200, what="greend run answering")
            status, body = get_json(port, "/api/v1/clusters")
            assert status == 200
            site = body["clusters"]["site"]
            assert site["load"] == pytest.approx(1.0) and site["queue"] == 1
            assert body["clusters"]["national"]["queue"] == 0
        finally:
            daemon.terminate()
            assert daemon.wait(30) == 0, daemon.stderr.read().decode(errors="replace")
    finally:
        bed.cancel_all()


def test_api_summary_says_where_each_project_stands_in_its_budget(tmp_path):
    import time

    from greend.ledger import JobRow, Ledger

    state = tmp_path / "state"
    led = Ledger(state / "ledger.sqlite")
    now = time.time()
    with led.transaction() as db:
        for i, (account, carbon) in enumerate((("proj-a", 300.0), ("proj-b", 20.0))):
            led.upsert_job(db, JobRow(cluster="local", job_id=str(100 + i), node="n1", kind="slurm",
                                      state="ended", first_seen=now - 600, last_seen=now - 60,
                                      account=account, carbon_g=carbon, cpu_uj=10**9))
    led.close()
    cfg = tmp_path / "greend.toml"
    cfg.write_text('[[policy.budgets]]\naccount = "proj-a"\nperiod = "month"\ncarbon_kg = 0.2\n'
                   '[[policy.budgets]]\naccount = "proj-b"\nperiod = "month"\ncarbon_kg = 0\n')
    port = free_port()
    daemon = subprocess.Popen([GREEND, "-c", str(cfg), "--state-dir", str(state), "run",
                               "--listen", f"127.0.0.1:{port}", "--socket", ""],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: get_json(port, "/healthz")[0] == 200, what="greend run answering")
        status, body = get_json(port, "/api/v1/summary?by=account")
        assert status == 200
        rows = {r["key"]: r for r in body["rows"]}
        a = rows["proj-a"]["budget"]
        assert a["ratio"]["carbon"] == pytest.approx(1.5) and a["exceeded"]
        assert a["label"] == "0.2 kgCO2e per month"
        # A zero budget that was used: exceeded, and still valid JSON (no Infinity).
        b = rows["proj-b"]["budget"]
        assert b["ratio"]["carbon"] is None and b["exceeded"]
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0, daemon.stderr.read().decode(errors="replace")
