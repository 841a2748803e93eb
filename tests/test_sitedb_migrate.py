"""`greend controller migrate`: a SQLite site ledger written by a real controller, copied into
MariaDB and PostgreSQL; exact copies, idempotent re-runs, newer records kept, a newer schema
refused."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from daemonproc import Greend, greend_argv, request, token_file

pytest.importorskip("sqlalchemy", reason="greend[sitedb] is not installed")
pytest_plugins = ["sitedb_servers"]

from test_sitedb import FACTORS, TOKEN, rec  # noqa: E402

from greend import sitedb  # noqa: E402

JOB_KEY = "cluster, job_id, submit_time, node"
JOB_VALUES = ("kind, state, name, user, uid, account, partition, tier, alloc_cpus, alloc_mem_bytes, "
              "alloc_gpus, first_seen, last_seen, end_time, cpu_time_ns, cpu_uj, dram_uj, gpu_uj, "
              "memory_uj, facility_j, carbon_g, water_site_l, water_offsite_l, max_mem_bytes, "
              "provenance, command, exit_code, meta")


def post(port: int, recs: list[dict], node_name="n1", nodes=(), decisions=()) -> dict:
    body = {"agent": {"cluster": "c1", "node": node_name, "version": "test"},
            "factor_sets": [FACTORS], "records": recs, "nodes": list(nodes),
            "decisions": list(decisions)}
    st, _, data = request(port, "POST", "/api/v1/records", json.dumps(body).encode(),
                          {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert st == 200, data
    return json.loads(data)


def quoted(site, cols: str) -> str:
    return ", ".join(site.q(c.strip()) if site else c.strip() for c in cols.split(","))


def contents(rows_of, site=None) -> dict:
    """Every table's rows, keyed by identity (pks differ between the two databases)."""
    q = lambda cols: quoted(site, cols)  # noqa: E731
    jobs = {tuple(r[:4]): tuple(r[4:]) for r in rows_of(
        f"SELECT {q(JOB_KEY)}, {q(JOB_VALUES)} FROM jobs")}
    series = sorted(tuple(r) for r in rows_of(
        "SELECT j.cluster, j.job_id, j.submit_time, j.node, s.t_start, s.t_end, s.factor_set, "
        "s.cpu_uj, s.cpu_time_ns, s.carbon_g FROM job_series s JOIN jobs j ON j.pk = s.job_pk"))
    return {"jobs": jobs, "series": series,
            "factor_sets": sorted(tuple(r) for r in rows_of("SELECT * FROM factor_sets")),
            "node_totals": sorted(tuple(r) for r in rows_of("SELECT * FROM node_totals")),
            "node_series": sorted(tuple(r) for r in rows_of("SELECT * FROM node_series")),
            "decisions": sorted(tuple(r) for r in rows_of(
                f"SELECT token, t, {q('user')}, uid, outcome, cluster, job_id, decision "
                "FROM decisions"))}


def migrate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*greend_argv(), "controller", "migrate", *args], capture_output=True,
                          text=True, timeout=300)


def decision(token: str, job: str) -> dict:
    return {"token": token, "t": time.time() - 10, "user": "alice", "uid": 1001, "outcome": "submitted",
            "cluster": "c1", "job_id": job, "tier": "site", "decision": {"chosen": "c1"}, "tried": []}


@pytest.mark.slow
def test_a_sqlite_site_ledger_migrates_exactly_and_idempotently(server_db, tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    ctl = Greend(tmp_path / "ctl", command="controller", args=["--socket", "", "--token-file", str(tok)])
    with ctl:
        ctl.start()
        post(ctl.port, [rec(str(i), 20.0, cpu_uj=i, series=[(0, 10, i), (10, 20, 1)])
                        for i in range(2500)],
             nodes=[{"node": "n1", "totals": [{"domain": "cpu", "source": "rapl", "provenance": "m",
                                                "energy_uj": 99, "unattributed_uj": 1, "idle_uj": 2}],
                     "series": [{"t_start": 0.0, "t_end": 10.0, "energy_uj": 99,
                                 "unattributed_uj": 1}]}],
             decisions=[decision("tok-1", "5")])
        post(ctl.port, [rec("5", 30.0, "ended", cpu_uj=10**15)])
        # A provisional record next to the full one (another run): both rows migrate as they are.
        post(ctl.port, [rec("p", 20.0, submit_time=0, first_seen=1.0)])
        post(ctl.port, [rec("p", 20.0, submit_time=7, first_seen=2.0)])
        post(ctl.port, [rec("x", 20.0, node="n2")], node_name="n2")
        ctl.stop()
    src = ctl.ledger_path
    site = sitedb.ServerSite(server_db.url, server_db.password)
    try:
        # Agents already send to the server: their newer record of job 7 must stay.
        site.store([FACTORS], [rec("7", 40.0, cpu_uj=4242)])
        pw = str(server_db.password_file)
        r = migrate("--from", str(src), "--to", server_db.url, "--password-file", pw, "--json",
                    "--batch", "700")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["jobs"] == 2503 and out["jobs_stored"] == 2502 and out["jobs_stale"] == 1
        assert out["job_series"] == 5000 and out["decisions"] == 1
        assert server_db.password not in r.stdout + r.stderr

        import sqlite3

        lite = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
        want = contents(lambda sql: lite.execute(sql).fetchall())

        def rows(sql):
            with site.engine.connect() as c:
                return c.execute(site.sa.text(sql)).fetchall()
        got = contents(rows, site)
        assert got["jobs"].pop(("c1", "7", 100, "n1"))[15] == 4242  # newer there: kept
        want["jobs"].pop(("c1", "7", 100, "n1"))
        assert got == want
        assert ("c1", "p", 0, "n1") in got["jobs"] and ("c1", "p", 7, "n1") in got["jobs"]

        # A re-run changes nothing; its text summary says what it did.
        r = migrate("--from", str(src), "--to", server_db.url, "--password-file", pw)
        assert r.returncode == 0, r.stderr
        assert "2503 jobs (2502 stored, 1 newer there)" in r.stdout and "jobs: 2503/2503" in r.stderr
        again = contents(rows, site)
        again["jobs"].pop(("c1", "7", 100, "n1"))
        assert again == want

        # A target migrated by a newer greend is refused, and left alone.
        with site.engine.begin() as c:
            c.execute(site.sa.text("INSERT INTO greend_schema VALUES (99, 0)"))
        r = migrate("--from", str(src), "--to", server_db.url, "--password-file", pw)
        assert r.returncode == 1 and "schema version 99 is newer than this greend" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        site.close()


def test_migrate_explains_bad_arguments(tmp_path):
    r = migrate("--from", str(tmp_path / "none.sqlite"), "--to", "postgresql+psycopg://u@h/db")
    assert r.returncode == 2 and "none.sqlite: no such file" in r.stderr
    r = migrate("--to", "postgres://u@h/db")
    assert r.returncode == 2 and "--to: expected \"sqlite\" or a URL" in r.stderr
    r = migrate("--from", str(tmp_path / "x"))
    assert r.returncode == 2 and "no target: give --to URL" in r.stderr
