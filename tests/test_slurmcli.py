"""The one Slurm client (collectors/slurmcli.py): command runner and Slurm-JSON numbers."""

from __future__ import annotations

import os
import time

import pytest
from greend.collectors import slurmcli


@pytest.mark.parametrize(("v", "want"), [
    (5, 5), (2.5, 2.5), ("7", 7.0),
    ({"set": True, "infinite": False, "number": 12}, 12),
    ({"set": False, "infinite": False, "number": 0}, None),
    ({"set": True, "infinite": True, "number": 0}, None),
    ({"set": True}, None), (None, None), (True, None), ("n/a", None), ([1], None),
])
def test_number_reads_every_slurm_json_spelling(v, want):
    assert slurmcli.number(v) == want
    assert slurmcli.number(v, 0) == (0 if want is None else want)


@pytest.mark.parametrize(("answer", "want"), [
    # 22.05 without a controller (exit status 0)
    ({"errors": [{"description": "Failed while looking for jobs", "error_number": -1,
                  "error": "Unspecified error", "source": "slurm_load_jobs"}], "jobs": []},
     "Failed while looking for jobs (slurm_load_jobs: Unspecified error)"),
    ({"errors": [{"error": "Unspecified error", "errno": -1}], "jobs": []}, "Unspecified error"),
    ({"errors": ["plain text"], "jobs": []}, "plain text"),
    ({"errors": [], "jobs": []}, None),  # an empty queue
    ({"errors": [{"error": "a warning"}], "jobs": [{"job_id": 1}]}, None),  # warnings beside data
    ({"nodes": []}, "no 'jobs' list in the answer"),
    ([], "no 'jobs' list in the answer"),
])
def test_json_failure_tells_an_error_from_an_empty_answer(answer, want):
    assert slurmcli.json_failure(answer, "jobs") == want


def test_a_timeout_kills_the_command_and_what_it_started(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = tmp_path / "squeue"
    # A wrapper whose child keeps the pipes open: killing the wrapper alone would hang communicate.
    script.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\nwait\n")
    script.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"squeue did not answer within 0\.5 s"):
        slurmcli.run([str(script), "--json"], env=None, timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    child = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the command's child {child} survived the timeout")


def test_exit_status_output_and_missing_commands(tmp_path):
    script = tmp_path / "sbatch"
    script.write_text("#!/bin/sh\necho out\necho 'sbatch: error: Batch job submission failed: "
                      "Invalid account' >&2\nexit 1\n")
    script.chmod(0o755)
    r = slurmcli.run([str(script)], env={"PATH": "/usr/bin:/bin"}, timeout_s=10)
    assert (r.returncode, r.stdout) == (1, "out\n")
    assert slurmcli.first_error(r.stderr) == "Batch job submission failed: Invalid account"
    assert slurmcli.run([str(tmp_path / "nope")], env=None, timeout_s=1).returncode == 127
    assert slurmcli.first_error("") == "no output"
