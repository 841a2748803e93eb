"""Several controllers on one site database (MariaDB, PostgreSQL): a real agent given both URLs
fails over when the controller it sends to is killed in the middle of a batch, and the site's
books end exactly equal to the agent's own: nothing lost, nothing doubled."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from daemonproc import Greend, busy, greend_argv, job_id, metric_value, stop, token_file, wait_for

pytest.importorskip("sqlalchemy", reason="greend[sitedb] is not installed")
pytest_plugins = ["sitedb_servers"]

from greend import sitedb  # noqa: E402

TOKEN = "site-token-failover-0123456789"


def controller(home, tok, db, env: dict | None = None) -> Greend:
    g = Greend(home, command="controller", config={"controller": db.settings()},
               args=["--socket", "", "--token-file", str(tok)])
    if env:  # Greend.start drops GREEND_* variables: start it here with the test hook's
        e = {k: v for k, v in os.environ.items() if not k.startswith(("GREEND_", "SLURM_"))}
        with open(g.log_path, "ab") as log:
            g.proc = subprocess.Popen([*greend_argv(), *g.argv()], stdout=log,
                                      stderr=subprocess.STDOUT, env={**e, **env},
                                      stdin=subprocess.DEVNULL)
        g.wait_ready()
    else:
        g.start()
    return g


def site_books(site: sitedb.ServerSite, node: str) -> dict:
    """The site database's records of one node, as tests/test_site.py's books() reads a ledger."""
    def q(sql):
        with site.engine.connect() as c:
            return [tuple(r) for r in c.execute(site.sa.text(sql), {"n": node})]
    jobs = {(r[0], r[1], r[2]): r for r in q(
        "SELECT cluster, job_id, submit_time, node, kind, state, first_seen, last_seen, "
        "cpu_time_ns, cpu_uj, dram_uj, gpu_uj, memory_uj, facility_j, carbon_g, water_site_l, "
        "water_offsite_l FROM jobs WHERE node = :n")}
    series = {tuple(r[:5]): tuple(r[5:]) for r in q(
        "SELECT j.cluster, j.job_id, j.submit_time, s.t_start, s.factor_set, s.t_end, s.cpu_uj, "
        "s.cpu_time_ns, s.carbon_g FROM job_series s JOIN jobs j ON j.pk = s.job_pk "
        "WHERE j.node = :n")}
    totals = {r[0]: r for r in q(
        "SELECT domain, source, energy_uj, unattributed_uj, idle_uj FROM node_totals WHERE node = :n")}
    return {"jobs": jobs, "series": series, "node_totals": totals}


def agent_books(a: Greend, node: str) -> dict:
    jobs = {(r[0], r[1], r[2]): tuple(r) for r in a.rows(
        "SELECT cluster, job_id, submit_time, node, kind, state, first_seen, last_seen, "
        "cpu_time_ns, cpu_uj, dram_uj, gpu_uj, memory_uj, facility_j, carbon_g, water_site_l, "
        "water_offsite_l FROM jobs WHERE node = ?", (node,))}
    series = {tuple(r[:5]): tuple(r[5:]) for r in a.rows(
        "SELECT j.cluster, j.job_id, j.submit_time, s.t_start, s.factor_set, s.t_end, s.cpu_uj, "
        "s.cpu_time_ns, s.carbon_g FROM job_series s JOIN jobs j ON j.pk = s.job_pk "
        "WHERE j.node = ?", (node,))}
    totals = {r[0]: tuple(r) for r in a.rows(
        "SELECT domain, source, energy_uj, unattributed_uj, idle_uj FROM node_totals WHERE node = ?",
        (node,))}
    return {"jobs": jobs, "series": series, "node_totals": totals}


@pytest.mark.slow
def test_a_controller_killed_mid_batch_loses_and_doubles_nothing(server_db, tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    # The first controller holds every batch's transaction open: killed while it holds one.
    ctl1 = controller(tmp_path / "ctl1", tok, server_db, env={"GREEND_TEST_HOLD_COMMIT_S": "120"})
    ctl2 = controller(tmp_path / "ctl2", tok, server_db)
    a = Greend(tmp_path / "n1", node="n1", config={"controller": {
        "url": [f"http://127.0.0.1:{ctl1.port}", f"http://127.0.0.1:{ctl2.port}"],
        "token_file": str(tok), "send_interval_s": 0.5, "backoff_max_s": 1.0, "timeout_s": 300}})
    jobs = []
    try:
        a.start()
        jobs = [busy(job_id()), busy(job_id())]
        wait_for(lambda: "holding the commit" in ctl1.log(), 60, what="a batch held by controller 1")
        ctl1.kill9()  # mid-batch: its rows are written but not committed
        wait_for(lambda: ctl2.health()["records_received"] > 0, 60, what="the batch at controller 2")
        assert f"sending to http://127.0.0.1:{ctl2.port}" in a.log()
        wait_for(lambda: metric_value(a.metrics(), "greend_outbox_controller_up") == 1, 30,
                 what="the agent sending to controller 2")
        stop(jobs[0])  # a job ends: its final record goes to controller 2
        time.sleep(2.0)
        stop(jobs[1])
        time.sleep(1.5)
        assert a.stop() == 0, a.log()  # the final checkpoint is sent before exiting
    finally:
        for p in jobs:
            stop(p)
        a.__exit__()
        ctl1.__exit__()
    assert a.rows("SELECT COUNT(*) FROM outbox")[0][0] == 0, f"outbox not drained:\n{a.log()[-3000:]}"
    # (for the message below: records the site database judged older than what it had)
    stale = metric_value(ctl2.metrics(), "greend_controller_records_stale_total")
    assert ctl2.stop() == 0
    site = sitedb.ServerSite(server_db.url, server_db.password)
    try:
        mine, theirs = agent_books(a, "n1"), site_books(site, "n1")
        assert mine["jobs"] and mine["series"] and mine["node_totals"]
        why = (f"controller 2 judged {stale} record(s) stale\nagent log:\n{a.log()[-3000:]}\n"
               f"controller 2 log:\n{ctl2.log()[-2000:]}")
        assert theirs["jobs"] == mine["jobs"], why
        assert theirs["series"] == mine["series"], why
        assert theirs["node_totals"] == mine["node_totals"], why
    finally:
        site.close()
    assert "Traceback" not in a.log() and "Traceback" not in ctl2.log()


def test_the_sender_fails_over_on_5xx_but_not_on_a_refused_token(tmp_path, clock):
    """In process: a controller answering 503 (its database away) sends the batch to the next
    URL at once; a 401 is the site's problem, not the controller's: no failover."""
    import http.server
    import threading

    from test_site import make_monitor

    from greend import agent, config
    from greend.controller import Controller

    answers = {"status": 503}

    class Sick(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"error": "ledger unavailable, retry later"}'
            self.send_response(answers["status"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    sick = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sick)
    threading.Thread(target=sick.serve_forever, daemon=True).start()
    tok = token_file(tmp_path / "token", TOKEN)
    ctl_cfg = config.parse({"controller": {"state_dir": str(tmp_path / "ctl"), "token_file": str(tok),
                                           "listen": "127.0.0.1:0", "socket": ""}})
    c = Controller(ctl_cfg)
    c.start()
    try:
        _, led, m, box = make_monitor(tmp_path / "agent", clock, 3)
        m.tick()
        clock.advance(5)
        m.tick()
        m.checkpoint()
        urls = [f"http://127.0.0.1:{sick.server_address[1]}", f"http://127.0.0.1:{c.server.port}"]
        s = agent.Sender(config.Controller(url=urls, token_file=tok), TOKEN.encode(), led.path,
                         "local", "n1", box)
        while s.send_once():
            pass
        assert s.url == urls[1] and s.failovers == 1 and s.errors == {"http": 1}
        assert s.status()["controllers"] == urls and not s.last_error
        assert c.ledger.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3
        # A refused token at the first controller: reported, not hidden by another controller.
        answers["status"] = 401
        s.current = 0  # as after a restart of the agent
        s._close_conn()
        clock.advance(5)
        m.tick()
        m.checkpoint()
        with pytest.raises(agent._SendFailed):
            s.send_once()
        assert s.url == urls[0] and s.failovers == 1 and s.errors["auth"] == 1
        s.close()
        m.close()
        led.close()
    finally:
        c.shutdown()
        sick.shutdown()
