"""greend.track inside a real Slurm job on the testbed: a real `greend run` as node site-n1 of
cluster site, the researcher's script submitted with sbatch as greendtest. Each phase boundary
asks the daemon over its unix socket; the job's API record carries the phases, which sum to the
job's books over their span."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from daemonproc import SITE_PACKAGES, Greend, _require_importable_by, wait_for
from test_track import check_schema

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

JOB = """#!/bin/bash
export GREEND_SOCKET={sock}
/usr/bin/python3 - > {out} <<'PY'
import json, os, site, sys, time
site.addsitedir({site!r})
import greend

def busy(s):
    t = time.process_time()
    while time.process_time() - t < s:
        pass

run = greend.track("slurm-tracked", project="imaging")
run.start()
time.sleep(3.0)  # quiet around the span's ends, longer than a tick and a checkpoint
run.phase("load")
time.sleep(3.0)
for i in range(3):
    run.phase(f"epoch {{i}}")
    busy(1.0)
run.phase("eval")
busy(0.5)
time.sleep(3.0)
fp = run.stop()
time.sleep(1.0)
print(json.dumps({{"source": fp.source, "degraded": fp.degraded, "it": fp.it_energy_j,
                  "first": run.phases[0].start_books.it_j,
                  "job": fp.job, "env": [os.environ.get("SLURM_JOB_ID"),
                                         os.environ.get("SLURM_CLUSTER_NAME")],
                  "record": fp.to_dict(),
                  "phases": [[p.name, p.footprint.it_energy_j, p.footprint.start, p.footprint.end]
                             for p in run.phases]}}))
PY
"""


@pytest.fixture(scope="module")
def tb():
    if os.geteuid() != 0:
        pytest.skip("the Slurm testbed needs root")
    from slurmbed import ensure_testbed

    return ensure_testbed()


@pytest.fixture
def public():
    d = Path(tempfile.mkdtemp(prefix="greend-track-", dir="/tmp"))
    os.chmod(d, 0o1777)  # the job's user reaches the socket and writes its output here
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_phases_of_a_slurm_job_through_the_daemon(tb, tmp_path, public):
    _require_importable_by("greendtest")
    if tb.uses_cgroups("site"):
        cg = Path("/sys/fs/cgroup/cpuacct/slurm_site-n1")
        if not cg.is_dir():  # slurmd creates its cgroup tree with its first job
            tb.wait_state("site", tb.submit("site", "true", extra_args=["-w", "site-n1"]),
                          "COMPLETED", timeout=30)
    sock = public / "api.sock"
    g = Greend(tmp_path / "node", node="site-n1", interval_s=1.0, config={
        "cluster": "site",
        "attribution": {"jobs_from": "cgroup" if tb.uses_cgroups("site") else "procscan",
                        "idle_power": "unattributed"},
        "slurm": {"conf": str(tb.conf("site")), "timeout_s": 5.0, "refresh_s": 2.0},
        "clusters": {"site": {"tier": "site"}},
    }, args=["--socket", str(sock)])
    out = public / "out.json"
    with g:
        g.start()
        wait_for(lambda: sock.exists(), 10, what="the API socket")
        job = tb.submit("site", JOB.format(sock=sock, out=out, site=SITE_PACKAGES),
                        extra_args=["-w", "site-n1", "-c", "1", "--job-name=tracked"])
        tb.wait_state("site", job, "COMPLETED", timeout=90)
        d = json.loads(out.read_text())
        assert d["env"] == [str(job), "site"]
        assert d["source"] == "daemon" and d["degraded"] == [], d
        assert (d["job"]["cluster"], d["job"]["job_id"], d["job"]["user"]) == ("site", str(job),
                                                                                "greendtest")
        check_schema(d["record"])
        names = [p[0] for p in d["phases"]]
        assert names == ["load", "epoch 0", "epoch 1", "epoch 2", "eval"]

        def record():
            code, body = g.get(f"/api/v1/jobs/site/{job}")
            if code != 200:
                return None
            rec = body["records"][0]
            ph = rec.get("phases", [])
            return rec if rec["job"]["state"] == "ended" and len(ph) == 5 and \
                all(p["end"] is not None for p in ph) else None

        rec = wait_for(record, 60, what="the job's ended record with its five phases")
        assert "Traceback" not in g.log()
    check_schema(rec)
    stored = rec["phases"]
    assert [p["name"] for p in stored] == names
    for s, p in zip(stored, d["phases"], strict=True):  # the live figures were estimates
        assert (s["start"], s["end"]) == pytest.approx((p[2], p[3]), abs=1e-3)
    assert all(a["end"] == b["start"] for a, b in itertools.pairwise(stored)), stored  # contiguous
    # Each epoch burnt 1 s of CPU, eval half that: the daemon's books say so.
    epochs = [s["energy_j"]["it"] for s in stored[1:4]]
    assert min(epochs) > 0
    assert stored[4]["energy_j"]["it"] < max(epochs)
    # What is stored is settled from the daemon's readings around each boundary, so the phases
    # sum to the job's books over their span: its final books less those at the first boundary
    # (taken while the job slept, so exact) and the little the script spent after its stop.
    phases_j = sum(s["energy_j"]["it"] for s in stored)
    total = rec["energy_j"]["it"]
    span_j = total - d["first"]
    assert phases_j == pytest.approx(span_j, rel=0.02), (phases_j, span_j, total)
    assert phases_j <= span_j * (1 + 1e-9)
    assert sum(s["cpu_time_s"] for s in stored) <= rec["cpu_time_s"] + 1e-6
