"""greend.track outside Slurm: self-sampling in a background thread, phases, the run in the user's
ledger (`greend jobs --json`), the decorator forms, and errors that degrade instead of raising."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fixtures import make_rapl, write_in_place

GREEND = str(Path(sys.executable).with_name("greend"))
HEAVY = ("pydantic", "textual", "prometheus_client", "greend.daemon", "greend.notebook",
         "greend.integrations", "greend.config", "greend.monitor", "h11")


def _env(tmp_path: Path, **kw) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "GREEND_STATE_DIR": str(tmp_path / "state"), **kw}


def _py(tmp_path: Path, code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=_env(tmp_path, **env), timeout=120)


def check_schema(d: dict) -> None:
    """d is a valid job-footprint record (greend/data/job-footprint.schema.json)."""
    jsonschema = pytest.importorskip("jsonschema")
    from greend import report

    jsonschema.Draft202012Validator(json.loads(report.schema_path().read_text())).validate(d)


def _jobs(tmp_path: Path) -> list[dict]:
    r = subprocess.run([GREEND, "jobs", "--json"], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_import_greend_is_light_and_resolves_the_api_lazily(tmp_path):
    r = _py(tmp_path, f"""
        import sys, time
        t = time.perf_counter()
        import greend
        run = greend.track("x")
        dt = time.perf_counter() - t
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        import greend.track as mod
        print(dt, heavy, greend.Run is mod.Run, greend.Footprint is mod.Footprint,
              greend.Phase is mod.Phase, callable(greend.track), type(run).__name__)
    """)
    assert r.returncode == 0, r.stderr
    dt, rest = r.stdout.split(" ", 1)
    assert rest.strip() == "[] True True True True Run"
    assert float(dt) < 0.5  # the bench records the figure (docs/performance.md); here: no regression
    r = _py(tmp_path, "import greend; greend.nothing_here")
    assert "module 'greend' has no attribute 'nothing_here'" in r.stderr


SCRIPT = """
    import json, subprocess, sys, time
    import greend

    def busy(s):
        t = time.process_time()
        while time.process_time() - t < s:
            pass

    with greend.track("finetune", project="imaging", interval_s=0.5) as run:
        with run.phase("train") as p:
            busy(0.6)
            # a child's CPU time is the run's too
            subprocess.run([sys.executable, "-c",
                            "import time\\nt = time.process_time()\\n"
                            "while time.process_time() - t < 0.6: pass"], check=True)
        assert p.ended and run.current_phase is None
        run.phase("eval")
        busy(0.3)
        print("MARK", flush=True)
        time.sleep({hold})
    fp = run.footprint
    print(json.dumps({{"run": fp.to_dict(), "elapsed": fp.elapsed_s, "it": fp.it_energy_j,
                      "source": fp.source, "degraded": fp.degraded,
                      "phases": [[q.name, q.footprint.it_energy_j, q.footprint.carbon_g,
                                  q.footprint.elapsed_s, q.footprint.cpu_time_s]
                                 for q in run.phases],
                      "phase_dicts": [q.footprint.to_dict() for q in run.phases],
                      "again": run.stop() == fp}}))
"""


def test_a_run_outside_slurm_is_recorded_in_the_ledger_with_its_phases(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT.format(hold=3))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(tmp_path))
    try:
        assert p.stdout.readline().strip() == "MARK"
        # While it runs, `greend jobs` shows it, named, running (written every 2 s).
        deadline = time.monotonic() + 10
        while True:
            live = [j for j in _jobs(tmp_path) if j["job"]["name"] == "finetune"]
            if live and live[0].get("phases") and len(live[0]["phases"]) == 2:
                break
            assert time.monotonic() < deadline, live
            time.sleep(0.3)
        assert live[0]["job"]["state"] == "running"
        assert live[0]["phases"][1]["end"] is None  # eval is still open
        check_schema(live[0])
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    d = json.loads(out.splitlines()[-1])
    assert d["source"] == "self" and d["degraded"] == [] and d["again"]
    assert d["run"]["job"]["account"] == "imaging" and d["run"]["job"]["state"] == "ended"
    check_schema(d["run"])
    assert d["run"]["track"]["run"] == "finetune" and d["run"]["track"]["phase"] is None
    for pd in d["phase_dicts"]:
        check_schema(pd)
    assert [pd["track"]["phase"] for pd in d["phase_dicts"]] == ["train", "eval"]
    names = [ph[0] for ph in d["phases"]]
    assert names == ["train", "eval"]
    # Phases are contiguous from the run's first boundary to its stop: they sum to the run's
    # books over their span, which is the run's but for the instant before the first phase.
    assert sum(ph[1] for ph in d["phases"]) == pytest.approx(d["it"], rel=0.05)
    # train did 1.2 CPU-s (with its child's), eval 0.3: the work is where it was done (energy
    # alone would not say it: eval's 3 s hold carries the node's idle share for 3 s).
    assert d["phases"][0][4] > 2 * d["phases"][1][4] > 0, d["phases"]
    assert d["phases"][0][1] > 0 and d["phases"][1][1] > 0
    jobs = [j for j in _jobs(tmp_path) if j["job"]["name"] == "finetune"]
    assert len(jobs) == 1
    rec = jobs[0]
    check_schema(rec)
    assert rec["job"]["state"] == "ended" and rec["job"]["account"] == "imaging"
    assert rec["job"]["kind"] == "command" and "python" in rec["job"]["command"]
    # This process's CPU time and its child's: 0.6 + 0.6 + 0.3 s of busy loops.
    assert 1.4 <= rec["cpu_time_s"] <= 3.5
    assert rec["energy_j"]["it"] == pytest.approx(d["it"], rel=1e-3)
    stored = rec["phases"]
    assert [s["name"] for s in stored] == ["train", "eval"]
    assert all(s["end"] is not None for s in stored)
    assert 0 <= stored[1]["start"] - stored[0]["end"] < 0.1  # `with` ended train, then eval began
    for s, ph in zip(stored, d["phases"], strict=True):
        e = s["energy_j"]
        assert e["it"] == pytest.approx(ph[1], rel=1e-6)
        assert s["carbon_g"] == pytest.approx(ph[2], rel=1e-6)
        assert e["it"] == pytest.approx(e["cpu"] + e["dram"] + e["gpu"] + e["memory"])
    # `greend jobs CLUSTER/ID` shows the phases under the report.
    r = subprocess.run([GREEND, "jobs", f"{rec['job']['cluster']}/{rec['job']['job_id']}"],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    table = r.stdout[r.stdout.index("\nPhases\n"):].splitlines()
    assert [line.split()[0] for line in table[3:]] == ["train", "eval"]
    f = rec["factors"][0]
    assert stored[0]["carbon_g"] == pytest.approx(
        stored[0]["energy_j"]["it"] / 3.6e6 * f["pue"] * f["carbon_intensity_g_per_kwh"], rel=1e-6)


def test_decorator_forms_make_one_run_per_call(tmp_path):
    r = _py(tmp_path, """
        import json, greend

        @greend.track
        def bare(x):
            return x * 2

        @greend.track("named", project="p1", record=True)
        def named():
            return "ok"

        out = [bare(21), named(), named()]
        runs = [bare.last_run, named.last_run]
        print(json.dumps({"out": out, "names": [r.name for r in runs],
                          "final": [r.footprint.end is not None for r in runs],
                          "wrapped": bare.__name__}))
    """)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["out"] == [42, "ok", "ok"]
    assert d["names"] == ["bare", "named"] and d["final"] == [True, True]
    assert d["wrapped"] == "bare"
    names = sorted(j["job"]["name"] for j in _jobs(tmp_path))
    assert names == ["bare", "named", "named"]
    assert {j["job"]["account"] for j in _jobs(tmp_path) if j["job"]["name"] == "named"} == {"p1"}


def test_a_failing_counter_degrades_and_never_raises(tmp_path, monkeypatch, caplog):
    import greend

    rapl = make_rapl(tmp_path / "sys", packages=1, dram=False, mmio=False, psys=False)
    cfg = tmp_path / "greend.toml"
    cfg.write_text(f'[paths]\nsysfs = "{tmp_path / "sys"}"\n')
    monkeypatch.setenv("GREEND_CONFIG", str(cfg))
    caplog.set_level(logging.WARNING, logger="greend")
    run = greend.track("flaky", interval_s=0.2, state_dir=tmp_path / "state")
    with run:
        with run.phase("good") as good:
            for _ in range(3):  # busy, so that the run has a share of the package's energy
                rapl.advance("package-0", 3_000_000)
                t = time.process_time()
                while time.process_time() - t < 0.15:
                    pass
        assert good.footprint.energy_by_source_j["cpu"] > 0
        assert good.footprint.degraded == []
        assert good.footprint.provenance.startswith(("measured", "mixed"))
        run.phase("bad")
        write_in_place(rapl.files["package-0"], "garbage\n")  # the counter now fails to read
        time.sleep(0.5)
    fp = run.footprint
    assert fp.degraded and "rapl" in fp.degraded[0]
    assert "degraded" in fp.provenance
    warnings = [r for r in caplog.records if r.name == "greend"]
    assert len(warnings) == 1 and "flaky" in warnings[0].getMessage()
    # The run still ended, with what was measured before the failure.
    assert fp.end is not None and fp.energy_by_source_j["cpu"] > 0
    assert run.stop() == fp  # idempotent
    after = run.phase("after stop")  # degrades, does not raise
    assert after.ended and after.footprint.it_energy_j == 0
    # Recorded in the ledger of the state_dir given, with both phases, not elsewhere.
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    (state,), = db.execute("SELECT state FROM jobs WHERE name = 'flaky'").fetchall()
    names = [r[0] for r in db.execute("SELECT name FROM job_phases ORDER BY seq")]
    db.close()
    assert state == "ended" and names == ["good", "bad"]


def test_nothing_to_measure_still_runs_the_code(tmp_path, monkeypatch, caplog):
    import greend

    cfg = tmp_path / "bad.toml"
    cfg.write_text("[sampling]\ninterval_s = -1\n")  # an invalid configuration
    monkeypatch.setenv("GREEND_CONFIG", str(cfg))
    with greend.track("nocfg", state_dir=tmp_path / "state") as run:
        p = run.phase("work")
        x = sum(range(1000))
    assert x == 499500
    fp = run.footprint
    assert fp.it_energy_j == 0 and fp.degraded and "interval_s" in fp.degraded[0]
    assert p.ended and fp.end is not None


def test_a_run_left_open_ends_at_exit_and_phase_names_are_bounded(tmp_path):
    r = _py(tmp_path, """
        import greend
        run = greend.track("left-open")
        run.start()
        run.phase("x" * 500)
        run.phase("tab\\there\\nnewline")
        print(run.phases[0].name == "x" * 200, run.phases[1].name)
    """)  # no stop(): the interpreter's exit ends the run
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True tab here newline"
    rec, = [j for j in _jobs(tmp_path) if j["job"]["name"] == "left-open"]
    assert rec["job"]["state"] == "ended" and rec["job"]["exit_code"] == 0
    assert [p["name"] for p in rec["phases"]] == ["x" * 200, "tab here newline"]
    assert all(p["end"] is not None for p in rec["phases"])
    check_schema(rec)



def test_a_long_run_keeps_a_bounded_series_as_measure_does(tmp_path):
    # 0.05 s sampling for 7 s is more than measure.MAX_POINTS (120) points: the stored series
    # moves to the next coarser step (1 s), the part already stored merged into it.
    r = _py(tmp_path, """
        import time, greend
        with greend.track("long", interval_s=0.05):
            time.sleep(7)
    """)
    assert r.returncode == 0, r.stderr
    rec, = [j for j in _jobs(tmp_path) if j["job"]["name"] == "long"]
    assert rec["series_step_s"] == 1
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    n, = db.execute("SELECT COUNT(*) FROM job_series").fetchone()
    db.close()
    assert 0 < n <= 12
