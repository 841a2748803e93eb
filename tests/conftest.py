"""Shared fixtures. Tree builders live in fixtures.py; keep this file small and generic."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest
from fixtures import Clock, FakeProc, FakeRapl, make_procfs, make_rapl

from greend.cli import install_policy_checks

# As `greend` itself does at start (its composition root): configurations are checked against the
# policy engine's rules when they are read.
install_policy_checks()


@pytest.fixture(autouse=True)
def _no_site_environment(monkeypatch):
    """A test never picks up the host's greend configuration or state directory by accident: not
    $GREEND_CONFIG, nor /etc/greend/greend.toml, nor ~/.config/greend/greend.toml."""
    monkeypatch.delenv("GREEND_CONFIG", raising=False)
    monkeypatch.delenv("GREEND_STATE_DIR", raising=False)
    nowhere = "/nonexistent/greend-tests"  # absent for every user, root or the test user
    monkeypatch.setenv("GREEND_SYSCONFDIR", f"{nowhere}/etc")
    monkeypatch.setenv("XDG_CONFIG_HOME", f"{nowhere}/xdg")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def procfs(tmp_path) -> FakeProc:
    return make_procfs(tmp_path / "proc")


@pytest.fixture
def rapl(tmp_path) -> FakeRapl:
    return make_rapl(tmp_path / "sys")


@pytest.fixture
def greendtest_dir():
    """For a test acting as the unprivileged user greendtest (made by bin/test and the testbed):
    a directory in /tmp that user can enter (pytest's tmp_path is root's only). Skipped unless
    running as root with that user present."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as the user greendtest")
    try:
        pwd.getpwnam("greendtest")
    except KeyError:
        pytest.skip("needs the user greendtest (made by bin/test and the testbed)")
    d = Path(tempfile.mkdtemp(prefix="greend-user-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)
