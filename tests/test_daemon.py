"""`greend run` as an admin runs it: real processes on loopback, real busy processes as Slurm jobs.

Covers crash recovery (kill -9), reload, bad input, disk trouble, cardinality of /metrics and
private_jobs over the unix socket; the in-process tests cover what needs a fault injected.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from daemonproc import (
    Greend,
    busy,
    cpu_time_ns,
    free_port,
    greend_argv,
    integrity,
    job_id,
    metric_value,
    request,
    stop,
    token_file,
    wait_for,
)

ROOT = os.geteuid() == 0


def has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def run_greend(*args: str, timeout: float = 30, user: str | None = None,
               env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [*greend_argv(user), *args]
    e = {k: v for k, v in os.environ.items() if not k.startswith("GREEND_")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**e, **(env or {})})


# -- crash recovery -------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill9_restart_attributes_the_cpu_time_used_while_down(tmp_path):
    job = job_id()
    g = Greend(tmp_path / "k9")
    g.start()
    p = busy(job)  # started after greend, which books a job's CPU time from its first process on
    try:
        with g:
            wait_for(lambda: (g.job(job) or {"cpu_time_ns": 0})["cpu_time_ns"] > 1.5e9, 60,
                     what="the busy job in the ledger")
            g.kill9()
            before = g.job(job)["cpu_time_ns"]
            down_start = cpu_time_ns(p.pid)
            time.sleep(4)  # the job keeps burning CPU while greend is down
            down_cpu = cpu_time_ns(p.pid) - down_start
            assert down_cpu > 1e9, "the busy process got no CPU while greend was down"
            g.start()
            time.sleep(2)
            assert g.stop() == 0, g.log()
            own = cpu_time_ns(p.pid)
    finally:
        stop(p)
    row = g.job(job)
    assert row["kind"] == "slurm" and row["state"] == "running"
    recorded = row["cpu_time_ns"]
    # Everything the job used is booked, including the seconds greend was dead for.
    assert recorded > before + 0.9 * down_cpu
    assert abs(recorded - own) <= 0.1 * own, (recorded, own)
    assert integrity(g.ledger_path) == "ok"
    assert row["cpu_uj"] > 0


# -- start-up errors ------------------------------------------------------------------------------
def test_port_in_use_is_a_clear_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_greend("--state-dir", str(tmp_path), "run", "--listen", f"127.0.0.1:{port}",
                       "--socket", "")
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "Address already in use" in r.stderr and "--listen" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_listen_address(tmp_path):
    r = run_greend("--state-dir", str(tmp_path), "run", "--listen", "nonsense", "--socket", "")
    assert r.returncode == 2 and "expected HOST:PORT" in r.stderr


@pytest.mark.parametrize("case", ["group_readable", "missing", "directory", "empty"])
def test_token_file_problems_stop_the_start(tmp_path, case):
    tok = tmp_path / "token"
    if case == "group_readable":
        token_file(tok, mode=0o640)
    elif case == "directory":
        tok.mkdir()
    elif case == "empty":
        token_file(tok, value="")
    g = Greend(tmp_path / "g", config={"controller": {"url": "http://127.0.0.1:9",
                                                      "token_file": str(tok)}})
    r = run_greend(*g.argv())
    assert r.returncode == 2, r.stderr
    msg = {"group_readable": "readable by group or others (mode 0640)", "missing": "no such file",
           "directory": "not a regular file", "empty": "empty"}[case]
    assert "controller.token_file" in r.stderr and msg in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not (ROOT and has_user("greendtest")), reason="needs root and user greendtest")
def test_unreadable_token_file(tmp_path):
    home = Path(tempfile.mkdtemp(prefix="greend-tok-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        tok = token_file(home / "token")  # root's, 0600: greendtest cannot read it
        g = Greend(home / "g", config={"controller": {"url": "http://127.0.0.1:9",
                                                      "token_file": str(tok)}})
        shutil.chown(g.home, "greendtest")
        os.chmod(g.config_path, 0o644)
        r = run_greend(*g.argv(), user="greendtest")
        assert r.returncode == 2, r.stderr
        assert f"controller.token_file {tok}: cannot read: Permission denied" in r.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.skipif(not (ROOT and has_user("greendtest")), reason="needs root and user greendtest")
def test_state_dir_not_writable_is_a_clear_message(tmp_path):
    home = Path(tempfile.mkdtemp(prefix="greend-ro-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        (home / "state").mkdir(mode=0o755)  # root's: greendtest may not write there
        r = run_greend("--state-dir", str(home / "state"), "run", "--listen",
                       f"127.0.0.1:{free_port()}", "--socket", "", user="greendtest")
        assert r.returncode == 2
        assert "state directory is not writable" in r.stderr and "--state-dir" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_once_prints_one_interval(tmp_path):
    g = Greend(tmp_path / "once", interval_s=0.3)
    r = run_greend("-c", str(g.config_path), "run", "--once", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["node"] == "n1" and d["cluster"] == "local"
    assert {x["domain"] for x in d["domains"]} >= {"cpu"}
    assert not (tmp_path / "once" / "state").exists()  # --once keeps no books


# -- reload ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sighup_reloads_and_refuses_a_bad_config(tmp_path):
    job = job_id()
    p = busy(job)
    try:
        with Greend(tmp_path / "hup") as g:
            g.start()
            me = pwd.getpwuid(os.getuid()).pw_name
            wait_for(lambda: metric_value(g.metrics(), "greend_job_running", job_id=job, user=me),
                     what="the job on /metrics, with its user")
            # A valid change is applied without a restart: user names leave the per-job series.
            g.cfg["daemon"] = {"user_label": False}
            g.write_config()
            g.signal(signal.SIGHUP)
            wait_for(lambda: all('user=""' in line for line in g.metrics().splitlines()
                                 if f'job_id="{job}"' in line), what="user label dropped")
            # An invalid file is refused: the daemon keeps running with the old config and says so.
            g.write_config('[sampling]\ninterval_s = "fast"\n')
            g.signal(signal.SIGHUP)
            wait_for(lambda: g.reasons("sampling.interval_s"), what="the reload error in /healthz")
            assert g.health()["status"] == "degraded"
            assert g.alive()
            # A change that needs a restart is refused too, and named.
            g.cfg["node"] = "other"
            g.write_config()
            g.signal(signal.SIGHUP)
            wait_for(lambda: any("need a restart" in r for r in g.health()["reasons"]))
            g.cfg["node"] = "n1"
            g.write_config()
            g.signal(signal.SIGHUP)
            wait_for(lambda: not g.reasons("reload"), what="ok again")
            assert g.health()["node"] == "n1"
            assert g.stop() == 0
    finally:
        stop(p)
    assert "Traceback" not in g.log()


# -- bad requests ---------------------------------------------------------------------------------
def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.slow
def test_malformed_and_oversized_requests_get_4xx_never_a_traceback(tmp_path):
    with Greend(tmp_path / "bad") as g:
        g.start()
        port = g.port
        cases = {
            "/api/v1/jobs?limit=abc": (400, "limit"),
            "/api/v1/jobs?limit=100000": (400, "limit"),
            "/api/v1/jobs?state=sleeping": (400, "state"),
            "/api/v1/jobs?since=yesterday": (400, "since"),
            "/api/v1/summary?by=colour": (400, "by"),
            "/api/v1/jobs/local": (404, "cluster"),
            "/api/v1/jobs/local/nope": (404, "no job"),
            "/api/v1/nothing": (404, "docs/api.md"),
            "/nothing": (404, "no such endpoint"),
            "/api/v1/jobs?" + "a=1&" * 200: (400, "query"),
            "/" + "x" * 9000: (414, "request target"),
        }
        for path, (status, word) in cases.items():
            st, headers, body = request(port, "GET", path)
            assert st == status, (path, st, body)
            assert headers["Content-Type"] == "application/json"
            assert word in json.loads(body)["error"], (path, body)
        st, _, body = request(port, "POST", "/metrics", body=b"{}")
        assert st == 405 and b"allowed: GET" in body
        st, _, body = request(port, "POST", "/api/v1/records", body=b"{}")
        assert st == 405  # a node takes no records: only a controller does
        st, _, body = request(port, "GET", "/api/v1/jobs",
                              headers={"Content-Length": str(1 << 30)})
        assert st == 413
        # Malformed at the HTTP level: a JSON answer and a closed connection, not a stack trace.
        for junk in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                     b"GET /healthz HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                     b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                     b"GET /healthz HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n",
                     b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64)):
            out = raw(port, junk)
            if out.startswith(b"HTTP/"):
                assert 400 <= int(out.split(b" ", 2)[1]) < 500, (junk[:30], out[:200])
                assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]
            else:  # not HTTP/1.x: the answer is a bare body, as HTTP/0.9 has no status line
                err = json.loads(out)["error"] if out else "400"
                # 505 HTTP Version Not Supported is the protocol's own answer to HTTP/9.9.
                assert err.startswith(("400", "505")), (junk[:30], out)
        st, _, body = request(port, "HEAD", "/healthz")
        assert st == 200 and body == b""
        assert g.alive() and not g.reasons("checkpoint")
        assert g.stop() == 0
    assert "Traceback" not in g.log()


# -- disk trouble ---------------------------------------------------------------------------------
def test_checkpoint_failure_keeps_the_books_in_memory_and_catches_up(tmp_path, monkeypatch):
    """A failing checkpoint (disk full, I/O error) is reported, the daemon keeps sampling, and the
    books reach the ledger once it works again."""
    from greend import config
    from greend.daemon import Daemon

    cfg = config.parse({"node": "n1", "state_dir": str(tmp_path), "daemon": {"socket": ""},
                        "attribution": {"jobs_from": "procscan"}, "power": {"rapl": False}})
    d = Daemon(cfg, listen="127.0.0.1:0", socket_path=None)
    try:
        d.sample()
        d.checkpoint()
        assert not [r for r in d.health()["reasons"] if "ledger" in r]
        real = d.monitor.ledger.transaction

        def full():
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(d.monitor.ledger, "transaction", full)
        time.sleep(0.2)
        d.sample()
        d.checkpoint()
        h = d.health()
        assert h["status"] == "degraded"
        assert any("ledger checkpoint failing" in r and "disk is full" in r for r in h["reasons"])
        assert d.checkpoint_errors == 1
        time.sleep(0.2)
        d.sample()
        t_last = d.monitor.prev.t
        monkeypatch.setattr(d.monitor.ledger, "transaction", real)
        d.checkpoint()
        assert not [r for r in d.health()["reasons"] if "ledger" in r]
        stored = d.ledger.counters("n1")
        assert stored[0] == t_last  # the books as of the last sample reached the ledger
    finally:
        d.monitor.close()
        d.ledger.close()
    assert integrity(tmp_path / "ledger.sqlite") == "ok"


@pytest.mark.slow
@pytest.mark.skipif(not ROOT, reason="mounts a small tmpfs: needs root")
def test_disk_full_then_space_again(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    job = job_id()
    p = busy(job)
    try:
        g = Greend(tmp_path / "df")
        g.state = mnt / "state"
        with g:
            g.start()
            wait_for(lambda: g.job(job), what="the job in the ledger")
            filler = mnt / "filler"
            # Unbuffered: a buffered file would raise ENOSPC again when closed, flushing the rest.
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
            wait_for(lambda: g.reasons("ledger checkpoint failing"), 30,
                     what="degraded on a full disk")
            assert g.health()["status"] == "degraded"
            assert g.alive()
            stuck = g.job(job)["cpu_time_ns"]
            time.sleep(1.5)
            assert g.alive() and request(g.port, "GET", "/metrics")[0] == 200
            filler.unlink()
            wait_for(lambda: not g.reasons("ledger checkpoint failing"), 30,
                     what="ok once there is space")
            wait_for(lambda: g.job(job)["cpu_time_ns"] > stuck + 1e9, 30,
                     what="the books catching up")
            assert g.stop() == 0
            assert integrity(g.ledger_path) == "ok"
        assert "Traceback" not in g.log()
    finally:
        stop(p)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- cardinality ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_finished_job_leaves_metrics_after_grace_but_stays_in_the_books(tmp_path):
    job = job_id()
    with Greend(tmp_path / "grace", config={"daemon": {"finished_job_grace_s": 3}}) as g:
        g.start()
        p = busy(job, seconds=1.5)
        try:
            wait_for(lambda: metric_value(g.metrics(), "greend_job_running", job_id=job) == 1.0,
                     what="job running on /metrics")
            p.wait(30)
            wait_for(lambda: metric_value(g.metrics(), "greend_job_running", job_id=job) == 0.0,
                     what="job ended, still on /metrics")
            cpu_s = metric_value(g.metrics(), "greend_job_cpu_seconds_total", job_id=job)
            assert cpu_s and cpu_s > 0.5
            wait_for(lambda: f'job_id="{job}"' not in g.metrics(), 20, what="job gone from /metrics")
        finally:
            stop(p)
        st, d = g.get(f"/api/v1/jobs/local/{job}")
        assert st == 200
        assert d["records"][0]["job"]["state"] == "ended"
        st, d = g.get("/api/v1/jobs?state=ended&limit=1000")
        assert any(j["job"]["job_id"] == job and j["cpu_time_s"] == pytest.approx(cpu_s, rel=0.01)
                   for j in d["jobs"])
        assert g.stop() == 0


# -- private jobs ---------------------------------------------------------------------------------
def curl_unix(sock: Path, path: str, user: str | None = None) -> tuple[int, dict]:
    argv = ["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(sock), f"http://greend{path}"]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout
    body, _, code = out.rpartition("\n")
    return int(code), json.loads(body)


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT and has_user("greendtest") and shutil.which("curl")),
                    reason="needs root, curl and user greendtest")
def test_private_jobs_over_the_unix_socket(tmp_path):
    sockdir = Path(tempfile.mkdtemp(prefix="greend-sock-", dir="/tmp"))
    os.chmod(sockdir, 0o755)
    sock = sockdir / "api.sock"
    mine, theirs = job_id(), job_id()
    g = Greend(tmp_path / "priv", config={"daemon": {"private_jobs": True}},
               args=["--socket", str(sock)])
    p_user = busy(mine, user="greendtest")
    p_root = busy(theirs)
    try:
        with g:
            g.start()
            wait_for(lambda: g.job(mine) and g.job(theirs), what="both jobs in the ledger")
            assert g.job(mine)["user"] == "greendtest"
            # greendtest sees their own job only.
            st, d = curl_unix(sock, "/api/v1/jobs?limit=1000", user="greendtest")
            assert st == 200
            users = {j["job"]["user"] for j in d["jobs"]}
            assert users == {"greendtest"}, users
            ids = {j["job"]["job_id"] for j in d["jobs"]}
            assert mine in ids and theirs not in ids
            assert curl_unix(sock, f"/api/v1/jobs/local/{theirs}", user="greendtest")[0] == 404
            assert curl_unix(sock, f"/api/v1/jobs/local/{mine}", user="greendtest")[0] == 200
            st, d = curl_unix(sock, "/api/v1/jobs?user=root", user="greendtest")
            assert st == 403 and "your own jobs" in d["error"]
            st, d = curl_unix(sock, "/api/v1/summary?by=user", user="greendtest")
            assert st == 200 and {r["key"] for r in d["rows"]} <= {"greendtest"}
            # root (an admin) sees everyone's.
            st, d = curl_unix(sock, "/api/v1/jobs?limit=1000")
            ids = {j["job"]["job_id"] for j in d["jobs"]}
            assert st == 200 and {mine, theirs} <= ids
            # Over TCP nobody is known: no job data, but health and metrics.
            st, d = g.get("/api/v1/jobs")
            assert st == 403 and str(sock) in d["error"]
            assert g.get("/healthz")[0] == 200
            assert g.stop() == 0
    finally:
        stop(p_user)
        stop(p_root)
        shutil.rmtree(sockdir, ignore_errors=True)


# -- /metrics -------------------------------------------------------------------------------------
def test_fast_exposition_matches_prometheus_client(tmp_path):
    """api.render_metrics writes what prometheus_client's generate_latest writes (same series and
    values), label values that need escaping included."""
    from greend.collectors.base import JobUsage
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from greend import api, config
    from greend.daemon import Daemon
    from greend.monitor import Monitor

    class Jobs:
        name = "fake"
        n = 0

        def read(self):
            self.n += 1
            return [JobUsage(f"slurm/local/{i}", "slurm", str(i), 0, self.n * 10**9 * (i + 1),
                             mem_bytes=1 << 30, alloc_cpus=1.0, cluster="local",
                             meta={"user": 'we"ird\\user\nname' if i == 0 else f"u{i}",
                                   "account": "a"}) for i in range(5)]

    cfg = config.parse({"node": "n1", "state_dir": str(tmp_path), "daemon": {"socket": ""},
                        "power": {"rapl": False}, "attribution": {"jobs_from": "procscan"}})
    d = Daemon(cfg, listen="127.0.0.1:0", socket_path=None)
    try:
        d.monitor.close()
        d.monitor = Monitor(cfg, d.ledger, jobs_source=Jobs(), energy_sources=[], resume=False)
        for _ in range(3):
            time.sleep(0.05)
            d.sample()
        a = api.Api(d)

        def series(text: bytes) -> dict:
            out = {}
            for fam in text_string_to_metric_families(text.decode()):
                if fam.name.startswith("process_") or fam.name == "greend_build":
                    continue
                for s in fam.samples:
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
            return out

        fast, ref = series(api.render_metrics(a.registry)), series(generate_latest(a.registry))
        assert fast.keys() == ref.keys()
        for k, v in ref.items():
            assert fast[k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
        assert any(dict(k[1]).get("user") == 'we"ird\\user\nname' for k in fast)
        if shutil.which("promtool"):
            r = subprocess.run(["promtool", "check", "metrics"], input=api.render_metrics(a.registry),
                               capture_output=True)
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        d.monitor.close()
        d.ledger.close()


def test_first_scrape_has_the_node_series(tmp_path):
    # A long sampling interval: only the baseline sample has been taken when /metrics is read.
    g = Greend(tmp_path / "g", interval_s=60.0, checkpoint_interval_s=60.0).start()
    try:
        text = g.metrics()
        assert metric_value(text, "greend_node_energy_joules_total", domain="cpu") == 0.0
        assert metric_value(text, "greend_node_unattributed_energy_joules_total", domain="cpu") == 0.0
    finally:
        assert g.stop() == 0


def test_api_job_records_validate_against_the_footprint_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from greend import report

    v = jsonschema.Draft202012Validator(json.loads(report.schema_path().read_text()))
    g = Greend(tmp_path / "g").start()
    job = job_id()
    p = busy(job, seconds=1.0)
    try:
        p.wait(30)
        wait_for(lambda: g.get(f"/api/v1/jobs/local/{job}")[0] == 200, what="the job's record")
        st, d = g.get(f"/api/v1/jobs/local/{job}")
        assert st == 200 and d["records"]
        for rec in d["records"]:
            errors = [f"{list(e.path)}: {e.message}" for e in v.iter_errors(rec)]
            assert not errors, errors
            assert rec["schema_version"] == report.SCHEMA_VERSION
        # The listings are job-footprint records too: one per node, or merged per job.
        for per in ("record", "job"):
            st, d = g.get(f"/api/v1/jobs?limit=1000&per={per}")
            assert st == 200 and any(r["job"]["job_id"] == job for r in d["jobs"])
            for rec in d["jobs"]:
                errors = [f"{list(e.path)}: {e.message}" for e in v.iter_errors(rec)]
                assert not errors, errors
    finally:
        stop(p)
        assert g.stop() == 0
