"""The built wheel, installed into a clean venv with no checkout on the path, is what an admin gets
(issue 16): small enough for a diskless node image, with its reference data, its admin files
(`greend share`), shell completion and a man page, the config in /etc found, and /metrics served."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from daemonproc import free_port, request, toml, wait_for

ROOT = Path(__file__).resolve().parents[1]
NODE_INSTALL_LIMIT_MB = 60

pytestmark = pytest.mark.slow


def run(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 600)
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{argv}: {r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, clean environment) with greend installed from its wheel."""
    tmp = tmp_path_factory.mktemp("install")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(ROOT)])
    wheel = next((tmp / "dist").glob("greend-*.whl"))
    run([sys.executable, "-m", "venv", str(tmp / "venv")])
    run([str(tmp / "venv" / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GREEND_", "PYTHON", "VIRTUAL_ENV", "XDG_CONFIG"))}
    env["HOME"] = str(tmp / "home")
    env["GREEND_SYSCONFDIR"] = str(tmp / "etc")
    return tmp / "venv", env, tmp


def greend(installed, *args: str) -> subprocess.CompletedProcess:
    venv, env, tmp = installed
    return run([str(venv / "bin" / "greend"), *args], env=env, cwd=tmp, timeout=120)


def test_node_install_is_small_and_carries_its_reference_data(installed):
    venv, env, tmp = installed
    code = (
        "import importlib.metadata as m, json, greend, greend.refdata as r\n"
        "sizes = {}\n"
        "for d in m.distributions():\n"
        "    n = d.metadata['Name'].lower()\n"
        "    if n in ('pip', 'setuptools'): continue\n"  # the venv's own tools, not greend's
        "    sizes[n] = sum(f.locate().stat().st_size for f in d.files or [] if f.locate().exists())\n"
        "print(json.dumps({'sizes': sizes, 'file': greend.__file__,\n"
        "                  'codecarbon': r.codecarbon_version(), 'fra': r.country_mix('FRA').source}))\n"
    )
    d = json.loads(run([str(venv / "bin" / "python"), "-c", code], env=env, cwd=tmp).stdout)
    total_mb = sum(d["sizes"].values()) / 1e6
    print(f"node install: {total_mb:.1f} MB in {len(d['sizes'])} distributions")
    assert total_mb < NODE_INSTALL_LIMIT_MB, sorted(d["sizes"].items(), key=lambda kv: -kv[1])[:8]
    assert "codecarbon" not in d["sizes"] and "psutil" not in d["sizes"]
    assert d["file"].startswith(str(venv))  # the installed copy, not the checkout
    assert d["codecarbon"] != "unknown" and f"CodeCarbon {d['codecarbon']}" in d["fra"]


def test_admin_files_ship_with_the_wheel(installed):
    venv = installed[0]
    share = Path(greend(installed, "share", "--path").stdout.strip())
    assert share.is_relative_to(venv)
    for rel in ("packaging/greend.service", "packaging/greend-controller.service",
                "examples/greend-node.toml", "examples/greend-controller.toml",
                "dashboards/greend-footprints.json", "dashboards/prometheus/rules/greend-alerts.yml",
                "dashboards/prometheus/rules/greend-recording.yml",
                "dashboards/grafana/provisioning/datasources/greend.yaml"):
        assert (share / rel).is_file(), rel
    assert Path(greend(installed, "share", "systemd").stdout.strip()) == share / "packaging"
    dest = installed[2] / "copy"
    assert "copied" in greend(installed, "share", "--copy", str(dest)).stdout
    assert (dest / "packaging" / "greend.service").read_bytes() == \
        (ROOT / "packaging" / "greend.service").read_bytes()
    assert not list(dest.rglob("*.py"))
    # the rules generator runs from the install, for a site's own selector
    out = installed[2] / "rules"
    run([str(venv / "bin" / "python"), "-m", "greend.files.dashboards.rules", "--selector",
         'job="hpc-energy"', "--out", str(out)], env=installed[1], cwd=installed[2])
    assert 'up{job="hpc-energy"} == 0' in (out / "greend-alerts.yml").read_text()
    venv_, env, _ = installed
    again = subprocess.run([str(venv_ / "bin" / "greend"), "share", "--copy", str(dest)],
                           capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 2 and "not overwriting" in again.stderr


def test_completion_and_man_page_from_the_installed_command(installed):
    script = installed[2] / "greend.bash"
    script.write_text(greend(installed, "completion", "bash").stdout)
    run(["bash", "-n", str(script)])

    def complete(*words: str) -> set[str]:
        words_sh = " ".join(f"'{w}'" for w in ("greend", *words))
        r = run(["bash", "-c", f"source {script}; COMP_WORDS=({words_sh}); "
                 f"COMP_CWORD={len(words)}; _greend; printf '%s\\n' \"${{COMPREPLY[@]}}\""])
        return set(r.stdout.split())

    assert complete("con") == {"config", "controller"}
    assert complete("config", "") >= {"check", "--help"}
    assert "--no-ledger" in complete("measure", "--no")
    assert complete("jobs", "--state", "") == {"running", "ended"}
    assert complete("completion", "") >= {"bash", "zsh"}
    assert greend(installed, "completion", "zsh").stdout.startswith("#compdef greend")

    page = installed[2] / "greend.1"
    page.write_text(greend(installed, "man").stdout)
    text = page.read_text()
    assert text.startswith(".TH GREEND 1")
    for section in (".SH NAME", ".SH SYNOPSIS", ".SH COMMANDS", ".SH OPTIONS"):
        assert section in text
    for cmd in ("measure", "config check", "jobs", "run", "controller", "route", "tui", "share"):
        assert f"\\fBgreend {cmd}\\fR" in text, cmd
    if shutil.which("groff"):
        r = run(["groff", "-man", "-ww", "-z", str(page)])
        assert r.stderr == "", r.stderr  # no roff warnings
        out = run(["groff", "-man", "-Tutf8", str(page)]).stdout
        assert "greend config check" in out


def test_installed_greend_finds_etc_config_and_serves_metrics(installed):
    venv, env, tmp = installed
    port = free_port()
    etc = tmp / "etc" / "greend"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "greend.toml").write_text(toml({
        "node": "n-installed", "cluster": "jz", "state_dir": str(tmp / "state"),
        "sampling": {"interval_s": 0.5, "checkpoint_interval_s": 1.0},
        "attribution": {"jobs_from": "procscan"}, "power": {"rapl": False},
        "daemon": {"listen": f"127.0.0.1:{port}"},
        "clusters": {"jz": {"pue": 1.2}},
    }))
    d = json.loads(greend(installed, "config", "check", "--json").stdout)
    assert d["resolved"]["config_file"] == {"path": str(etc / "greend.toml"),
                                            "why": "system configuration"}
    log = (tmp / "run.log").open("wb")
    p = subprocess.Popen([str(venv / "bin" / "greend"), "run", "--socket", ""], env=env, cwd=tmp,
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def metrics():
            assert p.poll() is None, (tmp / "run.log").read_text()
            status, headers, body = request(port, "GET", "/metrics", timeout=2)
            return status == 200 and "greend_" in body.decode() and (headers, body.decode())
        headers, body = wait_for(metrics, 30, what="/metrics of the installed greend")
        assert 'cluster="jz"' in body
        # standard process metrics, and the exposition header docs/api.md states
        assert "\nprocess_cpu_seconds_total " in body and "greend_process_" not in body
        ctype = {k.lower(): v for k, v in headers.items()}["content-type"]
        assert f"`Content-Type: {ctype}`" in " ".join((ROOT / "docs" / "api.md").read_text().split())
        # As Prometheus scrapes: gzip, and OpenMetrics when asked; promtool and the strict
        # OpenMetrics parser accept what the installed greend serves.
        import gzip

        from prometheus_client.openmetrics.parser import text_string_to_metric_families

        status, headers, gz = request(port, "GET", "/metrics", timeout=5, headers={
            "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            "Accept-Encoding": "gzip"})
        h = {k.lower(): v for k, v in headers.items()}
        assert status == 200 and h["content-encoding"] == "gzip"
        assert h["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        om = gzip.decompress(gz).decode()
        assert om.endswith("# EOF\n") and "greend_node_energy_joules" in {
            f.name for f in text_string_to_metric_families(om)}
        promtool = shutil.which("promtool")
        if promtool:
            r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                               text=True, timeout=30)
            assert (r.returncode, r.stdout + r.stderr) == (0, "")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        log.close()
    assert p.returncode == 0, (tmp / "run.log").read_text()
