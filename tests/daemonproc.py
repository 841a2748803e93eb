"""Real greend processes for tests: `greend run` agents and `greend controller`, on loopback ports,
with their own config files and state directories, plus CPU-bound "jobs" that greend's process
scan attributes to a Slurm job id (SLURM_JOB_ID in their environment).

    with Greend(tmp_path / "n1", node="n1") as g:
        job = busy(job_id)
        g.wait_for(lambda: g.job(job_id))
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

GREEND = str(Path(sys.executable).with_name("greend"))
SITE_PACKAGES = sysconfig.get_paths()["purelib"]


def greend_argv(user: str | None = None) -> list[str]:
    """How to start greend, as root or as `user` (for whom the venv's interpreter may be out of
    reach: then the system's Python 3 with the venv's packages)."""
    if not user:
        return [GREEND]
    boot = (f"import site, sys; site.addsitedir({SITE_PACKAGES!r}); sys.argv[0] = 'greend'; "
            "from greend.cli import main; sys.exit(main())")
    _require_importable_by(user)
    return ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", boot]


@functools.cache
def _importable_by(user: str) -> str:
    """'' if `user` can import greend from this checkout's venv, else why not."""
    probe = f"import site; site.addsitedir({SITE_PACKAGES!r}); import greend.cli"
    r = subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", probe],
                       capture_output=True, text=True, timeout=60)
    return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


def _require_importable_by(user: str) -> None:
    # A checkout in a private directory (mode 0700, as `mktemp -d` makes) is out of another
    # user's reach; bin/test opens the checkout's own directory, but not its parents.
    why = _importable_by(user)
    if why:
        import pytest

        pytest.skip(f"{user} cannot import greend from {SITE_PACKAGES} ({why}): a directory above "
                    "the checkout is private")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BUSY = "while True: pass\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_id() -> str:
    """A Slurm job id no other test on this machine uses (scans see every process)."""
    return str(random.randint(10**7, 10**8 - 1))


def toml(data: dict, prefix: str = "") -> str:
    """Just enough TOML for greend's config: scalars, lists of strings, nested tables."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = [f"{k} = {val(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            lines.append(f"\n[{name}]")
            lines.append(toml(v, name))
    return "\n".join(lines) + "\n"


def token_file(path: Path, value: str = "s3cret-token-for-tests", mode: int = 0o600) -> Path:
    path.write_text(value + "\n")
    os.chmod(path, mode)
    return path


def busy(job: str, *, user: str | None = None, seconds: float | None = None,
         env: dict | None = None) -> subprocess.Popen:
    """A CPU-bound process that greend groups as Slurm job `job` (optionally run as `user`)."""
    code = BUSY if seconds is None else (
        f"import time\nt = time.monotonic()\nwhile time.monotonic() - t < {seconds}: pass\n")
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SLURM_JOB_ID": job, **(env or {})}
    if not user:
        return subprocess.Popen([sys.executable, "-c", code], env=e, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    # runuser itself runs as root: it must not carry the job id, or the job would be root's.
    # The venv's interpreter may not be readable by that user: use the system's.
    assigns = [f"{k}={v}" for k, v in e.items() if k != "PATH"]
    argv = ["runuser", "-u", user, "--", "env", *assigns, "/usr/bin/python3", "-c", code]
    return subprocess.Popen(argv, env={"PATH": e["PATH"]}, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    """End a busy() process and anything it started."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(10)


def cpu_time_ns(pid: int) -> int:
    """utime + stime of a process, from /proc/<pid>/stat, in ns."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    f = raw[raw.rindex(b")") + 2:].split()
    return (int(f[11]) + int(f[12])) * 1_000_000_000 // CLK_TCK


def wait_for(cond: Callable, timeout: float = 30.0, every: float = 0.2, what: str | Callable = ""):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = cond()
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            v, last_exc = None, e
        if v:
            return v
        time.sleep(every)
    if callable(what):  # a description that reports the state at the time of the failure
        what = what()
    raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}"
                         + (f" (last error: {last_exc})" if last_exc else ""))


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def get_json(port: int, path: str, **kw) -> tuple[int, dict]:
    status, _, body = request(port, "GET", path, **kw)
    return status, json.loads(body)


def metric_value(text: str, name: str, **labels) -> float | None:
    """The value of one series in a Prometheus text exposition, or None."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] != name:
            continue
        if all(w in series for w in want):
            return float(value)
    return None


class Greend:
    """One greend process (`run` by default, or `controller`) with its config and state."""

    def __init__(self, home: Path, *, node: str = "n1", command: str = "run",
                 config: dict | None = None, args: list[str] | None = None,
                 interval_s: float = 0.5, checkpoint_interval_s: float = 1.0):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.state = self.home / "state"
        self.port = free_port()
        self.command = command
        cfg = {"node": node, "cluster": "local",
               "sampling": {"interval_s": interval_s, "checkpoint_interval_s": checkpoint_interval_s},
               "attribution": {"jobs_from": "procscan"},
               "power": {"rapl": False}}
        for k, v in (config or {}).items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
        self.cfg = cfg
        self.config_path = self.home / "greend.toml"
        self.write_config()
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.log_path = self.home / f"{command}.log"

    def write_config(self, text: str | None = None) -> None:
        self.config_path.write_text(text if text is not None else toml(self.cfg))

    @property
    def ledger_path(self) -> Path:
        return self.state / "ledger.sqlite"

    def argv(self) -> list[str]:
        extra = self.args if self.args is not None else ["--socket", ""]
        return ["-c", str(self.config_path), "--state-dir", str(self.state), self.command,
                "--listen", f"127.0.0.1:{self.port}", *extra]

    def start(self, wait: bool = True, user: str | None = None) -> Greend:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GREEND_", "SLURM_"))}
        argv = [*greend_argv(user), *self.argv()]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"greend {self.command} exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            return request(self.port, "GET", "/healthz", timeout=2)[0] == 200
        wait_for(up, timeout, what=f"greend {self.command} on port {self.port}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- reading it --------------------------------------------------------------------------------
    def get(self, path: str, **kw) -> tuple[int, dict]:
        return get_json(self.port, path, **kw)

    def health(self) -> dict:
        return self.get("/healthz")[1]

    def reasons(self, word: str) -> list[str]:
        """The /healthz reasons that mention `word` (other collectors may fail on a test host:
        a test looks at the reasons it causes, not at the overall status)."""
        return [r for r in self.health()["reasons"] if word in r]

    def metrics(self) -> str:
        status, _, body = request(self.port, "GET", "/metrics")
        assert status == 200
        return body.decode()

    def rows(self, sql: str, args=()) -> list[sqlite3.Row]:
        db = sqlite3.connect(f"file:{self.ledger_path}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def job(self, job: str) -> sqlite3.Row | None:
        rows = self.rows("SELECT * FROM jobs WHERE job_id = ?", (job,))
        return rows[0] if rows else None

    def __enter__(self) -> Greend:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()
