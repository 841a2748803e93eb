"""Routing decisions reach the node daemon, the controller, the job records and /metrics."""

from __future__ import annotations

import sqlite3

from greend.ledger import MIGRATIONS, Ledger


def test_migration_3_on_a_ledger_where_submit_created_the_decisions_table(tmp_path):
    path = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(path)
    for i, migration in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(migration)
        db.execute(f"PRAGMA user_version = {i}")
    db.executescript(MIGRATIONS[2])  # the table as an earlier `greend submit` created it
    db.execute("INSERT INTO decisions (token, t, user, uid, outcome, decision) "
               "VALUES ('x', 1, 'u', 1, 'pending', '{}')")
    db.commit()
    db.close()
    led = Ledger(path)
    assert led.schema_version == len(MIGRATIONS) == 4
    assert led.db.execute("SELECT token FROM decisions").fetchall()[0][0] == "x"
    led.close()
    fresh = Ledger(tmp_path / "fresh.sqlite")
    cols = [r[1] for r in fresh.db.execute("PRAGMA table_info(decisions)")]
    assert cols[:3] == ["id", "token", "t"] and cols[-1] == "decision"
    fresh.close()


# -- over real daemons ------------------------------------------------------------------------------
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pwd  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from daemonproc import Greend, metric_value, request, token_file  # noqa: E402
from test_policies import _toml, fake_slurm, run_greend, script, site_data  # noqa: E402

from greend import decisions  # noqa: E402

ROOT = os.geteuid() == 0
ME = pwd.getpwuid(os.getuid())


def unix(sock: Path, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("localhost", timeout=10)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(sock))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def decision(token: str = "greend-abc", user: str = ME.pw_name, uid: int = ME.pw_uid, **over) -> dict:
    d = {"token": token, "t": time.time(), "user": user, "uid": uid, "outcome": "submitted",
         "cluster": "site", "tier": "site", "partition": "batch", "job_id": "4242", "account": "proj-green",
         "job_name": "job.sh", "tried": [{"cluster": "site", "result": "job 4242"}],
         "decision": {"outcome": "route", "cluster": "site", "candidates": []}}
    d.update(over)
    return d


def post(sock: Path, obj, raw: bytes | None = None) -> tuple[int, dict]:
    body = raw if raw is not None else json.dumps(obj).encode()
    return unix(sock, "POST", decisions.DECISIONS_PATH, body, {"Content-Type": "application/json"})


def node_config(tmp_path: Path, sock: Path, **policy) -> dict:
    data = site_data(policy={"live_state": False, **policy})
    data["clusters"]["site"]["slurm"] = {"bin_dir": str(fake_slurm(tmp_path, "site", "ok"))}
    data.update({"node": "n1", "daemon": {"socket": str(sock), "private_jobs": False},
                 "sampling": {"interval_s": 0.5, "checkpoint_interval_s": 1.0},
                 "attribution": {"jobs_from": "procscan"}, "power": {"rapl": False}})
    return data


def daemon(tmp_path: Path, data: dict) -> Greend:
    g = Greend(tmp_path / "node", args=[])
    g.write_config(_toml(data))
    return g.start()


def test_post_decisions_identity_idempotency_and_errors(tmp_path):
    sockdir = Path(tempfile.mkdtemp(prefix="greend-sock-", dir="/tmp"))
    os.chmod(sockdir, 0o755)
    sock = sockdir / "api.sock"
    try:
        with daemon(tmp_path, node_config(tmp_path, sock)) as g:
            st, first = post(sock, decision())
            assert st == 200, first
            st, again = post(sock, decision())
            assert (st, again["id"]) == (200, first["id"])  # idempotent by token
            assert len(g.rows("SELECT * FROM decisions")) == 1
            # a later report of the same decision (its final outcome) updates it
            assert post(sock, decision(outcome="failed"))[0] == 200
            assert [r["outcome"] for r in g.rows("SELECT outcome FROM decisions")] == ["failed"]
            # malformed
            assert post(sock, None, raw=b"{not json")[0] == 400
            assert post(sock, None, raw=b"")[0] == 400
            assert post(sock, [1, 2])[0] == 400
            st, err = post(sock, {k: v for k, v in decision().items() if k != "token"})
            assert st == 400 and "token: missing" in err["error"]
            assert post(sock, decision(t="yesterday"))[0] == 400
            assert post(sock, decision(outcome="maybe"))[0] == 400
            assert post(sock, decision(extra=1))[0] == 400
            plain = {"Content-Type": "text/plain"}
            assert unix(sock, "POST", decisions.DECISIONS_PATH, b"{}", plain)[0] == 415
            assert unix(sock, "GET", decisions.DECISIONS_PATH)[0] == 405
            # TCP callers have no identity
            st, _, body = request(g.port, "POST", decisions.DECISIONS_PATH, json.dumps(decision()).encode(),
                                  {"Content-Type": "application/json"})
            assert st == 403 and b"unix socket" in body
            if ROOT:  # root is an admin: it may record anyone's decision, not take another's token
                assert post(sock, decision(token="greend-other", user="alice", uid=1234))[0] == 200
                assert post(sock, decision(token="greend-other", user="bob", uid=1235))[0] == 409
            if ROOT and shutil.which("runuser") and _has_user("greendtest"):
                pw = pwd.getpwnam("greendtest")
                assert _post_as("greendtest", sock, decision(token="greend-t1", user="root", uid=0)) == 403
                assert _post_as("greendtest", sock, decision(token="greend-t2", user="greendtest",
                                                             uid=pw.pw_uid)) == 200
                assert _post_as("greendtest", sock, decision(token="greend-t3", user="greendtest",
                                                             uid=0)) == 403
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _post_as(user: str, sock: Path, obj: dict) -> int:
    prog = ("import http.client, json, socket, sys\n"
            "c = http.client.HTTPConnection('localhost', timeout=10)\n"
            "c.sock = socket.socket(socket.AF_UNIX); c.sock.connect(sys.argv[1])\n"
            "c.request('POST', '/api/v1/decisions', body=sys.argv[2], "
            "headers={'Content-Type': 'application/json'})\n"
            "print(c.getresponse().status)\n")
    out = subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", prog, str(sock),
                          json.dumps(obj)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_submit_reports_to_the_daemon_and_decisions_show_in_api_and_metrics(tmp_path):
    sock = tmp_path / "api.sock"
    data = node_config(tmp_path, sock, budgets=[{"account": "proj-green", "energy_kwh": 10.0,
                                                 "carbon_kg": 2.0}])
    cfg = tmp_path / "greend.toml"
    cfg.write_text(_toml(data))
    job = script(tmp_path, "#SBATCH -t 1:00:00\n#SBATCH -A proj-green\n")
    # no daemon: the decision stays in the user's own ledger, and the output says so
    r = run_greend("-c", cfg, "--state-dir", tmp_path / "user", "submit", job, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"recorded in {tmp_path / 'user' / 'ledger.sqlite'} (no greend daemon took it" in r.stdout
    with daemon(tmp_path, data) as g:
        r = run_greend("-c", cfg, "--state-dir", tmp_path / "user", "submit", job, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"recorded by greend on this node (unix:{sock})" in r.stdout
        assert r.stdout.count("greend: decision ") == 1
        rows = g.rows("SELECT outcome, cluster, tier, job_id, user, decision FROM decisions")
        assert [tuple(x)[:5] for x in rows] == [("submitted", "site", "site", "4242", ME.pw_name)]
        assert json.loads(rows[0]["decision"])["cluster"] == "site"
        r = run_greend("-c", cfg, "--state-dir", tmp_path / "user", "submit", "--json", job, cwd=tmp_path)
        assert json.loads(r.stdout)["recorded"]["daemon"] == f"unix:{sock}"
        text = g.metrics()
        assert metric_value(text, "greend_route_decisions_total", cluster="site", tier="site",
                            outcome="submitted") == 2
        assert metric_value(text, "greend_route_overflow_total") == 0
        assert metric_value(text, "greend_budget_used_ratio", account="proj-green", resource="energy") == 0
        # a job of the account (1 kWh facility, 0.5 kg) and an overflowed decision
        now = time.time()
        db = sqlite3.connect(g.ledger_path)
        db.execute("INSERT INTO jobs (cluster, job_id, node, kind, account, user, state, first_seen, "
                   "last_seen, facility_j, carbon_g) VALUES ('site', '4242', 'n1', 'slurm', 'proj-green', ?, "
                   "'ended', ?, ?, 3.6e6, 500)", (ME.pw_name, now - 60, now))
        db.commit()
        db.close()
        over = decision(token="greend-over", cluster="national", tier="national", job_id="99",
                        decision={"candidates": [{"cluster": "site", "tier": "site",
                                                  "rejected_by": "overflow", "held_by": []},
                                                 {"cluster": "national", "tier": "national",
                                                  "rejected_by": None, "held_by": []}]})
        relaxed = decision(token="greend-relaxed", job_id="98",
                           decision={"candidates": [{"cluster": "site", "tier": "site", "rejected_by": None,
                                                     "held_by": ["overflow"]}]})
        assert post(sock, over)[0] == 200 and post(sock, relaxed)[0] == 200
        text = g.metrics()
        assert metric_value(text, "greend_route_overflow_total") == 1
        assert metric_value(text, "greend_route_decisions_total", cluster="national", tier="national",
                            outcome="submitted") == 1
        assert metric_value(text, "greend_budget_used_ratio", account="proj-green",
                            resource="energy") == pytest.approx(0.1)
        assert metric_value(text, "greend_budget_used_ratio", account="proj-green",
                            resource="carbon") == pytest.approx(0.25)
        assert metric_value(text, "greend_budget_used_ratio", account="proj-green", resource="water") is None
        st, d = unix(sock, "GET", "/api/v1/jobs/site/4242")
        assert st == 200, d
        assert d["records"][0]["decision"]["outcome"] == "submitted"
        assert d["records"][0]["decision"]["decision"]["cluster"] == "site"
        assert d["records"][0]["decision"]["tried"] == [{"cluster": "site", "result": "job 4242"}]


def test_controller_takes_decisions_with_the_site_token(tmp_path):
    tok = token_file(tmp_path / "token", "s3cret-token-for-tests")
    with Greend(tmp_path / "ctl", command="controller",
                args=["--socket", "", "--token-file", str(tok)]).start() as ctl:
        body = json.dumps(decision()).encode()
        h = {"Content-Type": "application/json"}
        assert request(ctl.port, "POST", decisions.DECISIONS_PATH, body, h)[0] == 401
        auth = {**h, "Authorization": "Bearer s3cret-token-for-tests"}
        assert request(ctl.port, "POST", decisions.DECISIONS_PATH, body, auth)[0] == 200
        assert request(ctl.port, "POST", decisions.DECISIONS_PATH, body, auth)[0] == 200
        assert request(ctl.port, "POST", decisions.DECISIONS_PATH, b"{}", auth)[0] == 400
        assert len(ctl.rows("SELECT * FROM decisions")) == 1
        assert metric_value(ctl.metrics(), "greend_route_decisions_total", cluster="site",
                            outcome="submitted") == 1


def test_site_mode_forwards_decisions_to_the_controller(tmp_path):
    from daemonproc import wait_for

    tok = token_file(tmp_path / "token", "s3cret-token-for-tests")
    sock = tmp_path / "agent.sock"
    with Greend(tmp_path / "ctl", command="controller",
                args=["--socket", "", "--token-file", str(tok)]).start() as ctl:
        c = {"url": f"http://127.0.0.1:{ctl.port}", "token_file": str(tok), "send_interval_s": 0.5}
        with Greend(tmp_path / "n1", config={"controller": c},
                    args=["--socket", str(sock)]).start() as agent:
            assert post(sock, decision(cluster="local", tier="site"))[0] == 200
            wait_for(lambda: ctl.rows("SELECT * FROM decisions"), 30, what="the decision at the controller")
            row = ctl.rows("SELECT token, cluster, job_id, decision FROM decisions")[0]
            assert (row["token"], row["cluster"], row["job_id"]) == ("greend-abc", "local", "4242")
            assert json.loads(row["decision"])["cluster"] == "site"
            wait_for(lambda: not agent.rows("SELECT * FROM outbox WHERE kind = 'decision'"), 30,
                     what="the outbox emptied")
