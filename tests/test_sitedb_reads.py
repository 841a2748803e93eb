"""The read API of a controller on a database server (docs/site-mode.md, "Reads on a server
database"): the same batches go through real controllers on SQLite, MariaDB and PostgreSQL, and
every read endpoint answers the same JSON on the three; two controllers on one PostgreSQL serve each
other's records; the caller rules (private_jobs, the site token) hold on a server as on SQLite."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from daemonproc import Greend, request, token_file, toml
from test_security import CLIENT, as_user, has_user, raw_request
from test_sitedb import FACTORS, TOKEN, controller, rec, ser

from greend import queries, sitedb
from greend.errors import LedgerError

pytest.importorskip("sqlalchemy", reason="greend[sitedb] is not installed")
pytest_plugins = ["sitedb_servers"]

FACTORS2 = {**FACTORS, "id": "fs2", "carbon_intensity_g_per_kwh": 300.0, "first_used": 2.0}
DECISION = {"token": "tok-1", "t": 5.0, "user": "alice", "uid": 1001, "outcome": "submitted",
            "cluster": "c1", "job_id": "1", "decision": {"chosen": "c1", "why": "greener"}}
# A job seen this month, which the accounts' budgets count (the rest is from 1970).
NOW = float(int(time.time()))
BUDGETS = [{"account": "proj", "period": "month", "carbon_kg": 0.001, "energy_kwh": 1.0},
           {"account": "proj2", "period": "year", "water_l": 0.5}]
OTHERS_DECISION = {**DECISION, "token": "tok-2", "t": 6.0, "user": "mallory", "uid": 666,
                   "decision": {"chosen": "c1", "why": "not alice's"}}


def _job(job: str, last_seen: float, state: str = "ended", *, node: str = "n1", k: int = 1,
         **kw) -> dict:
    """A record whose sums are exact on every engine (carbon, water: multiples of 1/64)."""
    d = rec(job, last_seen, state, node=node, cpu_uj=1000 * k + int(last_seen),
            carbon_g=0.25 * k, water_site_l=0.125 * k, water_offsite_l=0.0625, facility_j=0.5 * k,
            end_time=last_seen if state == "ended" else None, **kw)
    return d


def batches() -> list[dict]:
    """Agents' batches covering what the reads select on: users, accounts, clusters, kinds, states,
    outcomes (exit codes, Slurm states), names to search and sort, a job on two nodes, a job id
    reused by Slurm, two factor sets in one bucket, a routing decision, node totals and series."""
    n1 = [
        _job("1", 101.0, node="n1", k=3, name="Train", exit_code=0,
             series=[(0, 60, 500), (60, 120, 700)]),
        _job("2", 102.0, k=5, name="eval_50%", user="bob", account="proj2", exit_code=1,
             meta={"slurm_state": "FAILED"}),
        _job("3", 103.0, "running", k=2, name="prep", first_seen=50.0,
             series=[(0, 60, 100)]),
        _job("10", 104.0, k=7, name="train", user="carol", account="proj2",
             meta={"slurm_state": "COMPLETED"}),
        _job("11", 105.0, k=4, name="sweep", meta={"slurm_state": "CANCELLED by 1001"}),
        _job("12", 106.0, "running", k=6, name="notebook", kind="process", submit_time=0,
             user="bob", command="jupyter lab --port 8_88"),
        _job("5", 107.0, k=8, name="reused", submit_time=100),
        _job("5", 160.0, k=9, name="reused", submit_time=900, first_seen=150.0),
        _job("7", 109.0, k=1, name="other-cluster", cluster="c2", partition="cpu"),
        _job("8", NOW - 50, k=12, name="this month", first_seen=NOW - 100),
        *(_job(str(100 + i), 200.0 + i, k=10 + (i * 7) % 23, name=f"filler {i:02d}",
               user=("alice", "bob", "carol")[i % 3], account=("proj", "proj2")[i % 2],
               exit_code=(0, 2, None)[i % 3]) for i in range(30)),
    ]
    n1[2]["series"].append({**ser(0, 60, 50), "factor_set": "fs2", "carbon_g": 0.75})
    n2 = [
        _job("1", 110.0, node="n2", k=2, name="Train", exit_code=0, series=[(0, 60, 300)]),
        _job("20", 111.0, node="n2", k=11, name="dave's", user="dave", account="proj"),
    ]

    def nodes(name, e):
        return [{"node": name,
                 "totals": [{"domain": "cpu", "source": "rapl", "provenance": "measured",
                             "energy_uj": e, "unattributed_uj": e // 4, "idle_uj": 2}],
                 "series": [{"t_start": 0.0, "t_end": 60.0, "energy_uj": e // 2,
                             "unattributed_uj": e // 8},
                            {"t_start": 60.0, "t_end": 120.0, "energy_uj": e // 2,
                             "unattributed_uj": e // 8}]}]
    agent = {"cluster": "c1", "version": "test"}
    return [
        {"agent": {**agent, "node": "n1"}, "factor_sets": [FACTORS, FACTORS2], "records": n1[:20],
         "nodes": nodes("n1", 8_000_000), "decisions": [DECISION, OTHERS_DECISION]},
        {"agent": {**agent, "node": "n1"}, "factor_sets": [FACTORS], "records": n1[20:]},
        {"agent": {**agent, "node": "n2"}, "factor_sets": [FACTORS], "records": n2,
         "nodes": nodes("n2", 4_000_000)},
    ]


def site_controller(home, tok, db):
    """A controller on `db` with the accounts' budgets (the summary by account shows them)."""
    ctl = controller(home, tok, db)
    ctl.write_config(toml(ctl.cfg) + "".join(
        "\n[[policy.budgets]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in b.items())
        for b in BUDGETS))
    return ctl


def send(port: int, batch: dict) -> None:
    st, _, data = request(port, "POST", "/api/v1/records", json.dumps(batch).encode(),
                          {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert st == 200, data


LISTINGS = [
    "", "per=job", "per=record&limit=7&offset=3", "per=job&limit=5&offset=30",
    *(f"per={per}&sort={s}&order={o}" for per in ("job", "record")
      for s in ("recent", "energy", "carbon", "water", "elapsed", "job", "name")
      for o in ("asc", "desc")),
    "q=TRAIN", "q=50%25", "q=_", "q=8_88", "q=dave's", "q=n2&per=job", "q=%25", "q=\\",
    "outcome=ok", "outcome=failed", "outcome=ok&per=job", "outcome=failed&per=job",
    "outcome=failed&per=job&sort=energy",
    "state=running", "state=ended&per=job", "user=alice&per=job", "account=proj2&sort=carbon",
    "cluster=c2", "kind=process", "since=105&until=210", "since=200&per=job&sort=name&order=asc",
    "user=alice&account=proj&outcome=ok&q=filler&per=job&sort=water&limit=3&offset=1",
]
DETAILS = ["c1/1", "c1/3", "c1/5", "c2/7", "c1/12", "c1/nope", "c9/1"]
SUMMARIES = [f"by={by}&since=0&until=1000000" for by in ("account", "user", "cluster", "node")] + [
    "by=account&since=100&until=110", "by=user&since=0&until=50",
    "by=node&since=205&until=208"]


def reads(port: int, headers: dict | None = None) -> dict:
    """Every read's status and JSON; a summary's rows sorted (its order among equal energies is
    not specified), the rest as served."""
    out = {}
    for path in ([f"/api/v1/jobs?{q}" for q in LISTINGS] + [f"/api/v1/jobs/{d}" for d in DETAILS]
                 + [f"/api/v1/summary?{q}" for q in SUMMARIES]):
        st, _, body = request(port, "GET", path, headers=headers)
        d = json.loads(body)
        if path.startswith("/api/v1/summary") and st == 200:
            d["rows"].sort(key=lambda r: json.dumps(r, sort_keys=True))
        out[path] = (st, json.dumps(d, sort_keys=True))
    return out


@pytest.fixture(scope="module")
def sqlite_reads(tmp_path_factory) -> dict:
    """The reference: the reads of a SQLite controller given the batches."""
    from sitedb_servers import SiteDb

    tmp = tmp_path_factory.mktemp("sqlite-reads")
    tok = token_file(tmp / "token", TOKEN)
    with site_controller(tmp / "ctl", tok, SiteDb("sqlite", "sqlite", None)) as ctl:
        ctl.start()
        for b in batches():
            send(ctl.port, b)
        return reads(ctl.port)


def test_the_reference_reads_select_what_they_should(sqlite_reads):
    """The SQLite answers the servers must match are themselves right (not all empty or errors)."""
    def get(path):
        st, body = sqlite_reads[path]
        assert st == 200, (path, body)
        return json.loads(body)

    assert get("/api/v1/jobs?per=job")["total"] == 41 and get("/api/v1/jobs?")["total"] == 42
    assert get("/api/v1/jobs?per=job")["running"] == 2
    assert [j["job"]["job_id"] for j in get("/api/v1/jobs?q=TRAIN")["jobs"]] == ["1", "10", "1"]
    assert [j["job"]["job_id"] for j in get("/api/v1/jobs?q=50%25")["jobs"]] == ["2"]
    assert {j["job"]["job_id"] for j in get("/api/v1/jobs?outcome=failed&per=job")["jobs"]} >= {"2", "11"}
    assert "10" in {j["job"]["job_id"] for j in get("/api/v1/jobs?outcome=ok&per=job")["jobs"]}
    page = get("/api/v1/jobs?per=record&limit=7&offset=3")
    assert len(page["jobs"]) == 7 and page["next_offset"] == 10
    one = get("/api/v1/jobs/c1/1")["records"]
    assert [r["job"]["node"] for r in one] == ["n1", "n2"]
    assert one[0]["decision"]["token"] == "tok-1" and len(one[0]["series"]) == 2
    assert [f["id"] for f in get("/api/v1/jobs/c1/3")["records"][0]["factors"]] == ["fs1", "fs2"]
    assert [r["job"]["submit_time"] for r in get("/api/v1/jobs/c1/5")["records"]] == [100, 900]
    assert sqlite_reads["/api/v1/jobs/c1/nope"][0] == 404
    s = get("/api/v1/summary?by=node&since=0&until=1000000")
    assert {r["key"] for r in s["rows"]} == {"n1", "n2"} and s["node_energy_j"] == 12.0
    budget = {r["key"]: r.get("budget") for r in get("/api/v1/summary?" + SUMMARIES[0])["rows"]}
    assert budget["proj"]["used"]["carbon"] == pytest.approx(0.003), budget  # job 8 only
    assert budget["proj"]["max_ratio"] == pytest.approx(3.0), budget
    assert budget["proj2"]["used"]["water"] == 0, budget


@pytest.mark.parametrize("engine", ["mysql", "postgresql"])
def test_a_server_controller_reads_exactly_as_sqlite(engine, sqlite_reads, request, tmp_path):
    from sitedb_servers import _site_db

    db = _site_db(request, tmp_path, engine)
    tok = token_file(tmp_path / "token", TOKEN)
    with site_controller(tmp_path / "ctl", tok, db) as ctl:
        ctl.start()
        for b in batches():
            send(ctl.port, b)
        got = reads(ctl.port)
    assert got.keys() == sqlite_reads.keys()
    for path, want in sqlite_reads.items():
        assert got[path] == want, path


def test_two_controllers_on_one_postgresql_serve_each_others_records(pg_db, tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    with controller(tmp_path / "a", tok, pg_db) as a, controller(tmp_path / "b", tok, pg_db) as b:
        a.start()
        b.start()
        for batch in batches():
            send(a.port, batch)
        st, d = b.get("/api/v1/jobs/c1/1")
        assert st == 200 and [r["job"]["node"] for r in d["records"]] == ["n1", "n2"], d
        assert d["records"][0]["decision"]["token"] == "tok-1"
        assert reads(b.port) == reads(a.port)
        st, d = b.get("/api/v1/clusters")
        assert st == 200 and d["clusters"]["c1"]["running"] == 2, d  # jobs 3 and 12


def test_private_jobs_and_the_token_hold_on_a_server(pg_db, tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    with controller(tmp_path / "ctl", tok, pg_db) as ctl:
        ctl.cfg["daemon"] = {"private_jobs": True}
        ctl.write_config()
        ctl.start()
        send(ctl.port, batches()[0])
        for path in ("/api/v1/jobs", "/api/v1/jobs/c1/1", "/api/v1/summary"):
            st, d = ctl.get(path)
            assert st == 403 and "private_jobs" in d["error"], (path, d)
        st, d = ctl.get("/api/v1/jobs?per=job", headers={"Authorization": f"Bearer {TOKEN}"})
        assert st == 200 and d["total"] == 20, d


def test_a_read_the_server_refuses_is_a_ledger_error_naming_the_database(server_db):
    """What the API answers with a 503 (greend.http), rather than a traceback."""
    site = sitedb.ServerSite(server_db.url, server_db.password)
    try:
        with site.reader() as db:
            assert queries.job_page(db, queries.JobQuery(), 0.0).total == 0
        with pytest.raises(LedgerError, match="cannot read") as e, site.reader() as db:
            db.execute("SELECT no_such_column FROM jobs WHERE cluster = ?", ["c1"])
        assert server_db.url in str(e.value) and server_db.password not in str(e.value)
    finally:
        site.close()


def test_a_user_on_the_socket_reads_only_their_own_jobs_from_the_server(pg_db, tmp_path):
    """private_jobs on a controller on PostgreSQL: a real unprivileged user (the testbed's
    greendtest) on the unix socket lists, opens and sums their own jobs only."""
    if os.geteuid() != 0 or not has_user("greendtest"):
        pytest.skip("needs root and the testbed's user greendtest (uid 4242)")
    public = Path(tempfile.mkdtemp(prefix="greend-reads-", dir="/tmp"))
    os.chmod(public, 0o755)
    try:
        (public / "client.py").write_text(CLIENT)
        os.chmod(public / "client.py", 0o644)
        sock = public / "controller.sock"
        tok = token_file(tmp_path / "token", TOKEN)
        g = Greend(tmp_path / "ctl", command="controller",
                   config={"controller": pg_db.settings(), "daemon": {"private_jobs": True}},
                   args=["--socket", str(sock), "--token-file", str(tok)])
        with g:
            g.start()
            send(g.port, {"agent": {"cluster": "c1", "node": "n1", "version": "test"},
                          "factor_sets": [FACTORS], "decisions": [DECISION],
                          "records": [_job("1", 101.0, user="alice"),
                                      _job("2", 102.0, user="greendtest", uid=4242),
                                      _job("3", 103.0, user="greendtest", uid=4242)]})
            paths = ["/api/v1/jobs?per=job", "/api/v1/jobs/c1/2", "/api/v1/jobs/c1/1",
                     "/api/v1/summary?by=user&since=0&until=1000", "/api/v1/jobs?user=alice"]
            answers = as_user("greendtest", sock, public, [raw_request("GET", p) for p in paths])
        (st1, jobs), (st2, mine), (st3, theirs), (st4, summ), (st5, other) = answers
        assert st1 == 200 and sorted(
            j["job"]["job_id"] for j in json.loads(jobs)["jobs"]) == ["2", "3"], jobs
        assert st2 == 200 and json.loads(mine)["records"][0]["job"]["user"] == "greendtest"
        assert st3 == 404, theirs  # alice's job is not found, not refused: no oracle
        assert st4 == 200 and [r["key"] for r in json.loads(summ)["rows"]] == ["greendtest"], summ
        assert st5 == 403, other
    finally:
        shutil.rmtree(public, ignore_errors=True)
