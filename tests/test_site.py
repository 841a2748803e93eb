"""Site mode: node agents send their job records to the controller, which keeps the site's ledger.

The end-to-end tests run real `greend run` agents and a real `greend controller` on loopback, with
real busy processes as jobs; the in-process tests pin the outbox's transactional and batching rules
and the controller's ordering rules.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest
from daemonproc import (
    Greend,
    busy,
    integrity,
    job_id,
    metric_value,
    request,
    stop,
    token_file,
    wait_for,
)

TOKEN = "site-token-0123456789abcdef"


def controller(home, tok, config: dict | None = None) -> Greend:
    return Greend(home, command="controller", config=config,
                  args=["--socket", "", "--token-file", str(tok)])


def agent(home, node: str, ctl: Greend, tok, **controller_cfg) -> Greend:
    c = {"url": f"http://127.0.0.1:{ctl.port}", "token_file": str(tok), "send_interval_s": 0.5,
         "backoff_max_s": 1.0, "unreachable_after_s": 2.0, **controller_cfg}
    return Greend(home, node=node, config={"controller": c})


def ctl_jobs(ctl: Greend, **q) -> list[dict]:
    query = "&".join(f"{k}={v}" for k, v in {"limit": 1000, **q}.items())
    st, d = ctl.get(f"/api/v1/jobs?{query}")
    assert st == 200, d
    return [r["job"] for r in d["jobs"]]  # job-footprint records (docs/json.md): their job part


def books(g: Greend, node: str) -> dict:
    """A ledger's records of one node: job totals, series buckets, node totals."""
    jobs = {(r["cluster"], r["job_id"], r["submit_time"]): tuple(r) for r in g.rows(
        "SELECT cluster, job_id, submit_time, node, kind, state, user, first_seen, last_seen, "
        "end_time, cpu_time_ns, cpu_uj, dram_uj, gpu_uj, memory_uj, facility_j, carbon_g, "
        "water_site_l, water_offsite_l, max_mem_bytes, provenance FROM jobs WHERE node = ?", (node,))}
    series = {tuple(r[:5]): tuple(r[5:]) for r in g.rows(
        "SELECT j.cluster, j.job_id, j.submit_time, s.t_start, s.factor_set, s.t_end, s.cpu_uj, "
        "s.dram_uj, s.gpu_uj, s.memory_uj, s.cpu_time_ns, s.carbon_g, s.water_site_l, "
        "s.water_offsite_l FROM job_series s JOIN jobs j ON j.pk = s.job_pk WHERE j.node = ?",
        (node,))}
    totals = {r[0]: tuple(r) for r in g.rows(
        "SELECT domain, source, provenance, energy_uj, unattributed_uj, idle_uj FROM node_totals "
        "WHERE node = ?", (node,))}
    return {"jobs": jobs, "series": series, "node_totals": totals}


# -- end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_agents_a_controller_crash_and_no_double_count(tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    ctl = controller(tmp_path / "ctl", tok)
    j_long, j_short = job_id(), job_id()
    agents = []
    jobs = []
    try:
        ctl.start()
        a1 = agent(tmp_path / "n1", "n1", ctl, tok).start()
        a2 = agent(tmp_path / "n2", "n2", ctl, tok).start()
        agents = [a1, a2]
        jobs = [busy(j_long), busy(j_short)]
        # Both nodes see both jobs (one host): the controller holds one record per (job, node).
        wait_for(lambda: {(j["job_id"], j["node"]) for j in ctl_jobs(ctl)} >= {
            (j, n) for j in (j_long, j_short) for n in ("n1", "n2")}, 60,
            what="both nodes' records at the controller")
        h = ctl.health()
        assert h["status"] == "ok" and h["agents_reporting"] == 2
        assert {(a["cluster"], a["node"]) for a in h["agents"]} == {("local", "n1"), ("local", "n2")}
        m = ctl.metrics()
        assert metric_value(m, "greend_controller_agents_reporting") == 2
        assert metric_value(m, "greend_controller_records_received_total") > 0
        assert metric_value(m, "greend_controller_agent_last_seen_timestamp_seconds", node="n1") > 0
        st, d = ctl.get(f"/api/v1/jobs/local/{j_long}")
        assert st == 200 and {r["job"]["node"] for r in d["records"]} == {"n1", "n2"}
        assert all(r["series"] and r["factors"] for r in d["records"])
        st, d = ctl.get("/api/v1/summary?by=node")
        assert st == 200 and {r["key"] for r in d["rows"]} >= {"n1", "n2"}
        assert d["node_energy_j"] > 0

        # The controller dies; the agents keep measuring and queue their records.
        ctl.kill9()
        stop(jobs[1])  # a job ends while the controller is down: its final record waits too
        for a in agents:
            wait_for(lambda a=a: metric_value(a.metrics(), "greend_outbox_records") > 0,
                     what="records queued in the outbox")
            wait_for(lambda a=a: a.reasons("controller unreachable"), 20,
                     what="agent degraded while the controller is unreachable")
            assert a.health()["status"] == "degraded"
            assert metric_value(a.metrics(), "greend_outbox_send_errors_total",
                                reason="unreachable") > 0
            assert metric_value(a.metrics(), "greend_outbox_controller_up") == 0
            assert a.alive()
        queued = {a.cfg["node"]: a.rows("SELECT COUNT(*) FROM outbox WHERE kind = 'job'")[0][0]
                  for a in agents}
        assert all(n > 0 for n in queued.values()), queued

        # It comes back: the outbox drains, the final records arrive.
        ctl.start()
        wait_for(lambda: {(j["node"], j["state"]) for j in ctl_jobs(ctl) if j["job_id"] == j_short}
                 == {("n1", "ended"), ("n2", "ended")}, 60, what="final records after the outage")
        for a in agents:
            wait_for(lambda a=a: not a.reasons("site:"), 30, what="agent ok again")
            assert metric_value(a.metrics(), "greend_outbox_controller_up") == 1
            assert metric_value(a.metrics(), "greend_outbox_last_success_timestamp_seconds") > 0
        stop(jobs[0])
        time.sleep(1.5)
        for a in agents:
            assert a.stop() == 0, a.log()  # the final checkpoint is sent before exiting
    finally:
        for p in jobs:
            stop(p)
        for a in agents:
            a.__exit__()
    time.sleep(0.5)
    assert ctl.stop() == 0
    for a in agents:
        node = a.cfg["node"]
        assert a.rows("SELECT COUNT(*) FROM outbox")[0][0] == 0, f"{node}: outbox not drained"
        mine, site = books(a, node), books(ctl, node)
        assert mine["jobs"] and mine["series"] and mine["node_totals"]
        # Exactly the agent's own books: every resend after the crash was absorbed, none added.
        assert site["jobs"] == mine["jobs"], node
        assert site["series"] == mine["series"], node
        assert site["node_totals"] == mine["node_totals"], node
        assert integrity(a.ledger_path) == "ok"
        assert "Traceback" not in a.log()
    assert integrity(ctl.ledger_path) == "ok"
    assert "Traceback" not in ctl.log()


@pytest.mark.slow
def test_bad_token_is_refused_and_the_agent_says_so(tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    wrong = token_file(tmp_path / "agent-token", "not-the-site-token")
    with controller(tmp_path / "ctl", tok) as ctl:
        ctl.start()
        body = json.dumps({"agent": {"cluster": "local", "node": "x"}, "records": []}).encode()
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            st, h, out = request(ctl.port, "POST", "/api/v1/records", body=body,
                                 headers={"Content-Type": "application/json", **headers})
            assert st == 401, (headers, out)
            assert h["WWW-Authenticate"].startswith("Bearer")
            assert "bearer token" in json.loads(out)["error"]
        st, _, _ = request(ctl.port, "POST", "/api/v1/records", body=body,
                           headers={"Authorization": f"Bearer {TOKEN}"})
        assert st == 200
        with agent(tmp_path / "n1", "n1", ctl, wrong, unreachable_after_s=300) as a:
            a.start()
            wait_for(lambda: a.reasons("rejects this node's token (HTTP 401)"), 30,
                     what="agent degraded by a refused token")
            h = a.health()
            assert h["status"] == "degraded"
            assert h["site"]["last_error"] and h["site"]["send_errors"]["auth"] >= 1
            assert metric_value(a.metrics(), "greend_outbox_send_errors_total", reason="auth") >= 1
            assert metric_value(ctl.metrics(), "greend_controller_rejects_total", reason="auth") >= 5
            assert not ctl_jobs(ctl)
            # Token fixed on the node, SIGHUP: records flow without a restart.
            token_file(wrong, TOKEN)
            a.signal(signal.SIGHUP)
            wait_for(lambda: not a.reasons("site:"), 30,
                     what=lambda: f"agent ok after the reload: {a.health()}\n{a.log()}")
            wait_for(lambda: any(j["node"] == "n1" for j in ctl_jobs(ctl)), 30,
                     what="records after the token fix")
            assert a.stop() == 0
        assert ctl.stop() == 0


@pytest.mark.slow
def test_controller_reload_rotates_the_token_and_refuses_a_bad_config(tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    with controller(tmp_path / "ctl", tok) as ctl:
        ctl.start()
        assert post(ctl, [record("1")])[0] == 200
        token_file(tok, "the-new-site-token")
        ctl.signal(signal.SIGHUP)
        wait_for(lambda: post(ctl, [record("1")], token="the-new-site-token")[0] == 200,
                 what="the new token accepted")
        assert post(ctl, [record("1")])[0] == 401
        # A broken file (or token) is refused; the running ones stay.
        ctl.write_config("[controller]\nmax_body_bytes = 12\n")
        ctl.signal(signal.SIGHUP)
        wait_for(lambda: ctl.reasons("controller.max_body_bytes"), what="the reload error")
        assert post(ctl, [record("2")], token="the-new-site-token")[0] == 200
        token_file(tok, "")
        ctl.write_config()
        ctl.signal(signal.SIGHUP)
        wait_for(lambda: ctl.reasons("empty"), what="the empty token refused")
        assert post(ctl, [record("3")], token="the-new-site-token")[0] == 200
        assert ctl.stop() == 0
    assert "Traceback" not in ctl.log()


def test_controller_refuses_a_token_file_others_can_read(tmp_path):
    tok = token_file(tmp_path / "token", TOKEN, mode=0o644)
    g = controller(tmp_path / "ctl", tok)
    g.start(wait=False)
    rc = g.proc.wait(30)
    assert rc == 2
    assert "readable by group or others (mode 0644)" in g.log() and "chmod 600" in g.log()
    assert "Traceback" not in g.log()


def test_controller_needs_a_token(tmp_path):
    g = Greend(tmp_path / "ctl", command="controller", args=["--socket", ""])
    g.start(wait=False)
    assert g.proc.wait(30) == 2
    assert "--token-file" in g.log() and "controller.token_file" in g.log()


def test_config_errors_name_the_key(tmp_path):
    from greend import config

    with pytest.raises(config.ConfigError, match=r"controller\.token_file"):
        config.parse({"controller": {"url": "http://ctl:9472"}})
    with pytest.raises(config.ConfigError, match=r"key 'controller\.url'.*http://HOST:PORT"):
        config.parse({"controller": {"url": "ctl:9472", "token_file": "/x"}})
    with pytest.raises(config.ConfigError, match=r"key 'controller\.send_interval_s'"):
        config.parse({"controller": {"send_interval_s": 0}})
    with pytest.raises(config.ConfigError, match=r"key 'controller\.batch_size'.*unknown key"):
        config.parse({"controller": {"batch_size": 10}})
    c = config.parse({"controller": {"url": "https://ctl.example.org:9472/", "token_file": "/t"}})
    assert c.controller.url == "https://ctl.example.org:9472"


# -- the records endpoint -------------------------------------------------------------------------
def record(job: str, node: str = "n1", **kw) -> dict:
    r = {"cluster": "local", "job_id": job, "node": node, "kind": "slurm", "state": "running",
         "first_seen": 1000.0, "last_seen": 1100.0, "user": "alice", "cpu_time_ns": 10**9,
         "cpu_uj": 100, "memory_uj": 10, "carbon_g": 0.5, "provenance": {"cpu": "modelled: TDP"},
         "series": []}
    r.update(kw)
    return r


FACTORS = {"id": "f1", "pue": 1.5, "wue_site_l_per_kwh": 1.8, "ewif_l_per_kwh": 3.0,
           "carbon_intensity_g_per_kwh": 50.0, "sources": {"pue": "site"}, "first_used": 1000.0}


def post(ctl: Greend, records: list, node: str = "n1", token: str = TOKEN, **extra):
    batch = {"agent": {"cluster": "local", "node": node, "version": "test"}, "records": records,
             "factor_sets": [FACTORS], **extra}
    st, _, out = request(ctl.port, "POST", "/api/v1/records", body=json.dumps(batch).encode(),
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/json"})
    return st, json.loads(out)


@pytest.mark.slow
def test_records_are_validated_with_the_bad_field_named(tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    cfg = {"controller": {"max_body_bytes": 8192, "max_batch_records": 3}}
    with controller(tmp_path / "ctl", tok, config=cfg) as ctl:
        ctl.start()
        bad = {
            "records[0].cpu_uj": [record("1", cpu_uj=-5)],
            "records[0].state": [record("1", state="paused")],
            "records[0].job_id": [{k: v for k, v in record("1").items() if k != "job_id"}],
            "records[1].carbon_g": [record("1"), record("2", carbon_g="lots")],
            "records[0].memory_uj": [record("1", memory_uj=1.5)],
            "records[0].node": [record("1", node="n2")],
            "records[0].series[0].factor_set": [record("1", series=[{
                "t_start": 1000.0, "t_end": 1060.0, "factor_set": "nope", "cpu_uj": 1, "dram_uj": 0,
                "gpu_uj": 0, "memory_uj": 0, "cpu_time_ns": 1, "carbon_g": 0.1, "water_site_l": 0.0,
                "water_offsite_l": 0.0}])],
            "records[0]": [record("1", last_seen=10.0)],
            "records": [record(str(i)) for i in range(4)],
        }
        for field, recs in bad.items():
            st, d = post(ctl, recs)
            assert st == 400, (field, d)
            assert d["error"].startswith(field + ":"), (field, d)
            assert d["errors"][0]["field"] == field
        st, _, out = request(ctl.port, "POST", "/api/v1/records", body=b"{not json",
                             headers={"Authorization": f"Bearer {TOKEN}"})
        assert st == 400 and "invalid JSON" in json.loads(out)["error"]
        st, _, out = request(ctl.port, "POST", "/api/v1/records", body=b"{}",
                             headers={"Authorization": f"Bearer {TOKEN}"})
        assert st == 400 and json.loads(out)["error"].startswith("agent:")
        st, _, out = request(ctl.port, "POST", "/api/v1/records", body=b"",
                             headers={"Authorization": f"Bearer {TOKEN}"})
        assert st == 400 and "empty body" in json.loads(out)["error"]
        st, _, out = request(ctl.port, "POST", "/api/v1/records", body=b"{}",
                             headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/csv"})
        assert st == 415
        st, _, out = request(ctl.port, "POST", "/api/v1/records", body=b"x" * 10000,
                             headers={"Authorization": f"Bearer {TOKEN}"})
        assert st == 413 and "8192" in json.loads(out)["error"]
        assert request(ctl.port, "GET", "/api/v1/records")[0] == 405
        st, d = post(ctl, [record("7")])
        assert st == 200 and d == {"accepted": 1, "stale": 0, "records": 1}
        m = ctl.metrics()
        assert metric_value(m, "greend_controller_rejects_total", reason="invalid") >= 13
        assert metric_value(m, "greend_controller_rejects_total", reason="too_large") == 1
        assert ctl.health()["status"] == "ok"
        assert ctl.stop() == 0
    assert "Traceback" not in ctl.log()


@pytest.mark.slow
def test_final_and_newer_records_win_resends_change_nothing(tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)

    def bucket(t_end, cpu):
        return {"t_start": 1080.0, "t_end": t_end, "factor_set": "f1", "cpu_uj": cpu, "dram_uj": 0,
                "gpu_uj": 0, "memory_uj": 0, "cpu_time_ns": cpu, "carbon_g": 0.0,
                "water_site_l": 0.0, "water_offsite_l": 0.0}

    with controller(tmp_path / "ctl", tok) as ctl:
        ctl.start()
        p1 = record("42", last_seen=1100.0, cpu_uj=100, series=[bucket(1100.0, 100)])
        p2 = record("42", last_seen=1130.0, cpu_uj=200, series=[bucket(1130.0, 200)])
        final = record("42", state="ended", last_seen=1130.0, end_time=1131.0, cpu_uj=210,
                       series=[bucket(1130.0, 210)])
        late = record("42", last_seen=1200.0, cpu_uj=999)  # a partial after the final: refused
        assert post(ctl, [p1])[1]["accepted"] == 1
        assert post(ctl, [p2])[1]["accepted"] == 1
        assert post(ctl, [p1])[1] == {"accepted": 0, "stale": 1, "records": 1}  # older
        assert post(ctl, [final])[1]["accepted"] == 1
        assert post(ctl, [p2, late])[1] == {"accepted": 0, "stale": 2, "records": 2}
        assert post(ctl, [final])[1]["accepted"] == 1  # a resend: same values
        (rec,) = ctl.get("/api/v1/jobs/local/42")[1]["records"]
        assert rec["job"]["state"] == "ended" and rec["energy_uj"]["cpu"] == 210
        assert [s["cpu_uj"] for s in rec["series"]] == [210]
        assert metric_value(ctl.metrics(), "greend_controller_records_stale_total") == 3
        # The same job on another node is another record.
        assert post(ctl, [record("42", node="n2")], node="n2")[1]["accepted"] == 1
        assert len(ctl.get("/api/v1/jobs/local/42")[1]["records"]) == 2
        # Sent before its submit time was known (0), then with it: one record, which moved.
        assert post(ctl, [record("43", series=[bucket(1100.0, 100)])])[1]["accepted"] == 1
        assert post(ctl, [record("43", submit_time=1699999000, last_seen=1130.0)])[1] == {
            "accepted": 1, "stale": 0, "records": 1}
        (rec,) = ctl.get("/api/v1/jobs/local/43")[1]["records"]
        assert [s["cpu_uj"] for s in rec["series"]] == [100]
        assert ctl.rows("SELECT submit_time FROM jobs WHERE job_id = '43'")[0][0] == 1699999000
        # ... unless it is another job with the same id (another first_seen).
        post(ctl, [record("44")])
        post(ctl, [record("44", submit_time=1699999000, first_seen=5000.0, last_seen=5100.0)])
        assert len(ctl.get("/api/v1/jobs/local/44")[1]["records"]) == 2
        assert ctl.stop() == 0


@pytest.mark.slow
def test_controller_read_api_private_jobs_and_token_readers(tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    with controller(tmp_path / "ctl", tok, config={"daemon": {"private_jobs": True}}) as ctl:
        ctl.start()
        assert post(ctl, [record("1"), record("2", user="bob")])[0] == 200
        # No identity over TCP: no job data...
        st, d = ctl.get("/api/v1/jobs")
        assert st == 403 and "private_jobs" in d["error"]
        # ... but a service holding the site token (policy engine, TUI on the controller) is an admin.
        st, d = ctl.get("/api/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert st == 200 and {j["job"]["user"] for j in d["jobs"]} == {"alice", "bob"}
        st, d = ctl.get("/api/v1/summary?by=user", headers={"Authorization": f"Bearer {TOKEN}"})
        assert st == 200 and {r["key"] for r in d["rows"]} == {"alice", "bob"}
        assert ctl.get("/api/v1/jobs", headers={"Authorization": "Bearer wrong"})[0] == 403
        st, d = ctl.get("/api/v1/clusters")
        assert st == 200 and d["node"] is None and "local" in d["clusters"]
        h = ctl.health()
        assert h["role"] == "controller" and h["agents"][0]["node"] == "n1"
        assert ctl.stop() == 0


# -- the outbox, in process -----------------------------------------------------------------------
class Jobs:
    """A jobs source of `n` Slurm jobs burning CPU time."""

    name = "fake"

    def __init__(self, n: int):
        self.n, self.reads = n, 0

    def read(self):
        from greend.collectors.base import JobUsage

        self.reads += 1
        return [JobUsage(f"slurm/local/{100 + i}", "slurm", str(100 + i), 0,
                         self.reads * 10**9, alloc_cpus=1.0, cluster="local") for i in range(self.n)]


def make_monitor(tmp_path, clock, n_jobs: int, step_s: int = 60):
    from greend import agent, config
    from greend.ledger import Ledger
    from greend.monitor import Monitor

    cfg = config.parse({"node": "n1", "state_dir": str(tmp_path), "power": {"rapl": False},
                        "sampling": {"series_step_s": step_s}})
    led = Ledger(tmp_path / "ledger.sqlite")
    m = Monitor(cfg, led, jobs_source=Jobs(n_jobs), energy_sources=[], clock=clock, resume=False)
    box = agent.Outbox(m)
    m.on_checkpoint.append(box)
    return cfg, led, m, box


def test_outbox_commits_or_rolls_back_with_the_checkpoint(tmp_path, clock):
    _, led, m, box = make_monitor(tmp_path, clock, 3)
    m.tick()
    clock.advance(5)
    m.tick()
    assert m.checkpoint() == 3
    rows = led.db.execute("SELECT kind, ref, seq FROM outbox ORDER BY kind, ref").fetchall()
    assert [(r[0], r[2]) for r in rows] == [("job", 1)] * 3 + [("node", 1)]
    assert box.backlog == 3
    before = led.db.execute("SELECT SUM(cpu_time_ns) FROM jobs").fetchone()[0]

    def broken(db, accounts):
        raise sqlite3.OperationalError("disk I/O error")

    m.on_checkpoint.append(broken)
    clock.advance(5)
    m.tick()
    with pytest.raises(sqlite3.OperationalError):
        m.checkpoint()
    # Neither the books nor the outbox moved.
    assert led.db.execute("SELECT SUM(cpu_time_ns) FROM jobs").fetchone()[0] == before
    assert {r[0] for r in led.db.execute("SELECT seq FROM outbox")} == {1}
    m.on_checkpoint.remove(broken)
    m.checkpoint()
    assert led.db.execute("SELECT SUM(cpu_time_ns) FROM jobs").fetchone()[0] > before
    assert {r[0] for r in led.db.execute("SELECT seq FROM outbox")} == {2}
    m.close()
    led.close()


def test_sender_drains_in_bounded_batches_and_splits_long_series(tmp_path, clock, monkeypatch):
    from greend import agent, config

    tok = token_file(tmp_path / "token", TOKEN)
    ctl_cfg = config.parse({"controller": {"state_dir": str(tmp_path / "ctl"),
                                           "token_file": str(tok), "listen": "127.0.0.1:0",
                                           "socket": ""}})
    from greend.controller import Controller

    c = Controller(ctl_cfg)
    c.start()
    try:
        port = c.server.port
        _, led, m, box = make_monitor(tmp_path / "agent", clock, 7, step_s=1)
        m.tick()
        for _ in range(6):  # 6 series buckets of 1 s per job
            clock.advance(1)
            m.tick()
        m.checkpoint()
        settings = config.Controller(url=f"http://127.0.0.1:{port}", token_file=tok, batch_records=3)
        s = agent.Sender(settings, TOKEN.encode(), led.path, "local", "n1", box)
        monkeypatch.setattr(agent, "MAX_SERIES_PER_BATCH", 4)
        batches = 0
        while s.send_once():
            batches += 1
            assert batches < 100
        batches += 1
        assert batches >= 11  # 7 jobs x 6 buckets, at most 4 buckets a batch
        assert led.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
        assert box.backlog == 0 and s.sent_total >= 7 and not s.last_error
        got = c.ledger.db.execute(
            "SELECT COUNT(*), SUM(cpu_time_ns) FROM job_series").fetchone()
        want = led.db.execute("SELECT COUNT(*), SUM(cpu_time_ns) FROM job_series").fetchone()
        assert tuple(got) == tuple(want) and want[0] == 42
        assert c.ledger.db.execute("SELECT SUM(cpu_time_ns) FROM jobs").fetchone()[0] == \
            led.db.execute("SELECT SUM(cpu_time_ns) FROM jobs").fetchone()[0]
        # Queued again by a checkpoint while a batch is in flight: not dropped.
        clock.advance(1)
        m.tick()
        m.checkpoint()
        assert box.backlog == 7
        s.close()
        m.close()
        led.close()
    finally:
        c.shutdown()


def test_sender_reports_an_unreachable_controller(tmp_path, clock):
    from greend import agent, config

    tok = token_file(tmp_path / "token", TOKEN)
    _, led, m, box = make_monitor(tmp_path, clock, 2)
    m.tick()
    clock.advance(5)
    m.tick()
    m.checkpoint()
    settings = config.Controller(url="http://127.0.0.1:9", token_file=tok, unreachable_after_s=0,
                                 timeout_s=2)
    s = agent.Sender(settings, TOKEN.encode(), led.path, "local", "n1", box)
    with pytest.raises(agent._SendFailed):
        s.send_once()
    assert s.errors == {"unreachable": 1}
    (reason,) = s.health_reasons()
    assert "controller unreachable" in reason and "2 record(s) queued" in reason
    assert led.db.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'job'").fetchone()[0] == 2
    s.close()
    m.close()
    led.close()
    assert os.path.exists(tmp_path / "ledger.sqlite")


def test_jobs_closed_by_a_reboot_are_sent_too(tmp_path):
    """After a reboot the agent's resume closes the jobs that were running, outside any checkpoint:
    their final records still go to the controller."""
    from greend import config
    from greend.daemon import Daemon
    from greend.ledger import JobRow, Ledger

    led = Ledger(tmp_path / "ledger.sqlite")
    with led.transaction() as db:
        pk = led.upsert_job(db, JobRow(cluster="local", job_id="77", node="n1", kind="slurm",
                                       state="running", first_seen=1000.0, last_seen=1100.0,
                                       cpu_uj=5, meta={"key": "slurm/local/77"}))
        led.put_counters(db, "n1", 1100.0, {"boot_id": "a-boot-before", "cpu": [0, 0],
                                            "counters": {}, "jobs": {}})
    led.close()
    tok = token_file(tmp_path / "token", TOKEN)
    cfg = config.parse({"node": "n1", "state_dir": str(tmp_path), "power": {"rapl": False},
                        "attribution": {"jobs_from": "procscan"},
                        "controller": {"url": "http://127.0.0.1:9", "token_file": str(tok)}})
    d = Daemon(cfg, listen="127.0.0.1:0", socket_path=None)
    try:
        assert d.ledger.get_job("local", "77")[0].state == "ended"
        assert [tuple(r) for r in d.ledger.db.execute("SELECT ref FROM outbox WHERE kind = 'job'")] == [(pk,)]
    finally:
        d.monitor.close()
        d.ledger.close()
