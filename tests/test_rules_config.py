"""The Prometheus rules are generated from dashboards/rules.py: the committed files are up to date, a
site's own job selector reaches every query, every alert links to its runbook section, and none
pages (issue 16)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dashboards import rules

ROOT = Path(__file__).resolve().parents[1]
PROMTOOL = shutil.which("promtool")


def test_committed_rules_are_what_the_templates_render():
    r = subprocess.run([sys.executable, "-m", "dashboards.rules", "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def exprs(text: str) -> list[str]:
    out, cur = [], None
    for line in text.splitlines():
        m = re.match(r"\s+expr: (>-)?(.*)", line)
        if m:
            cur = [m[2]]
            out.append(cur)
        elif cur is not None and re.match(r"\s{10,}\S", line) and ":" not in line.split()[0]:
            cur.append(line.strip())
        else:
            cur = None
    return [" ".join(p).strip() for p in out]


def test_a_sites_selector_reaches_every_raw_series():
    sel = 'job="hpc-greend", site="north"'
    texts = rules.render({"selector": sel})
    n = 0
    for text in texts.values():
        for e in exprs(text):
            # every raw metric (not a recording rule's level:metric:op) is selected
            for m in re.finditer(r"(?<![:\w])(up|greend_[a-z_]+)(?![:\w])(\{[^}]*\})?", e):
                assert m[2] == "{" + sel + "}", f"{m[0]} in {e}"
                n += 1
    assert n > 20
    assert 'job=~"greend.*"' not in "".join(texts.values())


@pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian package prometheus)")
def test_rendered_with_other_settings_the_rules_still_check(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dashboards.rules", "--selector", 'job="hpc-greend"',
                        "--budget-severity", "info", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([PROMTOOL, "check", "rules", *sorted(map(str, tmp_path.glob("*.yml")))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "severity: info" in (tmp_path / "greend-alerts.yml").read_text().split(
        "GreendBudgetExhausted")[1].split("- alert:")[0]


def test_selector_with_braces_is_refused_clearly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dashboards.rules", "--selector", '{job="x"}',
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "without braces" in r.stderr and not list(tmp_path.iterdir())


def test_every_alert_has_a_runbook_section_and_none_pages():
    text = (ROOT / "dashboards/prometheus/rules/greend-alerts.yml").read_text()
    alerts = re.findall(r"- alert: (\w+)", text)
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {h.lower() for h in re.findall(r"^## (\w+)$", runbook, re.M)}
    links = re.findall(r"runbook_url: \S+/docs/runbook\.md#(\w+)", text)
    assert links == [a.lower() for a in alerts]
    assert set(links) <= anchors
    assert "critical" not in re.findall(r"severity: (\w+)", text)


def test_no_recording_rule_reads_a_day_of_per_job_series():
    text = (ROOT / "dashboards/prometheus/rules/greend-recording.yml").read_text()
    for e in exprs(text):
        if re.search(r"\[1d", e):
            assert not re.search(r"greend_job_\w+_total", e), e
