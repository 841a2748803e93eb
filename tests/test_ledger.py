"""The SQLite ledger: migrations, idempotent checkpoints, clear errors on unusable paths."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from greend.footprint import Factors
from greend.ledger import MIGRATIONS, JobRow, Ledger, LedgerError


def job(**kw) -> JobRow:
    base = dict(cluster="c1", job_id="42", node="n1", kind="slurm", state="running",
                first_seen=100.0, last_seen=160.0, user="alice", uid=1000, cpu_uj=5_000_000,
                carbon_g=1.5, provenance={"cpu": "measured: RAPL powercap"}, meta={"key": "slurm/c1/42"})
    base.update(kw)
    return JobRow(**base)


def test_migrations_set_user_version_and_create_tables(tmp_path):
    led = Ledger(tmp_path / "state" / "ledger.sqlite")
    try:
        assert led.schema_version == len(MIGRATIONS)
        tables = {r[0] for r in led.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"jobs", "job_series", "factor_sets", "node_totals", "node_series", "counters"} <= tables
        assert led.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        led.close()


def test_reopening_is_idempotent(tmp_path):
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    with led.transaction() as db:
        led.upsert_job(db, job())
    led.close()
    for _ in range(2):
        led = Ledger(path)
        assert led.schema_version == len(MIGRATIONS)
        assert len(led.get_job("c1", "42")) == 1
        led.close()


def test_upsert_is_idempotent_and_keeps_first_seen(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    try:
        row = job()
        for _ in range(3):  # a replayed checkpoint writes the same absolute totals
            with led.transaction() as db:
                pk = led.upsert_job(db, row)
        (stored,) = led.get_job("c1", "42")
        assert stored.pk == pk
        assert stored.cpu_uj == 5_000_000 and stored.carbon_g == 1.5
        assert stored.provenance == {"cpu": "measured: RAPL powercap"}
        later = job(first_seen=999.0, last_seen=220.0, cpu_uj=7_000_000, state="ended", end_time=221.0)
        with led.transaction() as db:
            assert led.upsert_job(db, later) == pk
        (stored,) = led.get_job("c1", "42")
        assert (stored.first_seen, stored.last_seen, stored.cpu_uj, stored.state) == (
            100.0, 220.0, 7_000_000, "ended")
        # a job with the same id submitted again (id reuse) is another row
        with led.transaction() as db:
            led.upsert_job(db, job(submit_time=12345))
        assert len(led.get_job("c1", "42")) == 2
    finally:
        led.close()


def test_series_and_factor_sets_replayed_do_not_double_count(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    try:
        f = Factors(1.2, 0.1, 1.6, 56.0, {"pue": "measured"})
        for _ in range(2):
            with led.transaction() as db:
                pk = led.upsert_job(db, job())
                led.put_factor_set(db, f.key(), f, 100.0)
                led.put_series(db, [(pk, 120.0, 170.0, f.key(), 5_000_000, 0, 0, 0, 10**9, 1.5, 0.1, 0.2)])
                led.put_node_totals(db, "n1", [("package-0", "cpu", "measured", 9_000_000, 4_000_000, 0)])
                led.put_counters(db, "n1", 170.0, {"boot_id": "b", "counters": {"package-0": 1}})
        (s,) = led.series(pk)
        assert s["cpu_uj"] == 5_000_000 and s["carbon_intensity_g_per_kwh"] == 56.0
        (fs,) = led.factor_sets_of(pk)
        assert fs["sources"] == {"pue": "measured"}
        (nt,) = led.node_totals("n1")
        assert nt["energy_uj"] == 9_000_000
        assert led.counters("n1") == (170.0, {"boot_id": "b", "counters": {"package-0": 1}})
    finally:
        led.close()


def test_a_failed_checkpoint_leaves_the_previous_one_intact(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    try:
        with led.transaction() as db:
            led.upsert_job(db, job())
        with pytest.raises(RuntimeError), led.transaction() as db:
            led.upsert_job(db, job(cpu_uj=99))
            raise RuntimeError("crash in the middle of a checkpoint")
        assert led.get_job("c1", "42")[0].cpu_uj == 5_000_000
    finally:
        led.close()


def test_queries(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    try:
        with led.transaction() as db:
            led.upsert_job(db, job())
            led.upsert_job(db, job(job_id="43", user="bob", state="ended", last_seen=300.0))
        assert [j.job_id for j in led.running_jobs("n1")] == ["42"]
        assert [j.job_id for j in led.jobs(user="bob")] == ["43"]
        assert [j.job_id for j in led.jobs()] == ["43", "42"]  # newest first
        assert led.jobs(since=200.0)[0].job_id == "43"
        d = led.jobs(user="alice")[0].to_dict()
        assert d["it_energy_j"] == 5.0 and "pk" not in d
    finally:
        led.close()


def test_readonly_open_of_a_missing_ledger(tmp_path):
    path = tmp_path / "nowhere" / "ledger.sqlite"
    with pytest.raises(LedgerError, match="no ledger here") as e:
        Ledger(path, readonly=True)
    assert str(path) in str(e.value)
    assert not path.parent.exists()  # a reader creates nothing


def test_readonly_ledger_refuses_writes(tmp_path):
    Ledger(tmp_path / "ledger.sqlite").close()
    ro = Ledger(tmp_path / "ledger.sqlite", readonly=True)
    try:
        assert ro.schema_version == len(MIGRATIONS)
        with pytest.raises(sqlite3.OperationalError):
            ro.db.execute("DELETE FROM jobs")
    finally:
        ro.close()


@pytest.mark.parametrize("readonly", [False, True])
def test_newer_schema_asks_to_upgrade_greend(tmp_path, readonly):
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="upgrade greend") as e:
        Ledger(path, readonly=readonly)
    assert str(path) in str(e.value)


def test_not_a_database(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="cannot open ledger"):
        Ledger(path)


@pytest.mark.parametrize("sub", ["ledger.sqlite", "state/ledger.sqlite"])
def test_unusable_state_dir_is_named(tmp_path, sub):
    # As root, permissions do not stop anything: a regular file where the directory should be does.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = blocker / sub
    with pytest.raises(LedgerError) as e:
        Ledger(path)
    msg = str(e.value)
    assert msg.startswith(f"{path.parent}:")
    assert "state directory" in msg
    assert "--state-dir" in msg


def test_a_runs_series_step_fits_its_length():
    from greend.measure import MAX_POINTS, series_step

    assert series_step(1.0, 1.6) == 1.0  # a short run keeps its sampling interval
    assert series_step(0.5, 30) == 0.5
    for elapsed in (200, 3600, 86400, 7 * 86400):
        step = series_step(1.0, elapsed)
        assert step > 1 and elapsed / step <= MAX_POINTS
    assert series_step(1.0, 3600) < series_step(1.0, 86400)


def test_merge_series_keeps_every_figure(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    job = JobRow(cluster="c", job_id="1", node="n", kind="command", state="running",
                 first_seen=1000.0, last_seen=1000.0)
    rows = [(t, t + 1, "f", 10 + t, 1, 2, 3, 5, 0.5, 0.25, 0.125) for t in range(1000, 1100)]
    with led.transaction() as db:
        pk = led.upsert_job(db, job)
        led.put_factor_set(db, "f", Factors(1.5, 1.0, 2.0, 50.0, {}), 0)
        led.put_series(db, ((pk, *r) for r in rows))
    with led.transaction() as db:
        led.merge_series(db, pk, 30)
    merged = led.series(pk)
    assert [r["t_start"] for r in merged] == [990, 1020, 1050, 1080]
    assert sum(r["cpu_uj"] for r in merged) == sum(r[3] for r in rows)
    assert sum(r["cpu_time_ns"] for r in merged) == 500
    assert sum(r["carbon_g"] for r in merged) == pytest.approx(50)
    assert merged[-1]["t_end"] == 1100
    led.close()


def test_a_ledger_in_a_directory_the_reader_cannot_write_is_read(greendtest_dir):
    # An admin's copy of a ledger, or a read-only mount: SQLite cannot create the WAL index (-shm)
    # there. A ledger closed cleanly is read as it is; one whose latest writes are still in its
    # -wal is refused with an explanation, never read without them.
    import shutil
    import subprocess

    d = greendtest_dir
    path = d / "ledger.sqlite"
    led = Ledger(path)
    with led.transaction() as db:
        led.upsert_job(db, JobRow(cluster="c", job_id="1", node="n", kind="slurm", state="ended",
                                  first_seen=1.0, last_seen=2.0))
    led.close()
    assert not Path(f"{path}-wal").exists()
    path.chmod(0o644)
    code = ("import sys\nfrom greend.ledger import Ledger, LedgerError\n"
            "try:\n    l = Ledger(sys.argv[1], readonly=True)\n"
            "    print(l.db.execute('SELECT count(*) FROM jobs').fetchone()[0])\n"
            "except LedgerError as e:\n    print('ERROR', e)\n")
    # The reader runs the system's Python on a copy of greend's core (this checkout and its
    # venv may sit in a directory the unprivileged user cannot enter).
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no /usr/bin/python3 for the unprivileged reader")
    src = d / "src"
    shutil.copytree(Path(__file__).resolve().parent.parent / "greend", src / "greend",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for p in [src, *src.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    run = ["runuser", "-u", "greendtest", "--", "env", f"PYTHONPATH={src}",
           python, "-c", code, str(path)]
    r = subprocess.run(run, capture_output=True, text=True, timeout=60, cwd="/")
    assert r.stdout.strip() == "1", r.stderr

    # the daemon's writes not yet checkpointed into the file: refused, and says why
    writer = Ledger(path)
    with writer.transaction() as db:
        writer.upsert_job(db, JobRow(cluster="c", job_id="2", node="n", kind="slurm",
                                     state="ended", first_seen=1.0, last_seen=2.0))
    shutil.copy(f"{path}-wal", d / "keep-wal")
    writer.close()
    shutil.copy(d / "keep-wal", f"{path}-wal")
    Path(f"{path}-wal").chmod(0o644)
    Path(f"{path}-shm").unlink(missing_ok=True)
    r = subprocess.run(run, capture_output=True, text=True, timeout=60, cwd="/")
    assert r.stdout.startswith("ERROR "), (r.stdout, r.stderr)
    assert "ledger.sqlite-wal" in r.stdout and "daemon's socket" in r.stdout

