"""Attacks on a real `greend run` and a real `greend controller`, the way docs/security.md lists
them: two real unprivileged users talking to the daemon's unix socket, bad input of every kind,
slow and idle clients, a full disk, file modes, TLS between agent and controller.

What must hold every time: each answer is 2xx or 4xx with a message naming what was wrong, never
a 500; the log never holds a traceback; every response body is strict JSON (RFC 8259).
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from daemonproc import Greend, busy, free_port, job_id, request, stop, token_file, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = os.geteuid() == 0
USERS = {"greendtest": 4242, "greendtest2": 4243}  # the testbed's user, and a second one
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (users, runuser, mounts)")


def _no_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json(body: bytes):
    """Parse as RFC 8259 JSON: NaN, Infinity and -Infinity are refused."""
    return json.loads(body, parse_constant=_no_constant)


def has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def users():
    """The two unprivileged users the attacks run as; created (useradd) when missing, removed
    afterwards if this module created them."""
    if not ROOT:
        pytest.skip("needs root to create users and run as them")
    made = []
    for name, uid in USERS.items():
        if not has_user(name):
            r = subprocess.run(["useradd", "--no-create-home", "--uid", str(uid), "--shell",
                                "/usr/sbin/nologin", "--user-group", name], capture_output=True, text=True)
            if r.returncode:
                pytest.skip(f"useradd {name}: {r.stderr.strip()}")
            made.append(name)
    yield {name: pwd.getpwnam(name).pw_uid for name in USERS}
    for name in made:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture(scope="module")
def public_dir():
    """A directory every user can reach (pytest's tmp_path is root's only): sockets, client."""
    d = Path(tempfile.mkdtemp(prefix="greend-sec-", dir="/tmp"))
    os.chmod(d, 0o755)
    (d / "client.py").write_text(CLIENT)
    os.chmod(d / "client.py", 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# A client run as another user (with the system's python3): sends raw requests to a unix socket,
# one connection each, and prints [[status, body], ...] as JSON.
CLIENT = r'''
import base64, json, socket, sys
out = []
for raw in json.loads(sys.stdin.read()):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sys.argv[1])
    try:
        s.sendall(base64.b64decode(raw))
    except OSError:  # refused before the whole body was sent (413): the answer is still there
        pass
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    out.append([status, base64.b64encode(body).decode()])
print(json.dumps(out))
'''


def raw_request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    h = {"Host": "greend", "Connection": "close", **(headers or {})}
    if body and "Content-Length" not in h:
        h["Content-Length"] = str(len(body))
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
            + "\r\n").encode("latin-1") + body


def as_user(user: str | None, sock: Path, public: Path, raws: list[bytes]) -> list[tuple[int, bytes]]:
    argv = ["/usr/bin/python3", str(public / "client.py"), str(sock)]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    r = subprocess.run(argv, input=json.dumps([base64.b64encode(x).decode() for x in raws]),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [(st, base64.b64decode(b)) for st, b in json.loads(r.stdout)]


def decision(user: str, uid: int, **kw) -> dict:
    d = {"token": f"tok-{time.time_ns()}-{kw.get('job_id', '')}", "t": time.time(), "user": user,
         "uid": uid, "outcome": "submitted", "decision": {"summary": "test"}, "cluster": "local",
         "tier": "local", "job_id": None}
    d.update(kw)
    return d


def post_raw(body: bytes, **headers) -> bytes:
    return raw_request("POST", "/api/v1/decisions", body,
                       {"Content-Type": "application/json", **headers})


def assert_clean(answers: list[tuple[int, bytes]], *, words: list[str | None] | None = None):
    """Every answer 2xx/4xx with strict JSON; a 4xx names what was wrong."""
    for i, (code, body) in enumerate(answers):
        assert 200 <= code < 500, (i, code, body[:300])
        d = strict_json(body)
        if code >= 400:
            assert d["error"], (i, d)
            if words and words[i]:
                assert words[i] in d["error"], (i, words[i], d["error"])


def assert_no_traceback(g: Greend) -> None:
    log = g.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


@pytest.fixture
def node(users, public_dir, tmp_path):
    """A real `greend run` with private_jobs and its unix socket in a public directory."""
    sock = public_dir / f"api-{time.time_ns()}.sock"
    g = Greend(tmp_path / "node", config={"daemon": {"private_jobs": True, "decisions_per_minute": 40}},
               args=["--socket", str(sock)])
    g.sock = sock
    with g:
        g.start()
        wait_for(lambda: sock.exists(), 10, what="the API socket")
        yield g


# -- issue 11: one user's decision onto another user's job ---------------------------------------------
@pytest.mark.slow
@needs_root
def test_a_user_cannot_attach_a_decision_to_another_users_job(node, users, public_dir):
    theirs, later = job_id(), job_id()
    p = busy(theirs, user="greendtest2")
    try:
        wait_for(lambda: node.job(theirs), 30, what="greendtest2's job in the ledger")
        assert node.job(theirs)["user"] == "greendtest2"
        uid = users["greendtest"]
        bodies = [
            decision("greendtest", uid, job_id=theirs),  # their job: refused
            decision("greendtest", uid, job_id=later, t=time.time() + 10 * 365 * 86400),  # far future
            decision("greendtest", uid, job_id=later),  # not yet anyone's: stored, attaches to nobody else
            decision("greendtest2", users["greendtest2"], job_id=later),  # not in their own name
        ]
        answers = as_user("greendtest", node.sock, public_dir,
                          [post_raw(json.dumps(b).encode()) for b in bodies])
        assert [a[0] for a in answers] == [403, 400, 200, 403], answers
        assert_clean(answers, words=["not yours", "t: expected", None, "your own"])
    finally:
        stop(p)
    # greendtest2 now runs job `later`: greendtest's decision naming it does not attach to it.
    p = busy(later, user="greendtest2")
    try:
        wait_for(lambda: node.job(later), 30, what="the later job in the ledger")
        (st, body), = as_user(None, node.sock, public_dir,
                              [raw_request("GET", f"/api/v1/jobs/local/{later}")])
        assert st == 200
        assert all("decision" not in r for r in strict_json(body)["records"])
        (st, body), = as_user(None, node.sock, public_dir,
                              [raw_request("GET", f"/api/v1/jobs/local/{theirs}")])
        assert st == 200 and all("decision" not in r for r in strict_json(body)["records"])
    finally:
        stop(p)
    assert_no_traceback(node)


# -- issue 11: bad input is a 400 naming the field --------------------------------------------------
@pytest.mark.slow
@needs_root
def test_bad_input_is_a_4xx_naming_the_field_never_a_500(node, users, public_dir):
    uid = users["greendtest"]
    d = lambda **kw: json.dumps({**decision("greendtest", uid), **kw}).encode()  # noqa: E731
    cases = [
        (post_raw(d(nice=10**23)), 400, "nice"),
        (post_raw(b"[" * 60_000), 400, "nested"),  # under decision_max_bytes, to reach the parser
        (post_raw(d(job_name="\ud800x")), 400, "job_name"),
        (post_raw(d().replace(b'"test"', b'"\\ud800"')), 400, "decision"),
        (post_raw(d().replace(b'"t": ', b'"t": NaN, "x": ')), 400, "NaN"),
        (post_raw(d(uid=2**70)), 400, "uid"),
        (post_raw(d(cluster="no-such-cluster")), 400, "cluster"),
        (post_raw(d(tier="moon")), 400, "tier"),
        (post_raw(b'{"token": 1}', **{"Content-Length": "\u00b2"}), 400, "Content-Length"),
        (raw_request("GET", "/api/v1/jobs?offset=99999999999999999999"), 400, "offset"),
        (raw_request("GET", "/api/v1/jobs?limit=%D9%A3"), 400, "limit"),  # an Arabic-Indic 3
        (raw_request("GET", "/api/v1/jobs?since=nan"), 400, "since"),
        (raw_request("GET", "/api/v1/summary?until=inf"), 400, "until"),
        (raw_request("GET", "/api/v1/summary?since=-1e999"), 400, "since"),
        (post_raw(b"x" * (2 << 20)), 413, "bytes"),
    ]
    raws = [c[0] for c in cases]
    # Content-Length "²" is written by hand: the header above carries the digit as latin-1.
    raws[8] = (b"POST /api/v1/decisions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: \xc2\xb2\r\n\r\n{}")
    answers = as_user("greendtest", node.sock, public_dir, raws)
    assert [a[0] for a in answers] == [c[1] for c in cases], answers
    assert_clean(answers, words=[c[2] for c in cases])
    assert_no_traceback(node)  # the same query parameters over TCP: test_query_parameters_over_tcp


@pytest.mark.slow
@needs_root
def test_decision_quotas_size_and_rate(node, users, public_dir):
    uid = users["greendtest"]
    big = json.dumps(decision("greendtest", uid, decision={"pad": "x" * (1 << 20)})).encode()
    answers = as_user("greendtest", node.sock, public_dir, [post_raw(big)] * 20)
    assert {a[0] for a in answers} == {413}
    assert_clean(answers)
    # 40 a minute (daemon.decisions_per_minute in the fixture): the 41st is a 429.
    answers = as_user("greendtest", node.sock, public_dir,
                      [post_raw(json.dumps(decision("greendtest", uid, token=f"r{i}")).encode())
                       for i in range(45)])
    codes = [a[0] for a in answers]
    assert codes[:40] == [200] * 40 and set(codes[40:]) == {429}, codes
    assert_clean(answers, words=[None] * 40 + ["decisions a minute"] * 5)
    # Another user still may.
    (st, _), = as_user("greendtest2", node.sock, public_dir, [post_raw(json.dumps(
        decision("greendtest2", users["greendtest2"])).encode())])
    assert st == 200
    assert len(node.rows("SELECT id FROM decisions")) == 41
    assert_no_traceback(node)


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_curl_posting_a_body_does_not_wait_for_100_continue(tmp_path):
    """curl sends `Expect: 100-continue` for bodies over 1 KiB and waits 1 s for the answer."""
    with Greend(tmp_path / "curl", args=["--socket", str(tmp_path / "api.sock")]) as g:
        g.start()
        body = tmp_path / "d.json"
        body.write_text(json.dumps(decision("root", 0, decision={"pad": "x" * 5000})))
        t = time.perf_counter()
        sock = str(tmp_path / "api.sock")
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", sock,
                              "-H", "Content-Type: application/json", "--data-binary", f"@{body}",
                              "http://greend/api/v1/decisions"], capture_output=True, text=True,
                             timeout=30).stdout
        assert out.rsplit("\n", 1)[1] == "200", out
        assert time.perf_counter() - t < 0.9
        assert g.stop() == 0


def test_query_parameters_over_tcp_are_strict(tmp_path):
    with Greend(tmp_path / "tcp") as g:
        g.start()
        for path, word in [("/api/v1/jobs?offset=99999999999999999999", "offset"),
                           ("/api/v1/jobs?since=nan", "since"), ("/api/v1/jobs?until=inf", "until"),
                           ("/api/v1/summary?since=NaN", "since"), ("/api/v1/jobs?limit=1_0", "limit"),
                           ("/api/v1/summary?until=1e400", "until")]:
            st, _, body = request(g.port, "GET", path)
            assert st == 400 and word in strict_json(body)["error"], (path, body)
        st, _, body = request(g.port, "GET", "/api/v1/summary?since=0")
        assert st == 200 and strict_json(body)["since"] == 0
        assert g.stop() == 0
        assert_no_traceback(g)


# -- the controller: a token holder's bad batch is a 400, not a 500 ---------------------------------
TOKEN = "security-test-token-0123456789"


def controller(tmp_path: Path, **extra) -> Greend:
    tok = token_file(tmp_path / "token", TOKEN)
    return Greend(tmp_path / "ctl", command="controller",
                  config={"controller": {"token_file": str(tok), **extra}},
                  args=["--socket", ""])


def batch(**kw) -> dict:
    b = {"agent": {"cluster": "local", "node": "n1", "version": "t"}, "records": [],
         "factor_sets": [], "nodes": [], "decisions": []}
    b.update(kw)
    return b


@pytest.mark.slow
def test_controller_answers_a_token_holders_bad_batch_with_a_400(tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    good = decision("alice", 1000)
    bodies = [
        json.dumps(batch(decisions=[{**good, "nice": 10**23}])).encode(),
        json.dumps(batch(decisions=[{**good, "job_name": "\ud800"}])).encode(),
        json.dumps(batch(decisions=[{**good, "t": time.time() + 86400 * 365}])).encode(),
        json.dumps(batch(decisions=[{**good, "decision": {"a": [[[[1]]]]}, "uid": -1}])).encode(),
        b'{"agent": {"cluster": "local", "node": "n1"}, "records": [' + b"[" * 100_000 + b"]}",
        json.dumps(batch(records=[{"cluster": "local", "job_id": "1", "node": "n1", "kind": "slurm",
                                   "state": "ended", "first_seen": 1, "last_seen": 2,
                                   "meta": {"x": "\ud800"}}])).encode(),
        json.dumps(batch(records=[{"cluster": "local", "job_id": "1", "node": "n1", "kind": "slurm",
                                   "state": "ended", "first_seen": 1, "last_seen": 2,
                                   "meta": {"x": 10**40}}])).encode(),
        json.dumps(batch()).replace('"records": []', '"records": [], "x": NaN').encode(),
    ]
    with controller(tmp_path) as ctl:
        ctl.start()
        for i, body in enumerate(bodies):
            st, _, out = request(ctl.port, "POST", "/api/v1/records", body=body, headers=auth)
            assert 400 <= st < 500 or (st == 200 and i >= 5), (i, st, out[:300])
            assert strict_json(out)
        # POST /api/v1/decisions with the token, the same values.
        for bad in ({**good, "nice": 10**23}, {**good, "job_name": "\ud800"}):
            st, _, out = request(ctl.port, "POST", "/api/v1/decisions",
                                 body=json.dumps(bad).encode(), headers=auth)
            assert st == 400 and strict_json(out)["error"]
        # Without the token a body is at most 64 KiB, whatever controller.max_body_bytes says:
        # anonymous clients cannot make the controller buffer megabytes per connection.
        big = json.dumps(batch(records=[], pad="x" * (200 << 10))).encode()
        st, _, out = request(ctl.port, "POST", "/api/v1/records", body=big,
                             headers={"Content-Type": "application/json"})
        assert st == 413 and "without the site token" in strict_json(out)["error"]
        st, _, out = request(ctl.port, "POST", "/api/v1/records", body=big, headers=auth)
        assert st == 200, out  # the token holder may send up to controller.max_body_bytes
        # The batch path still works after all that.
        st, _, out = request(ctl.port, "POST", "/api/v1/records",
                             body=json.dumps(batch(decisions=[good])).encode(), headers=auth)
        assert st == 200, out
        for path in ("/api/v1/jobs", "/api/v1/summary", "/metrics"):
            assert request(ctl.port, "GET", path, headers=auth)[0] == 200
        assert ctl.stop() == 0
        assert_no_traceback(ctl)
    # A clean exit closed every connection: no -wal or -shm left.
    site = ctl.state  # --state-dir: the site ledger is there
    assert sorted(p.name for p in site.iterdir() if p.name.startswith("ledger")) == ["ledger.sqlite"]


# -- slow and idle clients -----------------------------------------------------------------------------
def threads_and_fds(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed_get(port: int, path: str) -> float:
    t = time.perf_counter()
    st, _, _ = request(port, "GET", path, timeout=5)
    assert st == 200
    return time.perf_counter() - t


@pytest.mark.slow
def test_idle_and_half_sent_connections_do_not_starve_metrics(tmp_path):
    with Greend(tmp_path / "slow") as g:
        g.start()
        pid = g.proc.pid
        timed_get(g.port, "/metrics")
        threads0, fds0 = threads_and_fds(pid)
        held = []
        try:
            for i in range(450):
                s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
                if i % 3 == 1:  # a request head never finished
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                elif i % 3 == 2:  # a body shorter than its Content-Length
                    s.sendall(b"POST /api/v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                              b"\r\n\r\n{\"tok")
                held.append(s)
            time.sleep(0.5)
            times = sorted(timed_get(g.port, "/metrics") for _ in range(7))
            assert times[3] < 0.1, times  # the median of 7 scrapes
            threads, _ = threads_and_fds(pid)
            assert threads <= threads0 + 8, (threads0, threads)  # a bounded pool, not one per connection
            # The read deadline (10 s) answers the half-sent requests 408 and closes them; idle
            # connections close after 30 s.
            s = held[1]
            s.settimeout(20)
            data = s.recv(4096)
            assert data.startswith(b"HTTP/1.1 408"), data[:100]
            assert "within" in strict_json(data.partition(b"\r\n\r\n")[2])["error"]
        finally:
            for s in held:
                s.close()
        wait_for(lambda: threads_and_fds(pid)[1] <= fds0 + 5, 15,
                 what=lambda: f"fds back near {fds0}: {threads_and_fds(pid)}")
        assert g.stop() == 0
        assert_no_traceback(g)


HOLDER = r'''
import json, socket, sys
held, refused = [], 0
for i in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    held.append(s)
for s in held:
    s.settimeout(0.05)
    try:
        if s.recv(200).startswith(b"HTTP/1.1 503"):
            refused += 1
    except OSError:
        pass
print(json.dumps(refused), flush=True)
sys.stdin.read()  # hold the connections until the test is done
'''


@pytest.mark.slow
@needs_root
def test_one_user_cannot_take_every_connection(node, users, public_dir):
    (public_dir / "holder.py").write_text(HOLDER)
    holder = subprocess.Popen(["runuser", "-u", "greendtest", "--", "/usr/bin/python3",
                               str(public_dir / "holder.py"), str(node.sock), "300"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        refused = json.loads(holder.stdout.readline())
        assert refused == 300 - 256, refused  # daemon.http max_per_uid
        # Another user, and root, are still served, and quickly.
        t = time.perf_counter()
        (st, body), = as_user("greendtest2", node.sock, public_dir, [raw_request("GET", "/healthz")])
        assert st == 200
        (st, body), = as_user(None, node.sock, public_dir, [raw_request("GET", "/metrics")])
        assert st == 200 and time.perf_counter() - t < 5
        # greendtest's 301st is refused with a message.
        (st, body), = as_user("greendtest", node.sock, public_dir, [raw_request("GET", "/healthz")])
        assert st == 503 and f"uid {users['greendtest']}" in strict_json(body)["error"]
    finally:
        holder.stdin.close()
        holder.wait(30)
    (st, _), = as_user("greendtest", node.sock, public_dir, [raw_request("GET", "/healthz")])
    assert st == 200


@pytest.mark.slow
def test_fds_and_memory_stay_flat_under_a_burst(tmp_path):
    with Greend(tmp_path / "burst") as g:
        g.start()
        pid = g.proc.pid

        def client(n: int) -> None:
            for i in range(n):
                path = ("/metrics", "/healthz", "/api/v1/jobs", "/api/v1/summary")[i % 4]
                request(g.port, "GET", path, timeout=30)

        def burst(n: int) -> None:
            workers = [threading.Thread(target=client, args=(n,)) for _ in range(16)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()

        burst(12)  # every handler thread has its read connection
        _, fds0 = threads_and_fds(pid)
        rss0 = rss_mib(pid)
        burst(150)
        _, fds = threads_and_fds(pid)
        assert fds <= fds0 + 10, (fds0, fds)
        assert rss_mib(pid) - rss0 < 30, (rss0, rss_mib(pid))
        assert g.stop() == 0
        assert_no_traceback(g)


@pytest.mark.slow
@needs_root
def test_decisions_reported_by_many_concurrent_callers_are_all_stored(node, users):
    """`greend submit` reports through decisions.report, which retries a refused connect."""
    from greend import decisions

    results = []
    lock = threading.Lock()

    def report(i: int) -> None:
        row = decision("root", 0, token=f"c{i}")
        ok = decisions.report(node.sock, row, timeout=20)
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=report, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [(True, "")] * 64
    assert len(node.rows("SELECT id FROM decisions WHERE token LIKE 'c%'")) == 64


def test_unix_client_retries_a_refused_connect(tmp_path):
    """A socket whose listen queue is full (EAGAIN) or not yet listening (ECONNREFUSED): the
    client retries until the server takes it."""
    from greend.httpclient import unix_request

    path = tmp_path / "s.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))  # bound but not listening: connect() is refused

    def later():
        time.sleep(0.5)
        srv.listen(1)
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        conn.close()

    t = threading.Thread(target=later)
    t.start()
    try:
        assert unix_request(path, "GET", "/healthz", timeout=5) == (200, b"{}")
    finally:
        t.join()
        srv.close()


# -- files ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_root
def test_state_dir_and_ledger_are_private_whatever_the_umask(users, tmp_path):
    home = Path(tempfile.mkdtemp(prefix="greend-umask-", dir="/tmp"))
    os.chmod(home, 0o755)
    try:
        g = Greend(home / "g")
        os.chmod(g.home, 0o755)
        old = os.umask(0)
        try:
            with g:
                g.start()
                assert g.get("/api/v1/jobs")[0] == 200  # a read connection opened
                modes = {p.name: stat.S_IMODE(p.stat().st_mode)
                         for p in (g.state, g.ledger_path, Path(f"{g.ledger_path}-wal"))}
                assert modes == {"state": 0o750, "ledger.sqlite": 0o640, "ledger.sqlite-wal": 0o640}
                r = subprocess.run(["runuser", "-u", "greendtest", "--", "/usr/bin/python3", "-c",
                                    f"import sqlite3; sqlite3.connect({str(g.ledger_path)!r})"
                                    ".execute('SELECT COUNT(*) FROM jobs')"],
                                   capture_output=True, text=True, timeout=30)
                assert r.returncode != 0 and "unable to open" in r.stderr, r.stderr
                assert g.stop() == 0
        finally:
            os.umask(old)
        # A clean exit closed every connection: SQLite removed its -wal and -shm files.
        assert sorted(p.name for p in g.state.iterdir() if p.name.startswith("ledger")) == ["ledger.sqlite"]
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_clean_exit_leaves_no_wal_after_api_queries(tmp_path):
    with Greend(tmp_path / "wal") as g:
        g.start()
        for path in ("/api/v1/jobs", "/api/v1/summary", "/metrics", "/api/v1/jobs/local/x"):
            request(g.port, "GET", path)
        assert g.stop() == 0
    assert sorted(p.name for p in g.state.iterdir() if p.name.startswith("ledger")) == ["ledger.sqlite"]


@pytest.mark.slow
@needs_root
def test_a_full_disk_is_named_in_healthz_and_the_log(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.strip()}")
    try:
        g = Greend(tmp_path / "full", interval_s=0.2, checkpoint_interval_s=0.3)
        g.state = mnt / "state"
        with g:
            g.start()
            p = busy(job_id())
            try:
                time.sleep(1)
                # Fill the disk to the last byte.
                fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    while os.write(fd, b"\0" * 4096):
                        pass
                except OSError:
                    pass
                finally:
                    os.close(fd)
                reason = wait_for(lambda: g.reasons("no space left on device"), 30,
                                  what=lambda: f"a disk-full reason in {g.health()['reasons']}")
                assert str(g.state) in reason[0] and "bytes free" in reason[0], reason
                assert "no space left on device" in g.log()
                assert "cannot rollback" not in g.log() and "cannot rollback" not in reason[0]
                (mnt / "filler").unlink()
                wait_for(lambda: not g.reasons("no space"), 30, what="checkpoints work again")
            finally:
                stop(p)
            assert g.stop() == 0
            assert_no_traceback(g)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# -- config check validates what greend run validates ----------------------------------------------------
@pytest.mark.parametrize("config, word, run_refuses", [
    ({"daemon": {"listen": "nonsense"}}, "daemon.listen", True),
    ({"controller": {"listen": "host:99999"}}, "controller.listen", True),
    ({"controller": {"url": "http://ctl:9472", "token_file": "/nonexistent/token"}}, "no such file", True),
    ({"controller": {"url": "http://ctl:9472", "token_file": "/etc/hostname"}}, "token_file", True),
    ({"controller": {"token_file": "/etc/hostname"}}, "token_file", False),  # the controller's
    ({"controller": {"tls_cert_file": "/nonexistent.pem"}}, "tls_key_file", True),
])
def test_config_check_refuses_what_greend_run_refuses(tmp_path, config, word, run_refuses):
    from daemonproc import toml

    path = tmp_path / "g.toml"
    path.write_text(toml(config))
    greend = str(Path(sys.executable).with_name("greend"))
    r = subprocess.run([greend, "config", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and word in r.stderr, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    if not run_refuses:
        return
    run = subprocess.run([greend, "-c", str(path), "--state-dir", str(tmp_path / "s"), "run",
                          "--listen", f"127.0.0.1:{free_port()}", "--socket", ""],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "Traceback" not in run.stderr


# -- TLS between agents and the controller ----------------------------------------------------------------
def make_certs(d: Path) -> dict[str, Path]:
    """A CA and a certificate for 127.0.0.1 it signs, plus a self-signed impostor, by openssl."""
    if not shutil.which("openssl"):
        pytest.skip("needs openssl")

    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=greend test CA")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "srv.pem", "-days", "2", "-extfile", "ext")
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.pem",
        "-days", "2", "-subj", "/CN=impostor CA")
    return {n: d / f for n, f in (("ca", "ca.pem"), ("cert", "srv.pem"), ("key", "srv.key"),
                                  ("other", "other.pem"))}


@pytest.mark.slow
def test_agents_reach_a_tls_controller_and_verify_its_certificate(tmp_path):
    import ssl as ssl_mod
    import urllib.request

    certs = make_certs(tmp_path)
    tok = token_file(tmp_path / "token", TOKEN)
    ctl = controller(tmp_path, tls_cert_file=str(certs["cert"]), tls_key_file=str(certs["key"]))
    job = job_id()
    with ctl:
        ctl.start(wait=False)

        def up():
            ctx = ssl_mod.create_default_context(cafile=str(certs["ca"]))
            with urllib.request.urlopen(f"https://127.0.0.1:{ctl.port}/healthz", context=ctx,
                                        timeout=2) as r:
                return r.status == 200
        wait_for(up, 30, what="the controller over HTTPS")
        # Plain HTTP to the TLS listener gets nothing useful.
        with pytest.raises(Exception):  # noqa: B017 - reset or a bad status line, both refusals
            request(ctl.port, "GET", "/healthz", timeout=3)
        url = f"https://127.0.0.1:{ctl.port}"
        good = Greend(tmp_path / "a1", node="a1", config={"controller": {
            "url": url, "token_file": str(tok), "ca_file": str(certs["ca"]), "send_interval_s": 0.3}})
        bad = Greend(tmp_path / "a2", node="a2", config={"controller": {
            "url": url, "token_file": str(tok), "ca_file": str(certs["other"]), "send_interval_s": 0.3,
            "unreachable_after_s": 0}})
        p = busy(job)
        try:
            with good, bad:
                good.start()
                bad.start()
                ctx = ssl_mod.create_default_context(cafile=str(certs["ca"]))

                def ctl_has_job():
                    with urllib.request.urlopen(
                            urllib.request.Request(f"{url}/api/v1/jobs?limit=1000",
                                                   headers={"Authorization": f"Bearer {TOKEN}"}),
                            context=ctx, timeout=5) as r:
                        return {(j["job"]["node"], j["job"]["job_id"]) for j in json.load(r)["jobs"]}
                wait_for(lambda: ("a1", job) in ctl_has_job(), 30, what="a1's record at the controller")
                reason = wait_for(lambda: bad.reasons("site:"), 30, what="a2's TLS failure")
                assert "CERTIFICATE_VERIFY_FAILED" in reason[0] or "certificate verify" in reason[0], reason
                assert ("a2", job) not in ctl_has_job()
                assert good.stop() == 0 and bad.stop() == 0
        finally:
            stop(p)
        # A renewed certificate: SIGHUP, and new connections get it.
        subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "new.key",
                        "-out", "new.csr", "-subj", "/CN=renewed"], check=True, capture_output=True,
                       cwd=tmp_path)
        subprocess.run(["openssl", "x509", "-req", "-in", "new.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                        "-CAcreateserial", "-out", "new.pem", "-days", "2", "-extfile", "ext"],
                       check=True, capture_output=True, cwd=tmp_path)
        ctl.cfg["controller"].update(tls_cert_file=str(tmp_path / "new.pem"),
                                     tls_key_file=str(tmp_path / "new.key"))
        ctl.write_config()
        ctl.signal(signal.SIGHUP)

        def subject_cn() -> str:
            ctx = ssl_mod.create_default_context(cafile=str(certs["ca"]))
            with socket.create_connection(("127.0.0.1", ctl.port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
        wait_for(lambda: subject_cn() == "renewed", 15, what="the renewed certificate")
        assert ctl.stop() == 0
        assert_no_traceback(ctl)


# -- property-based: every endpoint, any query, any body ---------------------------------------------------
ENDPOINTS = ["/metrics", "/healthz", "/api/v1/jobs", "/api/v1/jobs/local/1", "/api/v1/jobs/x/%00",
             "/api/v1/clusters", "/api/v1/summary", "/api/v1/decisions", "/api/v1/records", "/nothing"]
PARAMS = ["limit", "offset", "since", "until", "state", "user", "account", "cluster", "kind", "by"]
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
_values = st.one_of(_text, st.integers().map(str), st.floats().map(str), st.sampled_from(
    ["nan", "inf", "-inf", "1e400", "99999999999999999999", "-1", "0", "\u0663", "\u00b2", "1_0", " 5",
     "", "running", "ended", "user", "node"]))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=15)
_decision = st.fixed_dictionaries(
    {"token": st.text(max_size=20), "t": st.one_of(st.floats(), st.integers()), "user": st.just("root"),
     "uid": st.one_of(st.just(0), st.integers()), "outcome": st.sampled_from(["submitted", "x"]),
     "decision": _json},
    optional={"nice": st.integers(), "job_id": _json, "cluster": _json, "tier": _json, "tried": _json,
              "energy_j": _json, "begin": _json, "script": _json})


def _body(draw_json) -> bytes:
    return json.dumps(draw_json).encode()


_bodies = st.one_of(st.binary(max_size=300), _json.map(_body), _decision.map(_body),
                    _json.map(lambda j: _body({"agent": {"cluster": "local", "node": "n1"},
                                               "records": [j], "decisions": [j]})))


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz")
    tok = token_file(home / "token", TOKEN)
    node = Greend(home / "node", args=["--socket", str(home / "api.sock")])
    ctl = Greend(home / "ctl", command="controller", config={"controller": {"token_file": str(tok)}},
                 args=["--socket", ""])
    with node, ctl:
        node.start()
        ctl.start()
        node.sock = home / "api.sock"
        yield node, ctl
        assert node.stop() == 0 and ctl.stop() == 0
        assert_no_traceback(node)
        assert_no_traceback(ctl)


def _check(st_code: int, path: str, body: bytes) -> None:
    assert 200 <= st_code < 500, (path, st_code, body[:300])
    if path != "/metrics" or st_code >= 400:
        d = strict_json(body)
        if st_code >= 400:
            assert d["error"], d


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(ENDPOINTS), query=st.dictionaries(st.sampled_from(PARAMS), _values, max_size=4),
       method=st.sampled_from(["GET", "POST", "HEAD", "PUT"]), body=_bodies,
       where=st.sampled_from(["node-tcp", "node-unix", "ctl"]))
def test_fuzz_every_endpoint_answers_4xx_not_500(fuzz_target, path, query, method, body, where):
    import http.client
    from urllib.parse import urlencode

    from greend.httpclient import UnixHTTPConnection

    node, ctl = fuzz_target
    target = path + ("?" + urlencode(query) if query else "")
    headers = {"Content-Type": "application/json"}
    if where == "ctl":
        headers["Authorization"] = f"Bearer {TOKEN}"
        conn = http.client.HTTPConnection("127.0.0.1", ctl.port, timeout=30)
    elif where == "node-tcp":
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    else:
        conn = UnixHTTPConnection(node.sock, timeout=30)
    try:
        conn.request(method, target, body=body if method in ("POST", "PUT") else None, headers=headers)
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    if method != "HEAD":
        _check(r.status, path, data)
    else:
        assert 200 <= r.status < 500


@pytest.mark.skipif(not shutil.which("ss"), reason="needs ss (iproute2)")
def test_listen_backlog_is_128_on_tcp_and_the_socket(tmp_path):
    """A backlog of 5 made `greend submit` fail with EAGAIN under 8 concurrent callers."""
    from greend import config
    from greend.http import serve

    class Host:
        cfg = config.parse({})
        max_body, token, routes = 1024, None, {}

    class Api:
        host = Host()

        def handle(self, *args):
            return 200, "application/json", b"{}\n"

    srv = serve(Api(), ("127.0.0.1", 0), tmp_path / "s.sock")
    try:
        tcp = subprocess.run(["ss", "-ltnH", f"sport = :{srv.port}"], capture_output=True, text=True).stdout
        unix = subprocess.run(["ss", "-lxH", "src", str(tmp_path / "s.sock")], capture_output=True,
                              text=True).stdout
        assert tcp.split()[2] == "128" and unix.split()[3] == "128", (tcp, unix)
    finally:
        srv.close()
    assert not (tmp_path / "s.sock").exists()
