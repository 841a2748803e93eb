"""Private MariaDB and PostgreSQL servers for the site database's tests (tests/test_sitedb*.py):
Debian's packages (mariadb-server, postgresql; bin/test installs them), each started once per test
session in its own data directory under /tmp on a free loopback port, and stopped at the end.
Every test gets a database of its own (`site_db`), owned by a `greend` user with a password file.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemonproc import free_port, token_file

PASSWORD = "site-db-password-0123"
_counter = itertools.count(1)


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _wait(cond, what: str, timeout: float = 30.0, proc=None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:] if log else ''}")
        if cond():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready within {timeout:.0f} s")


@dataclass
class Server:
    kind: str  # "mysql" or "postgresql"
    port: int
    root: Path
    proc: subprocess.Popen | None = None
    argv: tuple = ()
    up: object = None  # () -> bool: answering

    def halt(self) -> None:
        """Stop the server, keeping its data (restart() brings it back on the same port)."""
        if self.kind == "postgresql":  # a fast shutdown: connected clients do not hold it up
            subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.root / "pg" / "data"),
                                         "stop", "-m", "fast", "-w"]), capture_output=True,
                           timeout=60, check=True)
        else:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)

    def restart(self) -> None:
        log = self.root / "restart.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(list(self.argv), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        _wait(self.up, self.kind, proc=self.proc, log=log)

    def admin(self, sql: str) -> None:
        """Run SQL as the server's administrator."""
        if self.kind == "mysql":
            cmd = ["mariadb", "--no-defaults", "-S", str(self.root / "mysqld.sock"), "-uroot", "-e", sql]
        else:
            cmd = [_pg_bin("psql"), "-h", str(self.root / "pg"), "-p", str(self.port), "-U", "postgres",
                   "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c", sql]
            cmd = _as_postgres(cmd)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode:
            raise RuntimeError(f"{self.kind} admin {sql!r}: {r.stderr.strip()}")

    def new_database(self) -> str:
        """A fresh database owned by `greend`; its URL (without the password)."""
        name = f"greend_t{os.getpid()}_{next(_counter)}"
        if self.kind == "mysql":
            self.admin(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin; "
                       f"GRANT ALL ON {name}.* TO 'greend'@'127.0.0.1'")
            return f"mysql+pymysql://greend@127.0.0.1:{self.port}/{name}"
        self.admin(f"CREATE DATABASE {name} OWNER greend")
        return f"postgresql+psycopg://greend@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.kind == "postgresql":
            # runuser passes SIGTERM on, but a "smart" shutdown waits for every client to leave
            subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.root / "pg" / "data"),
                                         "stop", "-m", "fast", "-w"]), capture_output=True, timeout=60)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: its server and tools run as Debian's `postgres` user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _tmpdir(kind: str) -> Path:
    base = os.environ.get("GREEND_TESTBED_DIR")
    root = Path(tempfile.mkdtemp(prefix=f"greend-sitedb-{kind}-",
                                 dir=base if base and Path(base).is_dir() else None))
    root.chmod(0o755)
    return root


def start_mariadb(durable: bool = False) -> Server:
    mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    if not os.path.exists(mariadbd) or not shutil.which("mariadb-install-db"):
        pytest.skip("mariadb-server is not installed (bin/test installs it)")
    root = _tmpdir("mariadb")
    user = ["--user=root"] if os.geteuid() == 0 else []
    r = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={root / 'data'}", *user,
                        "--auth-root-authentication-method=socket", "--skip-test-db"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"mariadb-install-db: {r.stderr[-2000:]}")
    port = free_port()
    log = root / "mariadbd.log"
    # Commits flushed to the OS, synced once a second: like the SQLite ledger's WAL with
    # synchronous=NORMAL (survives a process crash, may lose the last second on power loss).
    flush = "1" if durable else "2"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [mariadbd, "--no-defaults", f"--datadir={root / 'data'}", *user, f"--port={port}",
             "--bind-address=127.0.0.1", f"--socket={root / 'mysqld.sock'}",
             f"--pid-file={root / 'mysqld.pid'}", "--skip-name-resolve", "--innodb-buffer-pool-size=128M",
             f"--innodb-flush-log-at-trx-commit={flush}", "--max-connections=200"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def up():
        return subprocess.run(["mariadb", "--no-defaults", "-S", str(root / "mysqld.sock"), "-uroot",
                               "-e", "SELECT 1"], capture_output=True, timeout=10).returncode == 0
    return _started(Server("mysql", port, root, proc, up=up), "mariadbd", log,
                    f"CREATE USER 'greend'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'")


def _started(s: Server, what: str, log: Path, create_user: str) -> Server:
    """Wait until the just-started server `s` answers and make its `greend` user; stop it on failure."""
    try:
        _wait(s.up, what, proc=s.proc, log=log)
        s.admin(create_user)
    except BaseException:
        s.stop()
        raise
    return s


def start_postgresql() -> Server:
    initdb, postgres = _pg_bin("initdb"), _pg_bin("postgres")
    if not initdb or not postgres:
        pytest.skip("postgresql is not installed (bin/test installs it)")
    root = _tmpdir("postgresql")
    sock = root / "pg"
    sock.mkdir()
    pwfile = root / "pw"
    pwfile.write_text("postgres-admin\n")
    if os.geteuid() == 0:
        shutil.chown(sock, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    r = subprocess.run(_as_postgres([initdb, "-D", str(sock / "data"), "-U", "postgres", "-E", "UTF8",
                                     "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
                                     f"--pwfile={pwfile}"]),
                       capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"initdb: {r.stderr[-2000:]}")
    port = free_port()
    log = root / "postgres.log"
    argv = _as_postgres([postgres, "-D", str(sock / "data"), "-p", str(port), "-k", str(sock),
                         "-c", "listen_addresses=127.0.0.1", "-c", "synchronous_commit=off",
                         "-c", "max_connections=200", "-c", "shared_buffers=128MB"])
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)

    def up():
        return subprocess.run(_as_postgres([_pg_bin("pg_isready"), "-h", str(sock), "-p", str(port)]),
                              capture_output=True, timeout=10).returncode == 0
    return _started(Server("postgresql", port, root, proc, tuple(argv), up), "postgres", log,
                    f"CREATE ROLE greend LOGIN PASSWORD '{PASSWORD}'")


@pytest.fixture(scope="session")
def mariadb_server():
    s = start_mariadb()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def postgresql_server():
    s = start_postgresql()
    yield s
    s.stop()


@dataclass
class SiteDb:
    """A fresh site database for one test: controller.database and its password file."""

    kind: str
    url: str
    password_file: Path | None
    password: str = PASSWORD

    def settings(self) -> dict:
        d = {"database": self.url}
        if self.password_file is not None:
            d["database_password_file"] = str(self.password_file)
        return d


def _site_db(request, tmp_path, kind: str) -> SiteDb:
    if kind == "sqlite":
        return SiteDb("sqlite", "sqlite", None)
    server = request.getfixturevalue("mariadb_server" if kind == "mysql" else "postgresql_server")
    return SiteDb(kind, server.new_database(), token_file(tmp_path / "dbpw", PASSWORD))


@pytest.fixture(params=["sqlite", "mysql", "postgresql"])
def site_db(request, tmp_path) -> SiteDb:
    """A fresh site database on each engine in turn: SQLite (the default), MariaDB, PostgreSQL."""
    return _site_db(request, tmp_path, request.param)


@pytest.fixture(params=["mysql", "postgresql"])
def server_db(request, tmp_path) -> SiteDb:
    """A fresh database on each server in turn: MariaDB, PostgreSQL."""
    return _site_db(request, tmp_path, request.param)


@pytest.fixture
def pg_db(request, tmp_path) -> SiteDb:
    """A fresh PostgreSQL database."""
    return _site_db(request, tmp_path, "postgresql")
