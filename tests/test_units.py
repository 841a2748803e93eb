"""The systemd units pass `systemd-analyze verify`, use the readiness/watchdog protocol greend speaks,
run the controller without root, and keep the security scores docs/admin.md records."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = ("greend.service", "greend-controller.service")
GREEND = Path(sys.executable).with_name("greend")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="needs systemd-analyze (Debian package systemd)")


def unit_copy(tmp_path: Path, name: str) -> Path:
    # The units run /usr/local/bin/greend; verify checks that ExecStart exists: point it at ours.
    text = (ROOT / "packaging" / name).read_text()
    assert "ExecStart=/usr/local/bin/greend " in text
    dest = tmp_path / name
    dest.write_text(text.replace("/usr/local/bin/greend", str(GREEND)))
    return dest


def directives(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (ROOT / "packaging" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_units_pass_systemd_analyze_verify(tmp_path):
    paths = [unit_copy(tmp_path, n) for n in UNITS]
    r = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr  # not even a warning


def test_a_broken_unit_fails_verify(tmp_path):
    # The check above is only worth something if verify does reject a bad unit.
    bad = unit_copy(tmp_path, "greend.service")
    bad.write_text(bad.read_text().replace("Type=notify", "Type=notifyy"))
    r = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert "notifyy" in r.stderr


@pytest.mark.parametrize("name", UNITS)
def test_units_are_notify_with_a_watchdog(name):
    d = directives(name)
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert int(d["WatchdogSec"][0]) >= 30


def test_controller_runs_without_root_and_gets_its_token_as_a_credential():
    d = directives("greend-controller.service")
    assert d["DynamicUser"] == ["yes"]
    assert d["LoadCredential"] == ["token:/etc/greend/site.token"]
    assert "--token-file %d/token" in d["ExecStart"][0]
    assert d["CapabilityBoundingSet"] == [""]


def documented_scores() -> dict[str, float]:
    text = (ROOT / "docs" / "admin.md").read_text()
    return {m[1]: float(m[2]) for m in re.finditer(r"^\| (greend[\w-]*\.service) \| ([\d.]+) ", text,
                                                     re.MULTILINE)}


@pytest.mark.parametrize("name", UNITS)
def test_security_score_matches_docs(tmp_path, name):
    path = unit_copy(tmp_path, name)
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    print(f"{name}: exposure {m[1]}")
    assert documented_scores()[name] == float(m[1]), "update the table in docs/admin.md"
