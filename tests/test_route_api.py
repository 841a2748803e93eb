"""POST /api/v1/route on a real daemon and a real controller (greend/route_api.py): the caller's
identity from the socket (root and the unprivileged greendtest, through curl as the cli_filter
calls it), the same JSON as `greend route --json`, the cli_filter's lines, bad bodies refused with
the field named, TCP callers refused without the site token, per-user quotas."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
from daemonproc import Greend, request, token_file, wait_for
from test_policies import _toml

ROOT = os.geteuid() == 0
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "testbed.toml"
GREEND = Path(sys.executable).with_name("greend")
USER = "greendtest"
HDS_JOB = {"sbatch": {"cpus-per-task": 1, "time": "00:50:00", "account": "proj-hds",
                      "argv": ["job.sh"]},
           "script_text": "#!/bin/bash\n#GREEND --data-class=hds\n"}

needs_user = pytest.mark.skipif(not ROOT, reason="needs root to run curl as greendtest")


def config_text(site_hds: bool = True, **daemon) -> str:
    """The testbed's policy without live Slurm state (these tests are about the API)."""
    data = tomllib.loads(EXAMPLE.read_text())
    data["clusters"]["site"]["hds"] = site_hds
    data.update({"node": "n1", "sampling": {"interval_s": 0.5, "checkpoint_interval_s": 1.0},
                 "attribution": {"jobs_from": "procscan"}, "power": {"rapl": False},
                 "daemon": {"route_warm": True, **daemon}})
    data["policy"]["live_state"] = False
    return _toml(data)


@pytest.fixture(scope="module")
def public_dir():
    d = Path(tempfile.mkdtemp(prefix="greend-route-", dir="/tmp"))
    d.chmod(0o755)  # greendtest reaches the socket here
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_node(home: Path, **daemon) -> Greend:
    g = Greend(home, args=["--socket", str(home / "api.sock")])
    g.write_config(config_text(**daemon))
    g.start()
    (home).chmod(0o755)
    return g


@pytest.fixture(scope="module")
def node(public_dir):
    g = start_node(public_dir / "node")
    yield g
    g.stop()


def curl(sock: Path, body: bytes | str, user: str | None = None,
         ctype: str = "application/json") -> tuple[int, bytes]:
    """POST /api/v1/route on the socket with curl, as `user` (None: root): (status, body)."""
    if isinstance(body, str):
        body = body.encode()
    argv = ["curl", "-sS", "--max-time", "10", "--unix-socket", str(sock), "-H",
            f"Content-Type: {ctype}", "--data-binary", "@-", "-w", "\n%{http_code}",
            "http://greend/api/v1/route"]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    r = subprocess.run(argv, input=body, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out, _, code = r.stdout.rpartition(b"\n")
    return int(code), out


@needs_user
def test_route_answers_as_greend_route_json_for_the_socket_caller(node):
    status, body = curl(node.home / "api.sock", json.dumps(HDS_JOB), USER)
    assert status == 200, body
    got = json.loads(body)
    assert got["request"]["user"] == USER  # from SO_PEERCRED, not from the body
    assert got["request"]["data_class"] == "hds"  # the #GREEND line of script_text was read
    assert got["outcome"] == "route" and got["plan"]["cluster"] == "site"
    assert got["plan"]["partition"] == "batch"  # 50 min does not fit debug's 30
    # The command's JSON for the same job: same shape and the same decision.
    script = node.home / "job.sh"
    script.write_text(HDS_JOB["script_text"])
    cli = subprocess.run([str(GREEND), "-c", str(node.config_path), "--state-dir", str(node.state),
                          "route", "--json", "--no-live", "-c", "1", "-t", "00:50:00", "-A", "proj-hds",
                          str(script)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "XDG_CACHE_HOME": str(node.home)})
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)
    assert set(got) == set(want)
    assert got["plan"]["cluster"] == want["plan"]["cluster"]
    assert got["plan"]["partition"] == want["plan"]["partition"]
    assert [c["cluster"] for c in got["candidates"]] == [c["cluster"] for c in want["candidates"]]


@needs_user
def test_cli_filter_lines(node):
    sock = node.home / "api.sock"
    status, body = curl(sock, json.dumps({**HDS_JOB, "cli_filter": "national"}), USER)
    assert status == 200
    lines = body.decode().splitlines()
    assert "verdict=redirect" in lines and "cluster=site" in lines
    assert any(ln.startswith("message=") and "belongs on site, not national" in ln for ln in lines)
    status, body = curl(sock, json.dumps({**HDS_JOB, "cli_filter": "site"}), USER)
    lines = body.decode().splitlines()
    assert status == 200 and "verdict=accept" in lines and "set partition=batch" in lines


@needs_user
def test_the_daemon_never_reads_the_script_a_caller_names(node):
    """A root-only file named in argv is not read: only the script_text the caller sends counts."""
    secret = node.home / "secret.sh"
    secret.write_text("#!/bin/bash\n#GREEND --data-class=hds\n")
    secret.chmod(0o600)
    body = {"sbatch": {"cpus-per-task": 1, "time": "10", "argv": [str(secret)]}}
    status, out = curl(node.home / "api.sock", json.dumps(body), USER)
    assert status == 200, out
    d = json.loads(out)
    assert d["request"]["data_class"] != "hds"
    assert d["request"]["script"] == str(secret)


@needs_user
@pytest.mark.parametrize("body, status, names", [
    (b"{not json", 400, "route request"),
    (b"[]", 400, "sbatch"),
    (b'{"sbatch": []}', 400, "sbatch"),
    (b'{"sbatch": {}, "extra": 1}', 400, "extra"),
    (b'{"sbatch": {"cpus-per-task": "many"}}', 400, "cpus-per-task"),
    (b'{"sbatch": {"time": {"h": 1}}}', 400, "sbatch.time"),
    (b'{"sbatch": {"argv": [1]}}', 400, "sbatch.argv"),
    (b'{"sbatch": {}, "script_text": "no shebang\\n"}', 400, "#!"),
    (b'{"sbatch": {}, "user": "root"}', 403, "only route your own"),
    (b'{"sbatch": {}, "cli_filter": 3}', 400, "cli_filter"),
    pytest.param(b'{"sbatch": {}}' + b" " * (70 << 10), 413, "65536 bytes", id="too-big"),
])
def test_bad_bodies_are_4xx_naming_the_field(node, body, status, names):
    got, out = curl(node.home / "api.sock", body, USER)
    assert got == status, out
    err = json.loads(out)["error"]
    assert names in err, err


@needs_user
def test_wrong_content_type_is_415(node):
    got, out = curl(node.home / "api.sock", json.dumps(HDS_JOB), USER, ctype="text/plain")
    assert got == 415 and b"application/json" in out


def test_root_routes_as_root_and_may_name_a_user(node):
    status, out = curl(node.home / "api.sock", json.dumps(HDS_JOB))
    assert status == 200 and json.loads(out)["request"]["user"] == pwd.getpwuid(os.geteuid()).pw_name
    if ROOT:  # root is an admin: may route in another user's name (a submit gateway)
        status, out = curl(node.home / "api.sock", json.dumps({**HDS_JOB, "user": "alice"}))
        assert status == 200 and json.loads(out)["request"]["user"] == "alice"


def test_tcp_without_the_site_token_is_refused(node):
    status, _, out = request(node.port, "POST", "/api/v1/route", json.dumps(HDS_JOB).encode(),
                             {"Content-Type": "application/json"})
    assert status == 403 and b"unix socket" in out


@needs_user
def test_per_user_quota(public_dir):
    g = start_node(public_dir / "quota", route_per_minute=2)
    try:
        got = [curl(g.home / "api.sock", json.dumps(HDS_JOB), USER)[0] for _ in range(3)]
        assert got == [200, 200, 429]
        status, out = curl(g.home / "api.sock", json.dumps(HDS_JOB), USER)
        assert status == 429 and b"daemon.route_per_minute" in out
        assert curl(g.home / "api.sock", json.dumps(HDS_JOB))[0] == 200  # root: an admin, not limited
    finally:
        g.stop()


def test_controller_routes_for_site_token_callers(tmp_path):
    tok = token_file(tmp_path / "token")
    c = Greend(tmp_path / "ctl", command="controller", args=["--token-file", str(tok), "--socket", ""])
    c.write_config(config_text())
    c.start()
    try:
        body = json.dumps(HDS_JOB).encode()
        auth = {"Content-Type": "application/json", "Authorization": f"Bearer {tok.read_text().strip()}"}
        status, _, out = request(c.port, "POST", "/api/v1/route", body, {"Content-Type": "application/json"})
        assert status == 403, out
        status, _, out = request(c.port, "POST", "/api/v1/route", body, auth)
        assert status == 400 and b"user: required" in out
        status, _, out = request(c.port, "POST", "/api/v1/route",
                                 json.dumps({**HDS_JOB, "user": "alice"}).encode(), auth)
        assert status == 200, out
        d = json.loads(out)
        assert d["request"]["user"] == "alice" and d["plan"]["cluster"] == "site"
    finally:
        c.stop()


def test_a_reload_rebuilds_the_router(public_dir):
    """SIGHUP: the next request is decided by the new configuration."""
    g = start_node(public_dir / "reload")
    sock = g.home / "api.sock"
    try:
        status, out = curl(sock, json.dumps(HDS_JOB))
        assert status == 200 and json.loads(out)["plan"]["cluster"] == "site"
        g.write_config(config_text(site_hds=False))  # no HDS-certified cluster any more
        g.signal(signal.SIGHUP)

        def rerouted():
            status, out = curl(sock, json.dumps(HDS_JOB))
            return status == 200 and json.loads(out)["outcome"] == "no_cluster"
        wait_for(rerouted, 30, what="a decision from the reloaded configuration")
    finally:
        g.stop()


def test_a_body_refused_from_its_head_still_gets_its_answer(node):
    # The daemon refuses a too-large body from its Content-Length alone, before reading it. A
    # client that keeps sending (as curl and http.client do) must still read the 413: the daemon
    # drops the rest for a moment instead of closing on unread data (which failed the client's
    # writes first: curl's "Send failure: Broken pipe").
    import socket
    import time

    body = b'{"sbatch": {}}' + b" " * (300 << 10)
    head = (b"POST /api/v1/route HTTP/1.1\r\nHost: greend\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(node.home / "api.sock"))
        s.sendall(head)
        time.sleep(0.3)  # the answer is written by now, the body not yet sent
        s.sendall(body)  # before: BrokenPipeError or ConnectionResetError here
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 413 "), data[:200]
    assert b"65536 bytes" in data
