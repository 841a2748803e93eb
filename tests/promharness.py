"""A real Prometheus server for tests: loopback only, a temporary config and data directory, a free port.
Also what it scrapes: real `greend run` daemons (GreendDaemon) and busy Slurm-like jobs (busy_job).

    with GreendDaemon(tmp_path / "n1") as g, PromServer(tmp_path / "prom", [scrape_config([g])]) as prom:
        prom.wait_for("greend_samples_total", lambda r: len(r) >= 1)
        prom.query("sum(greend_node_energy_joules_total)")

The config is written as JSON (which is YAML), so no YAML library is needed. Query helpers raise
PromError with Prometheus's own message when an expression does not parse or fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"



def log_tail(path: Path, chars: int = 4000) -> str:
    """The end of a server's log, for a failure message."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""

class PromError(Exception):
    """A query or API call that Prometheus refused; the message is Prometheus's."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> bool:
    return Path(PROMETHEUS).is_file() and Path(PROMTOOL).is_file()


class PromServer:
    def __init__(self, workdir: Path, scrape_configs: list[dict], rule_files: list[Path] = (),
                 scrape_interval_s: float = 1.0, evaluation_interval_s: float = 1.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "prometheus.yml"
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "prometheus.log"
        self.config = {
            "global": {"scrape_interval": f"{scrape_interval_s:g}s",
                       "scrape_timeout": f"{min(scrape_interval_s, 10):g}s",
                       "evaluation_interval": f"{evaluation_interval_s:g}s"},
            "rule_files": [str(Path(p).resolve()) for p in rule_files],
            "scrape_configs": scrape_configs,
        }
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> PromServer:
        self.config_path.write_text(json.dumps(self.config, indent=2))
        for _attempt in range(3):  # the free port can be taken between probing and binding
            self.port = free_port()
            log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={self.data_dir}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1d", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                        if r.status == 200:
                            return self
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.1)
            self.stop()
            if "address already in use" not in self.log():
                break
        raise PromError(f"prometheus did not become ready; its log:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> PromServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return log_tail(self.log_path)

    # -- HTTP API -------------------------------------------------------------------------------
    def api(self, path: str, **params) -> object:
        """GET /api/v1/<path>; list values become repeated parameters (match[])."""
        pairs = []
        for k, v in params.items():
            if v is None:
                continue
            for item in v if isinstance(v, list | tuple) else [v]:
                pairs.append((k, str(item)))
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(pairs)}"
        try:
            with urllib.request.urlopen(url, timeout=15) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            try:
                body = json.load(e)
            except ValueError:
                raise PromError(f"{path}: HTTP {e.code}") from None
        if body.get("status") != "success":
            raise PromError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query; returns the result list (a scalar or string comes back as one item)."""
        data = self.api("query", query=expr, time=at)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=f"{step_s:g}s")["result"]

    def values(self, expr: str, at: float | None = None) -> dict[tuple, float]:
        """Instant query as {sorted label items: value}."""
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in self.query(expr, at)}

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        return self.api(f"label/{label}/values", **{"match[]": match})

    def rules(self) -> list[dict]:
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_for(self, expr: str, ok: Callable[[list[dict]], bool], timeout_s: float = 30.0,
                 what: str = "") -> list[dict]:
        """Poll an instant query until ok(result) holds; fail with the last result otherwise."""
        deadline = time.monotonic() + timeout_s
        result: list[dict] = []
        while True:
            result = self.query(expr)
            if ok(result):
                return result
            if time.monotonic() > deadline:
                targets = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in self.targets()]
                raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what or expr}; "
                                     f"last result {result}; targets {targets}")
            time.sleep(0.25)


# -- what Prometheus scrapes ----------------------------------------------------------------------
_BUSY = """
import time
while True:  # about half a CPU: busy 50 ms, asleep 50 ms
    t = time.perf_counter()
    while time.perf_counter() - t < 0.05:
        pass
    time.sleep(0.05)
"""


def busy_job(job_id: str, cluster: str | None = None) -> subprocess.Popen:
    """A process that greend's process scan groups as Slurm job `job_id` (SLURM_JOB_ID in its env)."""
    env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_CPUS_ON_NODE": "1"}
    if cluster:
        env["SLURM_CLUSTER_NAME"] = cluster
    return subprocess.Popen([sys.executable, "-c", _BUSY], env=env, stdin=subprocess.DEVNULL)


def stop_process(p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


class GreendDaemon:
    """A real `greend run` serving /metrics on a free loopback port, with its own config and state.

    Jobs come from the process scan (jobs_from = "procscan"), whatever cgroup tree the host has.
    `clusters` maps cluster name -> tier; the first is this node's cluster.
    """

    def __init__(self, workdir: Path, node: str = "n1", clusters: dict[str, str] | None = None,
                 interval_s: float = 0.5, extra_config: str = "", socket: Path | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.node = node
        self.clusters = clusters or {"alpha": "site"}
        self.cluster = next(iter(self.clusters))
        self.interval_s = interval_s
        self.extra_config = extra_config  # TOML appended to the config ([policy] budgets...)
        self.socket = socket  # the API's unix socket; None: none
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "greend.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config_text(self) -> str:
        lines = [f'cluster = "{self.cluster}"', f'node = "{self.node}"', "",
                 "[sampling]", f"interval_s = {self.interval_s}", "checkpoint_interval_s = 5", "",
                 "[attribution]", 'jobs_from = "procscan"', ""]
        for name, tier in self.clusters.items():
            lines += [f"[clusters.{name}]", f'tier = "{tier}"', ""]
        return "\n".join(lines) + ("\n" + self.extra_config if self.extra_config else "")

    def start(self, timeout_s: float = 30.0) -> GreendDaemon:
        cfg = self.workdir / "greend.toml"
        cfg.write_text(self.config_text())
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GREEND_", "SLURM_"))}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from greend.cli import main; sys.exit(main())",
                 "-c", str(cfg), "--state-dir", str(self.workdir / "state"),
                 "run", "--listen", self.target, "--socket", str(self.socket or "")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if "greend_samples_total" in self.metrics():
                    return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"greend run did not serve /metrics; its log:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def __enter__(self) -> GreendDaemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return log_tail(self.log_path)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.target}/metrics", timeout=5) as r:
            return r.read().decode()


def scrape_config(daemons: list[GreendDaemon], job_name: str = "greend-nodes") -> dict:
    """One scrape job for these daemons, each with the `tier` target label the dashboards expect."""
    return {"job_name": job_name,
            "static_configs": [{"targets": [d.target], "labels": {"tier": d.clusters[d.cluster]}}
                               for d in daemons]}
