"""The `%%greend` cell magic through a real IPython InteractiveShell: `%load_ext greend`, a cell
measured, its footprint printed (and as JSON with --json)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("IPython", reason="IPython is not installed (pip install -e '.[integrations-test]')")

from integrations_util import greend_env
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

CELL = "total = sum(i * i for i in range(300_000))\n"


@pytest.fixture
def ip(monkeypatch, tmp_path):
    greend_env(monkeypatch, tmp_path)
    shell = InteractiveShell.instance()
    result = shell.run_line_magic("load_ext", "greend")
    assert result is None
    yield shell
    InteractiveShell.clear_instance()


def run(ip, source: str):
    with capture_output() as out:
        result = ip.run_cell(source)
    return result, out.stdout


def test_cell_magic_runs_the_cell_and_prints_its_footprint(ip):
    result, text = run(ip, f"%%greend squares --project tests\n{CELL}")
    assert result.success, result.error_in_exec
    assert ip.user_ns["total"] == sum(i * i for i in range(300_000))  # the cell ran, in the user's namespace
    fp = ip.user_ns["_greend"]
    assert fp.name == "squares" and fp.it_energy_j > 0
    lines = text.strip().splitlines()
    assert lines[0].startswith("greend: squares: ") and f"source {fp.source}" in lines[0]
    assert lines[1].lstrip().startswith("energy") and "IT " in lines[1] and "facility " in lines[1]
    assert "CO2e" in lines[2]
    assert "on-site" in lines[3] and "off-site" in lines[3]


def test_json_option_prints_the_job_footprint_schema(ip):
    jsonschema = pytest.importorskip("jsonschema")
    from greend.report import schema_path

    _, text = run(ip, f"%%greend --json\n{CELL}")
    record = json.loads(text)
    jsonschema.validate(record, json.loads(schema_path().read_text()))
    assert record["energy_j"]["it"] == pytest.approx(ip.user_ns["_greend"].it_energy_j)


def test_a_failing_cell_still_prints_its_footprint_and_fails(ip):
    result, text = run(ip, "%%greend\nx = 1\n1 / 0\n")
    assert not result.success
    assert "greend: cell: " in text
    assert ip.user_ns["x"] == 1


def test_bad_options_say_what_is_expected(ip):
    result, _ = run(ip, "%%greend --bogus\nran = True\n")
    assert not result.success and "ran" not in ip.user_ns
    assert "unrecognized arguments: --bogus" in str(result.error_in_exec)
    assert "usage: %%greend [NAME] [--project PROJECT] [--json]" in str(result.error_in_exec)
