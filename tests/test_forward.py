"""Records across sites: two real site controllers forward what they store to a real institute
controller (greend/forward.py), with the agents' protocol. The institute's books are the sum of the
sites' books, with each record's cluster and node named after its site; an institute outage (kill
-9, records arriving at the sites meanwhile, then a restart) loses nothing and doubles nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from daemonproc import Greend, greend_argv, metric_value, request, token_file, wait_for

from greend import config

SITE_TOKEN = "site-token-0123456789abcdef"
INSTITUTE_TOKEN = "institute-token-fedcba9876543210"
FACTORS = {"id": "f1", "pue": 1.5, "wue_site_l_per_kwh": 1.8, "ewif_l_per_kwh": 3.0,
           "carbon_intensity_g_per_kwh": 50.0, "sources": {"pue": "site"}, "first_used": 1000.0}


def controller(home, tok, **controller_cfg) -> Greend:
    c = {"send_interval_s": 0.3, "backoff_max_s": 0.5, "unreachable_after_s": 1.0, **controller_cfg}
    return Greend(home, command="controller", config={"controller": c},
                  args=["--socket", "", "--token-file", str(tok)])


def record(job: str, node: str, step: int, state: str = "running") -> dict:
    """Job `job` on `node` after `step` minutes: absolute totals and one bucket per minute."""
    t0 = 1000.0
    series = [{"t_start": t0 + 60 * i, "t_end": t0 + 60 * (i + 1), "factor_set": "f1",
               "cpu_uj": 1000 * (i + 1), "dram_uj": 0, "gpu_uj": 0, "memory_uj": 7,
               "cpu_time_ns": 10**9, "carbon_g": 0.001 * (i + 1), "water_site_l": 0.0001,
               "water_offsite_l": 0.0002} for i in range(step)]
    return {"cluster": "local", "job_id": job, "node": node, "kind": "slurm", "state": state,
            "first_seen": t0, "last_seen": t0 + 60 * step, "user": "alice", "account": "proj1",
            "submit_time": 900, "cpu_time_ns": step * 10**9,
            "cpu_uj": sum(s["cpu_uj"] for s in series), "memory_uj": 7 * step,
            "carbon_g": sum(s["carbon_g"] for s in series), "provenance": {"cpu": "modelled: TDP"},
            "series": series}


def post(ctl: Greend, node: str, records: list, energy_uj: int) -> None:
    """What an agent on `node` sends: its records and its node's totals and series."""
    batch = {"agent": {"cluster": "local", "node": node, "version": "test"}, "records": records,
             "factor_sets": [FACTORS],
             "nodes": [{"node": node, "totals": [{"domain": "package-0", "source": "cpu",
                                                  "provenance": "modelled", "energy_uj": energy_uj,
                                                  "unattributed_uj": energy_uj // 10, "idle_uj": 0}],
                        "series": [{"t_start": 1000.0, "t_end": 1060.0, "energy_uj": energy_uj,
                                    "unattributed_uj": energy_uj // 10}]}]}
    st, _, out = request(ctl.port, "POST", "/api/v1/records", body=json.dumps(batch).encode(),
                         headers={"Authorization": f"Bearer {SITE_TOKEN}",
                                  "Content-Type": "application/json"})
    assert st == 200, out


BOOKS = {
    "jobs": "SELECT COUNT(*), TOTAL(cpu_uj), TOTAL(carbon_g), TOTAL(cpu_time_ns) FROM jobs",
    "series": "SELECT COUNT(*), TOTAL(cpu_uj), TOTAL(carbon_g) FROM job_series",
    "node_totals": "SELECT COUNT(*), TOTAL(energy_uj), TOTAL(unattributed_uj) FROM node_totals",
    "node_series": "SELECT COUNT(*), TOTAL(energy_uj) FROM node_series",
}


def books(g: Greend) -> dict[str, tuple]:
    return {k: tuple(round(x, 9) for x in g.rows(sql)[0]) for k, sql in BOOKS.items()}


def summed(*gs: Greend) -> dict[str, tuple]:
    out = {}
    for k in BOOKS:
        rows = [books(g)[k] for g in gs]
        out[k] = tuple(round(sum(col), 9) for col in zip(*rows, strict=True))
    return out


@pytest.mark.slow
def test_two_sites_forward_to_an_institute_which_survives_an_outage(tmp_path):
    site_tok = token_file(tmp_path / "site.token", SITE_TOKEN)
    inst_tok = token_file(tmp_path / "institute.token", INSTITUTE_TOKEN)
    institute = controller(tmp_path / "institute", inst_tok)
    with institute:
        institute.start()
        up = f"http://127.0.0.1:{institute.port}"
        # batch_records = 3: a node's 5 jobs take two requests, and a batch looks for its node's
        # entries among the oldest 12 only (forward.WINDOW x 3).
        sites = {name: controller(tmp_path / name, site_tok, site=name, upstream_url=up,
                                  upstream_token_file=str(inst_tok), batch_records=3)
                 for name in ("lyon", "paris")}
        with sites["lyon"], sites["paris"]:
            for s in sites.values():
                s.start()
            lyon, paris = sites["lyon"], sites["paris"]
            # Both sites have a cluster "local" and a node "n1": only the site tells them apart.
            for step in (1, 2, 3):
                post(lyon, "n1", [record("101", "n1", step), record("102", "n1", step)], 5000 * step)
                post(lyon, "n2", [record("101", "n2", step)], 3000 * step)
                post(paris, "n1", [record("101", "n1", step)], 7000 * step)

            def caught_up():
                return books(institute) == summed(lyon, paris)
            wait_for(caught_up, 30, what=lambda: f"institute {books(institute)} == sites "
                     f"{summed(lyon, paris)}")
            names = {(r["cluster"], r["node"]) for r in institute.rows("SELECT cluster, node FROM jobs")}
            assert names == {("lyon:local", "lyon:n1"), ("lyon:local", "lyon:n2"),
                             ("paris:local", "paris:n1")}
            assert {r["node"] for r in institute.rows("SELECT node FROM node_totals")} == {
                "lyon:n1", "lyon:n2", "paris:n1"}
            assert books(institute)["jobs"][0] == 4
            # The institute serves them like any site's: the summary is the sites' sum.
            st, summary = institute.get("/api/v1/summary?by=cluster")
            assert st == 200, summary
            # jobs are distinct (cluster, job): lyon's 101 ran on two nodes
            assert {r["key"]: r["jobs"] for r in summary["rows"]} == {"lyon:local": 2, "paris:local": 1}
            at_sites = [s.get("/api/v1/summary?by=cluster")[1] for s in (lyon, paris)]
            assert summary["node_energy_j"] == pytest.approx(sum(s["node_energy_j"] for s in at_sites))
            assert summary["node_energy_j"] > 0
            assert metric_value(lyon.metrics(), "greend_outbox_controller_up") == 1.0

            # The institute dies; the sites go on storing (new steps, a new job, final records).
            institute.kill9()
            post(lyon, "n1", [record("101", "n1", 4), record("102", "n1", 4, "ended")], 20000)
            post(paris, "n1", [record("101", "n1", 4, "ended"), record("103", "n1", 1)], 28000)
            post(paris, "n2", [record("104", "n2", 2)], 1000)
            wait_for(lambda: lyon.reasons("upstream"), 15, what="lyon says its upstream is down")
            assert metric_value(paris.metrics(), "greend_outbox_controller_up") == 0.0
            assert metric_value(paris.metrics(), "greend_outbox_records") == 3
            assert books(institute)["jobs"][0] == 4  # nothing new arrived meanwhile

            institute.start()
            wait_for(caught_up, 30, what=lambda: f"institute {books(institute)} == sites "
                     f"{summed(lyon, paris)}")
            assert books(institute)["jobs"][0] == 6
            ended = institute.rows("SELECT cluster, job_id, node FROM jobs WHERE state = 'ended'")
            assert {tuple(r) for r in ended} == {("lyon:local", "102", "lyon:n1"),
                                                 ("paris:local", "101", "paris:n1")}
            wait_for(lambda: not lyon.reasons("upstream") and not paris.reasons("upstream"), 15,
                     what="the sites' upstream is reported up again")
            assert metric_value(paris.metrics(), "greend_outbox_records") == 0

            # Killed while forwarding: a burst of 40 nodes' records is on its way (one request a
            # node) when the institute dies; what it had not acknowledged is sent again.
            for i in range(40):
                post(lyon, f"b{i:02d}", [record(str(200 + j), f"b{i:02d}", 2) for j in range(5)], 100 * i)
            wait_for(lambda: 0 < books(institute)["jobs"][0] - 6 < 200, 15, every=0.02,
                     what="the burst half forwarded")
            institute.kill9()
            partial = books(institute)["jobs"][0] - 6
            institute.start()
            wait_for(caught_up, 30, what=lambda: f"institute {books(institute)} == sites "
                     f"{summed(lyon, paris)}")
            assert books(institute)["jobs"][0] == 6 + 200, partial
            for s in sites.values():
                assert s.stop() == 0
        assert institute.stop() == 0


def test_upstream_config_errors_name_the_key():
    base = {"upstream_url": "http://inst:9472", "upstream_token_file": "/t", "site": "lyon"}
    assert config.parse({"controller": base}).controller.upstream_url == "http://inst:9472"
    cases = [({"upstream_token_file": None}, "controller.upstream_token_file"),
             ({"site": ""}, "controller.site is not"),
             ({"site": "ly:on"}, "without ':'"),
             ({"upstream_url": "ftp://inst"}, "expected http://HOST:PORT")]
    for change, words in cases:
        c = {k: v for k, v in {**base, **change}.items() if v is not None}
        with pytest.raises(config.ConfigError) as e:
            config.parse({"controller": c})
        assert words in str(e.value), (change, str(e.value))


def test_config_check_reads_the_upstream_token(tmp_path):
    cfg = tmp_path / "greend.toml"
    missing = tmp_path / "institute.token"
    cfg.write_text(f'[controller]\nsite = "lyon"\nupstream_url = "http://inst:9472"\n'
                   f'upstream_token_file = "{missing}"\n')
    r = subprocess.run([*greend_argv(), "config", "check", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0, r.stderr
    assert f"controller.upstream_token_file {missing}: no such file" in r.stderr, r.stderr
    token_file(missing, INSTITUTE_TOKEN)
    r = subprocess.run([*greend_argv(), "config", "check", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_reload_keeps_forwarding_and_refuses_to_switch_it_off(tmp_path):
    site_tok = token_file(tmp_path / "site.token", SITE_TOKEN)
    inst_tok = token_file(tmp_path / "institute.token", INSTITUTE_TOKEN)
    institute = controller(tmp_path / "institute", inst_tok)
    site = controller(tmp_path / "lyon", site_tok, site="lyon",
                      upstream_url=f"http://127.0.0.1:{institute.port}", upstream_token_file=str(inst_tok))
    with institute, site:
        site.start()
        post(site, "n1", [record("101", "n1", 1)], 5000)
        wait_for(lambda: site.reasons("upstream: controller unreachable"), 15,
                 what="the site says its institute is unreachable")
        # A new institute token, read on SIGHUP: the institute (started with it) accepts the site.
        new_tok = token_file(tmp_path / "institute2.token", INSTITUTE_TOKEN + "-2")
        site.cfg["controller"]["upstream_token_file"] = str(new_tok)
        site.write_config()
        site.signal(signal.SIGHUP)
        institute.args = ["--socket", "", "--token-file", str(new_tok)]
        institute.start()
        wait_for(lambda: books(institute)["jobs"][0] == 1, 30, what="the record forwarded")
        assert not site.reasons("upstream")
        # Switching forwarding off is refused (a restart does it); forwarding goes on.
        site.cfg["controller"]["upstream_url"] = ""
        site.write_config()
        site.signal(signal.SIGHUP)
        wait_for(lambda: site.reasons("needs a restart"), 10, what="the reload refused")
        post(site, "n1", [record("101", "n1", 2)], 6000)
        wait_for(lambda: books(institute) == books(site), 30, what="still forwarding")
        assert site.stop() == 0
        assert institute.stop() == 0
