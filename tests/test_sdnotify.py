"""greend under systemd: readiness (Type=notify) once the listeners are up, watchdog pings, journald
priorities on log lines; on the real daemons, with a notify socket of our own (sd_notify(3))."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from daemonproc import Greend, request, token_file, wait_for
from fixtures import make_procfs

from greend import logsetup, sdnotify


class NotifySocket:
    """What systemd listens on: a datagram socket; collects the messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path, monkeypatch):
    ns = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(ns.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield ns
    ns.close()


def test_notify_without_systemd_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.ready() is False and sdnotify.watchdog() is False


def test_watchdog_belongs_to_the_pid_systemd_named(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 4.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # a parent's watchdog is not ours
    assert sdnotify.watchdog_interval_s() is None


def test_abstract_notify_socket(monkeypatch):
    name = f"greend-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready("serving")
        assert s.recv(100) == b"READY=1\nSTATUS=serving"
    finally:
        s.close()


def test_node_daemon_is_ready_once_serving_pings_the_watchdog_and_says_stopping(tmp_path, notify):
    g = Greend(tmp_path / "g", interval_s=0.2)
    g.start(wait=False)
    try:
        def ready():
            assert g.proc.poll() is None, g.log()
            return "READY=1" in notify.drain()
        wait_for(ready, 30, what="READY=1 from greend run")
        # Readiness means the listener is up: /healthz answers at once.
        assert request(g.port, "GET", "/healthz", timeout=2)[0] == 200
        time.sleep(1.5)
        notify.drain()
        pings = [t for t, m in notify.messages if m == "WATCHDOG=1"]
        assert len(pings) >= 3, notify.messages  # every 1/4 of WatchdogSec, from the sampling
    finally:
        assert g.stop() == 0, g.log()
    assert "STOPPING=1" in notify.drain()


def test_node_daemon_watchdog_stops_when_sampling_is_stuck(tmp_path, notify):
    # The pings come from the sampling, not from the main loop: when a read of /proc hangs, they
    # stop (and systemd would restart greend) although the process and its main loop live on.
    proc = make_procfs(tmp_path / "proc", ncpu=2, packages=1)
    g = Greend(tmp_path / "g", interval_s=0.2, config={"paths": {"procfs": str(proc.root)}})
    g.start()
    try:
        wait_for(lambda: notify.drain().count("WATCHDOG=1") >= 2, 10, what="watchdog pings")
        d = proc.add_process(4242, env={"SLURM_JOB_ID": "77"})
        for name in ("stat", "environ", "cmdline", "status"):  # reading the new process blocks
            (d / name).unlink(missing_ok=True)
            os.mkfifo(d / name)
        time.sleep(1.0)
        notify.drain()
        stuck_at = time.monotonic()
        time.sleep(1.5)
        notify.drain()
        late = [m for t, m in notify.messages if t > stuck_at and m == "WATCHDOG=1"]
        assert late == [] and g.alive()
    finally:
        g.kill9()


def test_controller_is_ready_and_pings_from_its_main_loop(tmp_path, notify):
    tok = token_file(tmp_path / "token")
    g = Greend(tmp_path / "ctl", command="controller", args=["--socket", "", "--token-file", str(tok)])
    g.start(wait=False)
    try:
        wait_for(lambda: "READY=1" in notify.drain() or (g.proc.poll() is not None and
                                                         pytest.fail(g.log())), 30)
        time.sleep(1.2)
        notify.drain()
        assert sum(m == "WATCHDOG=1" for _, m in notify.messages) >= 2
    finally:
        assert g.stop() == 0, g.log()


def test_logs_carry_journald_priorities_and_routine_is_info(tmp_path, monkeypatch):
    log_path = tmp_path / "g" / "run.log"
    log_path.parent.mkdir(parents=True)
    log_path.touch()
    st = log_path.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    g = Greend(tmp_path / "g")
    g.start()
    g.signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in g.log(), 10)
    assert g.stop() == 0
    lines = [ln for ln in g.log().splitlines() if ln]
    assert lines and all(ln[:3] in ("<6>", "<7>") for ln in lines), lines  # nothing above INFO
    assert any(ln.startswith("<6>greend ") and "monitoring node" in ln for ln in lines)
    assert any(ln.startswith("<6>received SIGTERM") for ln in lines)


def test_journal_formatter_prefixes_every_line_of_a_record():
    fmt = logsetup.JournalFormatter("%(message)s")
    rec = logging.LogRecord("greend", logging.ERROR, __file__, 1, "failed:\n  details", None, None)
    assert fmt.format(rec) == "<3>failed:\n<3>  details"
    rec = logging.LogRecord("greend", logging.WARNING, __file__, 1, "degraded", None, None)
    assert fmt.format(rec) == "<4>degraded"


def test_plain_stderr_keeps_the_readable_format(tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # some other stream: not ours
    g = Greend(tmp_path / "g")
    g.start()
    assert g.stop() == 0
    assert "greend: INFO: greend " in g.log() and "<6>" not in g.log()
