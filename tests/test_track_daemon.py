"""greend.track through a real `greend run`: POST /api/v1/phases on the daemon's unix socket, as
the job's own unprivileged user (greendtest) and as another one (greendtest2). The daemon groups
processes into Slurm jobs by SLURM_JOB_ID (procscan), as tests/daemonproc.py's busy() does; the
same through the real Slurm testbed is in tests/test_track_slurm.py."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from daemonproc import (
    SITE_PACKAGES,
    Greend,
    _require_importable_by,
    busy,
    job_id,
    request,
    stop,
    wait_for,
)
from test_security import as_user, needs_root, public_dir, raw_request, strict_json, users  # noqa: F401
from test_track import check_schema

pytestmark = [needs_root]

# A researcher's script, run as greendtest inside "Slurm job" $SLURM_JOB_ID.
SCRIPT = f"""
import json, site, sys, time
site.addsitedir({SITE_PACKAGES!r})
import greend

def busy(s):
    t = time.process_time()
    while time.process_time() - t < s:
        pass

with greend.track("tracked", project="imaging") as run:
    # Quiet around the span's ends, longer than a tick and a checkpoint (the daemon's readings):
    # the books settled there are the job's books at that instant, whatever the interpolation.
    time.sleep(2.0)
    one = run.phase("one")
    time.sleep(2.0)
    busy(1.0)
    two = run.phase("two")
    busy(1.5)
    time.sleep(2.0)
fp = run.footprint
time.sleep(1.0)
print(json.dumps({{"source": fp.source, "degraded": fp.degraded, "it": fp.it_energy_j,
                  "provenance": fp.provenance, "job": fp.job, "dict": fp.to_dict(),
                  "first": run.phases[0].start_books.it_j,
                  "phases": [[p.name, p.footprint.it_energy_j, p.footprint.carbon_g,
                              p.footprint.start, p.footprint.end] for p in run.phases]}}))
"""


@pytest.fixture
def node(users, public_dir, tmp_path):  # noqa: F811
    sock = public_dir / f"api-{time.time_ns()}.sock"
    # Idle power unattributed: a sleeping job's books stand still (SCRIPT sleeps around its span).
    g = Greend(tmp_path / "node", args=["--socket", str(sock)],
               config={"attribution": {"idle_power": "unattributed"}})
    g.sock = sock
    with g:
        g.start()
        wait_for(lambda: sock.exists(), 10, what="the API socket")
        yield g


def run_as(user: str, job: str, sock, code: str) -> subprocess.CompletedProcess:
    _require_importable_by(user)
    return subprocess.run(["runuser", "-u", user, "--", "env", f"SLURM_JOB_ID={job}",
                           "SLURM_CLUSTER_NAME=local", f"GREEND_SOCKET={sock}",
                           "/usr/bin/python3", "-c", code],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def post(**body) -> bytes:
    return raw_request("POST", "/api/v1/phases", json.dumps(body).encode(),
                       {"Content-Type": "application/json"})


def test_a_run_in_a_job_asks_the_daemon_and_the_job_record_carries_its_phases(node):
    job = job_id()
    r = run_as("greendtest", job, node.sock, SCRIPT)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["source"] == "daemon" and d["degraded"] == [], d
    assert (d["job"]["cluster"], d["job"]["job_id"], d["job"]["kind"]) == ("local", job, "slurm")
    assert d["job"]["user"] == "greendtest" and d["job"]["state"] == "running"
    names = [p[0] for p in d["phases"]]
    assert names == ["one", "two"]
    # Contiguous phases: they sum to the run's books from the first boundary to the stop.
    assert sum(p[1] for p in d["phases"]) == pytest.approx(d["it"], rel=0.02)
    assert d["phases"][1][3] == d["phases"][0][4]  # one boundary ended one and began two

    # The job's record (once its process has ended and the daemon has checkpointed) carries them.
    def record():
        code, body = node.get(f"/api/v1/jobs/local/{job}")
        if code != 200:
            return None
        rec = body["records"][0]
        return rec if rec["job"]["state"] == "ended" and len(rec.get("phases", [])) == 2 and \
            all(p["end"] is not None for p in rec["phases"]) else None

    rec = wait_for(record, 30, what="the job's record with its phases")
    check_schema(rec)
    check_schema(d["dict"])
    stored = rec["phases"]
    assert [p["name"] for p in stored] == names
    for s, p in zip(stored, d["phases"], strict=True):  # the live figures were estimates
        assert (s["start"], s["end"]) == pytest.approx((p[3], p[4]), abs=1e-3)
        assert s["energy_j"]["it"] > 0 and s["carbon_g"] > 0
    assert stored[0]["end"] == stored[1]["start"]  # contiguous
    # What is stored is settled from the daemon's readings around each boundary: the phases sum
    # to the job's books over their span, i.e. its final books less those at the first boundary
    # (taken while the job slept, so exact) and the little the script spent after its stop.
    total = rec["energy_j"]["it"]
    phases_j = sum(s["energy_j"]["it"] for s in stored)
    span_j = total - d["first"]
    assert phases_j == pytest.approx(span_j, rel=0.02), (phases_j, span_j, total)
    assert phases_j <= span_j * (1 + 1e-9)


# A phase that ends as the job's work stops: at that boundary the daemon's live answer
# extrapolates the last interval's (busy) power past the last reading.
BURST = f"""
import json, site, time
site.addsitedir({SITE_PACKAGES!r})
import greend

t = time.process_time()
with greend.track("burst") as run:
    time.sleep(1.5)
    run.phase("burst")
    t = time.process_time()
    while time.process_time() - t < 1.0:
        pass
time.sleep(1.0)
print(json.dumps({{"first": run.phases[0].start_books.it_j, "live": run.phases[0].footprint.it_energy_j}}))
"""


def test_a_phase_ending_with_the_work_is_stored_within_the_jobs_books(node):
    job = job_id()
    r = run_as("greendtest", job, node.sock, BURST)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)

    def record():
        code, body = node.get(f"/api/v1/jobs/local/{job}")
        rec = body["records"][0] if code == 200 else None
        return rec if rec and rec["job"]["state"] == "ended" and rec.get("phases") and \
            rec["phases"][0]["end"] is not None else None

    rec = wait_for(record, 30, what="the job's record with its phase")
    stored = rec["phases"][0]["energy_j"]["it"]
    span_j = rec["energy_j"]["it"] - d["first"]
    # Settled between the readings around the stop, the phase never exceeds the job's books
    # after its start (the live estimate may); it holds most of them.
    assert 0.3 * span_j <= stored <= span_j * (1 + 1e-9), (stored, span_j, d["live"])


def test_bad_phase_input_is_a_400_naming_the_field(node, public_dir):  # noqa: F811
    job = job_id()
    p = busy(job, user="greendtest")
    try:
        wait_for(lambda: node.job(job), 30, what="the job in the ledger")
        cases = [
            (raw_request("POST", "/api/v1/phases", b"{not json",
                         {"Content-Type": "application/json"}), "JSON"),
            (post(name="x"), "job_id"),
            (post(job_id="12;rm", name="x"), "job_id"),
            (post(job_id=job, name="x" * 201), "name"),
            (post(job_id=job, name=""), "name"),
            (post(job_id=job, name=["epoch"]), "name"),
            (post(job_id=job, name="a\x00b"), "name"),
            (post(job_id=job, name="x", t=time.time() + 3600), "t"),
            (post(job_id=job, name="x", t="now"), "t"),
            (post(job_id=job, end="yes"), "end"),
            (post(job_id=job, name="x", colour="red"), "colour"),
            (post(job_id=job, cluster=7, name="x"), "cluster"),
        ]
        answers = as_user("greendtest", node.sock, public_dir, [c[0] for c in cases])
        for (_, word), (code, body) in zip(cases, answers, strict=True):
            assert code == 400, (word, code, body)
            assert word in strict_json(body)["error"], (word, body)
        # And a good one, from the job's owner: the books at that instant.
        (code, body), = as_user("greendtest", node.sock, public_dir, [post(job_id=job, name="ok")])
        assert code == 200, body
        d = strict_json(body)
        assert d["phase"] == {"seq": 1, "name": "ok"} and d["books"]["it_energy_j"] >= 0
        assert isinstance(d["estimated"], bool)  # the live answer says whether it is an estimate
    finally:
        stop(p)
    assert "Traceback" not in node.log()


def test_another_users_job_is_refused(node, public_dir):  # noqa: F811
    theirs = job_id()
    p = busy(theirs, user="greendtest2")
    try:
        wait_for(lambda: node.job(theirs), 30, what="greendtest2's job in the ledger")
        (code, body), (code404, body404) = as_user(
            "greendtest", node.sock, public_dir,
            [post(job_id=theirs, name="steal"), post(job_id=job_id(), name="nobody's")])
        assert code == 403 and "not yours" in strict_json(body)["error"]
        assert code404 == 404 and "not running on this node" in strict_json(body404)["error"]
        # Over TCP nobody is known: refused whatever the job.
        status, _, tcp = request(
            node.port, "POST", "/api/v1/phases", json.dumps({"job_id": theirs, "name": "x"}).encode(),
            headers={"Content-Type": "application/json"})
        assert status == 403 and b"unix socket" in tcp
        # The owner may.
        (code, body), = as_user("greendtest2", node.sock, public_dir, [post(job_id=theirs, name="mine")])
        assert code == 200, body
    finally:
        stop(p)
