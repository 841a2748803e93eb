"""The site ledger on SQLite, MariaDB and PostgreSQL (greend.sitedb): the same upsert rules on the
three engines, the server schema and its version, and a real `greend controller` ingesting into
each, with exact totals. The servers are real (tests/sitedb_servers.py)."""

from __future__ import annotations

import json

import pytest
from daemonproc import Greend, free_port, request, token_file

from greend import sitedb
from greend.errors import LedgerError
from greend.ledger import Ledger

pytest.importorskip("sqlalchemy", reason="greend[sitedb] is not installed")
pytest_plugins = ["sitedb_servers"]  # real servers' fixtures: site_db, server_db, pg_db

TOKEN = "site-token-sitedb-0123456789"
FACTORS = {"id": "fs1", "pue": 1.3, "wue_site_l_per_kwh": 1.1, "ewif_l_per_kwh": 2.2,
           "carbon_intensity_g_per_kwh": 50.0, "sources": {"pue": "test"}, "first_used": 1.0}


def rec(job: str, last_seen: float, state: str = "running", *, node: str = "n1", cpu_uj: int | None = None,
        submit_time: int = 100, first_seen: float = 10.0, series: tuple = (), **kw) -> dict:
    d = {"cluster": "c1", "job_id": job, "node": node, "kind": "slurm", "state": state,
         "first_seen": first_seen, "last_seen": last_seen, "submit_time": submit_time, "name": "train",
         "user": "alice", "uid": 1001, "account": "proj", "partition": "gpu", "tier": "site",
         "alloc_cpus": 4.0, "alloc_mem_bytes": 1 << 30, "alloc_gpus": 1, "end_time": None,
         "cpu_time_ns": 7, "cpu_uj": int(last_seen * 1000) if cpu_uj is None else cpu_uj,
         "dram_uj": 1, "gpu_uj": 2, "memory_uj": 3, "facility_j": 0.5, "carbon_g": 0.25,
         "water_site_l": 0.125, "water_offsite_l": 0.0625, "max_mem_bytes": 5,
         "provenance": {"cpu": "measured"}, "command": None, "exit_code": None,
         "meta": {"k": "v"}, "series": [ser(*s) for s in series]}
    d.update(kw)
    return d


def ser(t_start: float, t_end: float, cpu_uj: int) -> dict:
    return {"t_start": t_start, "t_end": t_end, "factor_set": "fs1", "cpu_uj": cpu_uj, "dram_uj": 0,
            "gpu_uj": 0, "memory_uj": 0, "cpu_time_ns": 0, "carbon_g": 0.5, "water_site_l": 0.0,
            "water_offsite_l": 0.0}


def node(energy_uj: int, t_end: float) -> dict:
    return {"node": "n1",
            "totals": [{"domain": "cpu", "source": "rapl", "provenance": "measured",
                        "energy_uj": energy_uj, "unattributed_uj": 1, "idle_uj": 2}],
            "series": [{"t_start": 0.0, "t_end": t_end, "energy_uj": energy_uj, "unattributed_uj": 1}]}


def open_site(db, state_dir):
    """The site ledger of `db`; for SQLite, the controller's in state_dir."""
    if db.kind == "sqlite":
        return sitedb.SqliteSite(state_dir)
    return sitedb.ServerSite(db.url, db.password)


def query(site, sql: str) -> list[tuple]:
    if isinstance(site, sitedb.SqliteSite):
        return [tuple(r) for r in site.ledger.db.execute(sql)]
    with site.engine.connect() as c:
        return [tuple(r) for r in c.execute(site.sa.text(sql))]


def jobs(site) -> dict:
    return {(r[0], r[1], int(r[2])): (r[3], float(r[4]), int(r[5]))
            for r in query(site, "SELECT node, job_id, submit_time, state, last_seen, cpu_uj FROM jobs")}


def test_the_upsert_rules_are_the_same_on_every_engine(site_db, tmp_path):
    site = open_site(site_db, tmp_path)
    try:
        st = lambda recs, nodes=(): site.store([FACTORS], recs, nodes)  # noqa: E731
        assert st([rec("1", 20.0, series=[(0, 10, 5)]), rec("2", 20.0)]) == (2, 0)
        # Sent twice: stored once, and an equal resend is accepted (it changes nothing).
        assert st([rec("1", 20.0, series=[(0, 10, 5)])]) == (1, 0)
        # An older partial never overwrites a newer one.
        assert st([rec("1", 15.0, cpu_uj=1)]) == (0, 1)
        # A final record wins over any partial, even one seen later...
        assert st([rec("2", 18.0, "ended", cpu_uj=777)]) == (1, 0)
        # ...and no partial overwrites it, however new.
        assert st([rec("2", 99.0, cpu_uj=1)]) == (0, 1)
        # The same identity twice in one batch: in order, as if sent one after the other.
        assert st([rec("3", 30.0), rec("3", 25.0), rec("3", 40.0)]) == (2, 1)
        # Identities are compared exactly: case and non-ASCII characters make other jobs.
        assert st([rec("1", 20.0, node="N1"), rec("1", 20.0, node="n1\u00e9")]) == (2, 0)
        # A series bucket only moves forward.
        assert st([rec("1", 21.0, series=[(0, 12, 9)])]) == (1, 0)
        assert st([rec("1", 22.0, series=[(0, 11, 1)])]) == (1, 0)
        # One column, ints and floats (and None) in one batch: each engine stores numbers.
        assert st([rec("4", 20.0, alloc_cpus=4, first_seen=3), rec("5", 20.0, alloc_cpus=None),
                   rec("6", 20.0, alloc_cpus=4.5)]) == (3, 0)
        assert sorted(query(site, "SELECT job_id, alloc_cpus, first_seen FROM jobs WHERE job_id "
                                  "IN ('4', '5', '6')")) == [("4", 4.0, 3.0), ("5", None, 10.0),
                                                             ("6", 4.5, 10.0)]
        st([], [node(500, 10.0)])
        st([], [node(400, 9.0)])  # older node totals: ignored
        got = {k: v for k, v in jobs(site).items() if k[1] not in ("4", "5", "6")}
        assert got == {
            ("n1", "1", 100): ("running", 22.0, 22000), ("n1", "2", 100): ("ended", 18.0, 777),
            ("n1", "3", 100): ("running", 40.0, 40000), ("N1", "1", 100): ("running", 20.0, 20000),
            ("n1\u00e9", "1", 100): ("running", 20.0, 20000)}
        assert query(site, "SELECT t_start, t_end, cpu_uj FROM job_series") == [(0.0, 12.0, 9)]
        assert query(site, "SELECT energy_uj FROM node_totals") == [(500,)]
        assert query(site, "SELECT t_end, energy_uj FROM node_series") == [(10.0, 500)]
        assert query(site, "SELECT COUNT(*) FROM factor_sets") == [(1,)]
        # The stored text is the sent JSON, key order normalised.
        assert json.loads(query(site, "SELECT meta FROM jobs WHERE job_id = '2'")[0][0]) == {"k": "v"}
    finally:
        site.close()


def test_a_provisional_submit_time_is_adopted_on_every_engine(site_db, tmp_path):
    site = open_site(site_db, tmp_path)
    try:
        # Sent before the agent knew the submit time (0), then with it: one job, moved.
        assert site.store([FACTORS], [rec("7", 20.0, submit_time=0, series=[(0, 10, 5)])]) == (1, 0)
        assert site.store([FACTORS], [rec("7", 30.0, submit_time=555)]) == (1, 0)
        assert jobs(site) == {("n1", "7", 555): ("running", 30.0, 30000)}
        assert query(site, "SELECT COUNT(*) FROM job_series") == [(1,)]
        # Another run of the same job id (another first_seen) is not adopted into it.
        site.store([FACTORS], [rec("8", 20.0, submit_time=0, first_seen=1.0)])
        site.store([FACTORS], [rec("8", 30.0, submit_time=9, first_seen=2.0)])
        assert {k for k in jobs(site) if k[1] == "8"} == {("n1", "8", 0), ("n1", "8", 9)}
    finally:
        site.close()


def test_the_server_schema_has_the_sqlite_ledgers_columns(server_db, tmp_path):
    import sqlalchemy as sa

    url, pw = server_db.url, server_db.password
    site = sitedb.ServerSite(url, pw)
    led = Ledger(tmp_path / "ledger.sqlite")
    try:
        insp = sa.inspect(site.engine)
        for table in ("factor_sets", "jobs", "job_series", "node_totals", "node_series", "decisions"):
            want = [r[1] for r in led.db.execute(f"PRAGMA table_info({table})")]
            assert [c["name"] for c in insp.get_columns(table)] == want, table
        assert site.schema_version == sitedb.SERVER_SCHEMA_VERSION
        # A second controller opening the same database finds it migrated: nothing to do.
        again = sitedb.ServerSite(url, pw)
        assert again.schema_version == sitedb.SERVER_SCHEMA_VERSION
        again.close()
        # A database migrated by a newer greend is refused, with the reason.
        with site.engine.begin() as c:
            c.execute(sa.text("INSERT INTO greend_schema VALUES (99, 0)"))
        with pytest.raises(LedgerError, match=r"schema version 99 is newer than this greend"):
            sitedb.ServerSite(url, pw)
    finally:
        site.close()
        led.close()


def test_a_wrong_password_is_a_clear_error_without_the_password(pg_db):
    url = pg_db.url
    with pytest.raises(LedgerError) as e:
        sitedb.ServerSite(url, "not-the-password")
    msg = str(e.value)
    assert url in msg and "password" in msg and "not-the-password" not in msg


def test_the_database_url_is_checked_in_the_config():
    from greend import config

    ok = config.Controller(database="postgresql+psycopg://greend@db:5432/greend")
    assert ok.database.startswith("postgresql")
    for bad, words in [("mysql://greend@db/greend", "expected \"sqlite\" or a URL"),
                       ("postgresql+psycopg://greend:secret@db/greend", "database_password_file"),
                       ("postgresql+psycopg://db/greend", "expected a user"),
                       ("mysql+pymysql://greend@db", "expected a database name")]:
        with pytest.raises(ValueError, match="database") as e:
            config.Controller(database=bad)
        assert words in str(e.value)
    # The loader's message names the key and what was given, but never the password.
    from greend.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config.parse({"controller": {"database": "postgresql+psycopg://greend:s3cr3t@db/greend"}})
    msg = str(e.value)
    assert "key 'controller.database'" in msg and "database_password_file" in msg
    assert "s3cr3t" not in msg and "greend:***@db" in msg


# -- through a real controller --------------------------------------------------------------------
def controller(home, tok, db, **extra) -> Greend:
    return Greend(home, command="controller", config={"controller": {**db.settings(), **extra}},
                  args=["--socket", "", "--token-file", str(tok)])


def post(port: int, recs: list[dict], node_name: str = "n1", nodes=()) -> dict:
    body = {"agent": {"cluster": "c1", "node": node_name, "version": "test"},
            "factor_sets": [FACTORS], "records": recs, "nodes": list(nodes)}
    st, _, data = request(port, "POST", "/api/v1/records", json.dumps(body).encode(),
                          {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert st == 200, data
    return json.loads(data)


def test_a_real_controller_ingests_into_each_engine_exactly(site_db, tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    with controller(tmp_path / "ctl", tok, site_db) as ctl:
        ctl.start()
        n = 1200
        first = [rec(str(i), 20.0, cpu_uj=i, series=[(0, 10, i), (10, 20, 1)]) for i in range(n)]
        assert post(ctl.port, first[:700]) == {"accepted": 700, "stale": 0, "records": 700}
        assert post(ctl.port, first[700:]) == {"accepted": 500, "stale": 0, "records": 500}
        # Newer totals for half, a stale resend for the rest, and a final record.
        newer = [rec(str(i), 30.0, cpu_uj=2 * i) for i in range(0, n, 2)]
        older = [rec(str(i), 15.0, cpu_uj=0) for i in range(1, n, 2)]
        assert post(ctl.port, newer + older) == {"accepted": n // 2, "stale": n // 2, "records": n}
        assert post(ctl.port, [rec("1", 25.0, "ended", cpu_uj=10**12)])["accepted"] == 1
        st, d = ctl.get("/healthz")
        assert st == 200 and d["status"] == "ok" and d["records_received"] == 2 * n + 1
        # Reads come from the site database on every engine (tests/test_sitedb_reads.py).
        st, d = ctl.get("/api/v1/jobs?limit=5")
        assert st == 200 and d["total"] == n and len(d["jobs"]) == 5, d
        ctl.stop()
    site = open_site(site_db, ctl.state)
    try:
        want = sum(2 * i for i in range(0, n, 2)) + sum(i for i in range(3, n, 2)) + 10**12
        assert query(site, "SELECT COUNT(*), SUM(cpu_uj) FROM jobs") == [(n, want)]
        assert query(site, "SELECT COUNT(*), SUM(cpu_uj) FROM job_series") == [
            (2 * n, sum(range(n)) + n)]
    finally:
        site.close()


def test_a_controller_refuses_an_identity_the_server_cannot_key(pg_db, tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    with controller(tmp_path / "ctl", tok, pg_db) as ctl:
        ctl.start()
        body = {"agent": {"cluster": "c1", "node": "n1", "version": "t"},
                "records": [rec("x" * 256, 20.0)]}
        st, _, data = request(ctl.port, "POST", "/api/v1/records", json.dumps(body).encode(),
                              {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert st == 400 and b"records[0].job_id: over 255 characters" in data


def test_a_controller_with_an_unreachable_database_says_so(tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    pw = "a-password-0123"
    db = {"database": f"postgresql+psycopg://greend@127.0.0.1:{free_port()}/greend",
          "database_password_file": str(token_file(tmp_path / "pw", pw))}
    ctl = Greend(tmp_path / "ctl", command="controller", config={"controller": db},
                 args=["--socket", "", "--token-file", str(tok)])
    ctl.start(wait=False)
    assert ctl.proc.wait(60) != 0
    log = ctl.log()
    assert "site database postgresql+psycopg://greend@127.0.0.1" in log and "cannot open" in log
    assert "Traceback" not in log and pw not in log


def test_nodes_and_a_sqlite_controller_never_import_the_database_drivers(tmp_path):
    """The `sitedb` extra stays off compute nodes' import path: only a controller configured for a
    server loads SQLAlchemy and its drivers."""
    import subprocess
    import sys

    tok = token_file(tmp_path / "token", TOKEN)
    code = f"""
import sys
from greend import agent, cli, config, daemon, controller, wire
cfg = config.parse({{"controller": {{"state_dir": {str(tmp_path / 'ctl')!r}, "token_file": {str(tok)!r},
                                    "listen": "127.0.0.1:0", "socket": ""}}}})
c = controller.Controller(cfg)
c.site.store([], [])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("sqlalchemy", "pymysql", "psycopg"))
print(c.site.engine, loaded)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "sqlite []"


def test_a_decision_posted_to_a_controller_goes_to_the_server(server_db, tmp_path):
    import time

    tok = token_file(tmp_path / "token", TOKEN)
    d = {"token": "tok-9", "t": time.time() - 5, "user": "alice", "uid": 1001, "outcome": "pending",
         "cluster": "c1", "job_id": None, "decision": {"chosen": "c1"}}
    hdr = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with controller(tmp_path / "ctl", tok, server_db) as ctl:
        ctl.start()
        st, _, data = request(ctl.port, "POST", "/api/v1/decisions", json.dumps(d).encode(), hdr)
        assert st == 200 and json.loads(data)["token"] == "tok-9", data
        # Its final outcome replaces it; another user's decision may not take its token.
        d.update(outcome="submitted", job_id="42")
        st, _, data = request(ctl.port, "POST", "/api/v1/decisions", json.dumps(d).encode(), hdr)
        assert st == 200, data
        st, _, data = request(ctl.port, "POST", "/api/v1/decisions",
                              json.dumps({**d, "user": "mallory", "uid": 666}).encode(), hdr)
        assert st == 409 and b"another user's decision" in data
        st, _, data = request(ctl.port, "POST", "/api/v1/decisions", json.dumps(d).encode(),
                              {"Content-Type": "application/json"})
        assert st == 401
    site = open_site(server_db, None)
    try:
        assert query(site, "SELECT token, outcome, job_id FROM decisions") == [("tok-9", "submitted", "42")]
    finally:
        site.close()


@pytest.mark.slow
def test_the_database_server_going_away_and_back_loses_nothing(tmp_path):
    """A controller whose PostgreSQL stops answers 503 (the agents keep their records and resend),
    says so in /healthz, and stores the resent batch once the server is back."""
    from sitedb_servers import PASSWORD, SiteDb, start_postgresql

    server = start_postgresql()  # its own: this test stops it
    try:
        db = SiteDb("postgresql", server.new_database(), token_file(tmp_path / "pw", PASSWORD))
        tok = token_file(tmp_path / "token", TOKEN)
        with controller(tmp_path / "ctl", tok, db) as ctl:
            ctl.start()
            assert post(ctl.port, [rec("1", 20.0, series=[(0, 10, 5)])])["accepted"] == 1
            server.halt()
            batch = [rec("1", 30.0, cpu_uj=3), rec("2", 30.0, cpu_uj=4)]
            body = {"agent": {"cluster": "c1", "node": "n1", "version": "t"},
                    "factor_sets": [FACTORS], "records": batch}
            st, _, data = request(ctl.port, "POST", "/api/v1/records", json.dumps(body).encode(),
                                  {"Authorization": f"Bearer {TOKEN}",
                                   "Content-Type": "application/json"})
            assert st == 503 and b"ledger unavailable, retry later" in data
            assert b"site database postgresql+psycopg://greend@127.0.0.1" in data
            h = ctl.health()
            assert h["status"] == "degraded" and any(r.startswith("ledger:") for r in h["reasons"])
            server.restart()
            assert post(ctl.port, batch) == {"accepted": 2, "stale": 0, "records": 2}
            assert ctl.health()["status"] == "ok"
            assert "Traceback" not in ctl.log() and PASSWORD not in ctl.log()
        site = open_site(db, None)
        try:
            assert query(site, "SELECT job_id, cpu_uj FROM jobs ORDER BY job_id") == [("1", 3), ("2", 4)]
            assert query(site, "SELECT COUNT(*) FROM job_series") == [(1,)]
        finally:
            site.close()
    finally:
        server.stop()


def test_two_controllers_writing_the_same_jobs_at_once_keep_the_rule(server_db):
    """Resends racing one another through two controllers (two connections pools): the rows end
    as the rule says, whatever the interleaving, and a deadlock between them is retried."""
    import threading

    sites = [sitedb.ServerSite(server_db.url, server_db.password) for _ in range(2)]
    errors = []

    def writer(site, offset):
        try:
            for step in range(12):
                t = 100.0 + step * 2 + offset  # the two interleave: 100, 101, 102, ...
                recs = [rec(str(i), t, cpu_uj=int(t) * 1000 + i, series=[(0, t, int(t))])
                        for i in range(0, 300, 1 + offset)]
                site.store([FACTORS], list(reversed(recs)) if offset else recs)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s, k)) for k, s in enumerate(sites)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        got = jobs(sites[0])
        # Even job ids got both writers' records: the latest (t = 123) wins; odd ones only the first's.
        assert got == {("n1", str(i), 100): ("running", 123.0 if i % 2 == 0 else 122.0,
                                              (123 if i % 2 == 0 else 122) * 1000 + i)
                       for i in range(300)}
        assert query(sites[0], "SELECT COUNT(*), MAX(t_end), MIN(t_end) FROM job_series") == [
            (300, 123.0, 122.0)]
    finally:
        for s in sites:
            s.close()
