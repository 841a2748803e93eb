"""bench/loadgen.py against a real `greend controller`: what it reports as stored is what the
controller counts as received, it spreads agents over several URLs, and bad arguments get a clear
error. (Its figures are in docs/performance.md; this checks the tool, not the speed.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from daemonproc import Greend, metric_value, token_file

LOADGEN = Path(__file__).resolve().parent.parent / "bench" / "loadgen.py"
TOKEN = "loadgen-test-token-0123456789"


def loadgen(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LOADGEN), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_loadgen_figures_match_what_two_controllers_received(tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    ctls = [Greend(tmp_path / f"c{i}", command="controller",
                   args=["--socket", "", "--token-file", str(tok)]) for i in range(2)]
    with ctls[0], ctls[1]:
        for c in ctls:
            c.start()
        r = loadgen("--url", f"http://127.0.0.1:{ctls[0].port}", "--url",
                    f"http://127.0.0.1:{ctls[1].port}/", "--token-file", str(tok), "--agents", "300",
                    "--speedup", "60", "--duration", "4", "--connections", "8", "--job-s", "120",
                    "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["errors"] == {} and out["batches"] > 300, out
        received = [metric_value(c.metrics(), "greend_controller_records_received_total") for c in ctls]
        assert all(n > 0 for n in received), received  # agents spread over both URLs
        assert sum(received) == out["records_stored"] == out["accepted"] + out["stale"]
        # Jobs of 2 simulated minutes at x60 for 4 s: each slot ended at least once, and its final
        # record is stored as ended.
        ended = sum(len(c.rows("SELECT 1 FROM jobs WHERE state = 'ended'")) for c in ctls)
        assert ended >= 300 * 4, ended
        assert out["latency_p99_s"] >= out["latency_p50_s"] > 0
        for c in ctls:
            assert c.stop() == 0


def test_loadgen_refuses_bad_arguments(tmp_path):
    r = loadgen("--agents", "10")
    assert r.returncode == 2 and "give --url (one or more) or --start-controller" in r.stderr
    r = loadgen("--url", "http://127.0.0.1:1", "--agents", "0", "--token-file", "x")
    assert r.returncode == 2 and "--agents: expected at least 1" in r.stderr
    r = loadgen("--url", "http://127.0.0.1:1", "--token-file", str(tmp_path / "none"))
    assert r.returncode == 2 and f"--token-file {tmp_path / 'none'}" in r.stderr
    assert "--speedup" in loadgen("--help").stdout
