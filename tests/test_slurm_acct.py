"""greend's footprints in Slurm's accounting: the AdminComment format, sacct parsing, the report,
and against the real testbed with slurmdbd: the epilog's final figure in `sacct`, `greend report`,
the MailProg wrapper, and the model estimate for a job greend did not see."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from daemonproc import GREEND, Greend, wait_for
from greend.collectors.sacct import DELIM, FIELDS, Sacct, SacctJob, cpu_seconds, parse_sacct

from greend import config as config_mod
from greend import slurm_acct as sa

MIB = 1 << 20


def figures(**kw) -> sa.Figures:
    base = dict(status="final", t=1796114764, nodes=2, it_j=1234.5, cpu_j=1000.25, dram_j=0.0,
                memory_j=234.25, gpu_j=0.0, facility_j=1728.3, carbon_g=0.0269, water_site_l=0.000617,
                water_offsite_l=0.000778, cpu_s=20.5, pue=1.4, ci_g_per_kwh=56.04,
                wue_l_per_kwh=1.8, ewif_l_per_kwh=1.62, src={"cpu": "measured", "memory": "modelled"})
    base.update(kw)
    return sa.Figures(**base)


def sacctmgr_mangles(text: str) -> str:
    """What sacctmgr stores (seen on 22.05): the value lowercased, `"` turned into a backtick."""
    return text.lower().replace('"', "`")


# -- the comment ------------------------------------------------------------------------------------
def test_comment_survives_sacctmgr_and_reads_back():
    f = figures()
    text = sa.encode(f)
    assert sacctmgr_mangles(text) == text  # nothing for sacctmgr to change
    assert "|" not in text and "," not in text and '"' not in text
    back = sa.decode(sacctmgr_mangles(text))
    assert back is not None and back.status == "final" and back.t == f.t and back.nodes == 2
    for key, attr in sa._KEYS:
        assert getattr(back, attr) == pytest.approx(getattr(f, attr), rel=1e-5), key
    assert back.src == f.src


def test_comment_found_among_other_entries_and_foreign_text_ignored():
    entry = sa.encode(figures(status="provisional", t=5))
    got = sa.decode(f"note: rerun | {entry}")
    assert got is not None and got.status == "provisional" and got.t == 5
    assert sa.decode("greend (so far): energy_j=1.0 node=n1") is None  # the running entry
    assert sa.decode("") is None and sa.decode("JS1:abcdEF==") is None
    assert sa.decode("greend v1 final t=x e_j=1") is None  # unreadable: never taken as figures


def test_newer_figures_win_final_beats_provisional():
    prov_late = figures(status="provisional", t=200)
    final_early = figures(status="final", t=100)
    assert final_early.newer_than(prov_late) and not prov_late.newer_than(final_early)
    assert figures(t=101).newer_than(final_early) and not figures(t=100).newer_than(final_early)
    assert prov_late.newer_than(None)


def test_merge_keeps_lowercase_text_and_refuses_what_sacctmgr_would_corrupt():
    entry = sa.encode(figures())
    assert sa.merge("", entry) == entry
    old = sa.encode(figures(status="provisional", t=1))
    assert sa.merge(f"site note | {old}", entry) == f"site note | {entry}"
    assert sa.merge("JS1:H4sIAAAA", entry) is None  # Jobstats' summary: mixed case
    assert sa.merge('say "hi"', entry) is None


def test_sum_records_final_only_when_every_node_is_in_and_ended():
    def rec(node, state, it, last_seen):
        return {"job": {"node": node, "state": state, "last_seen": last_seen, "first_seen": 10},
                "energy_j": {"it": it, "cpu": it, "dram": 0, "memory": 0, "gpu": 0, "facility": it * 1.5},
                "carbon_g": it / 1000, "water_l": {"site": 1e-6, "offsite": 2e-6}, "cpu_time_s": 3.0,
                "provenance": {"cpu": "modelled: TDP 35 W"},
                "factors": [{"pue": 1.5, "carbon_intensity_g_per_kwh": 50.0, "wue_site_l_per_kwh": 1.0,
                             "ewif_l_per_kwh": 2.0}]}
    one = sa.sum_records([rec("n1", "ended", 10.0, 100.5)], expected_nodes=2)
    assert one.status == "provisional" and one.nodes == 1  # n2's record has not arrived
    both = sa.sum_records([rec("n1", "ended", 10.0, 100.5), rec("n2", "running", 5.0, 99)], 2)
    assert both.status == "provisional"
    done = sa.sum_records([rec("n1", "ended", 10.0, 100.5), rec("n2", "ended", 5.0, 101)], 2)
    assert done.status == "final" and done.t == 101 and done.it_j == 15.0
    assert done.facility_j == 22.5 and done.cpu_s == 6.0 and done.src == {"cpu": "modelled"}
    assert (done.pue, done.ci_g_per_kwh) == (1.5, 50.0)
    assert sa.sum_records([], 1) is None


# -- sacct ------------------------------------------------------------------------------------------
def sacct_line(**kw) -> str:
    row = dict.fromkeys(FIELDS, "")
    row.update(kw)
    return DELIM.join(row[f] for f in FIELDS)


def test_parse_sacct_folds_steps_into_jobs():
    text = "\n".join([
        DELIM.join(FIELDS),
        sacct_line(JobIDRaw="7", JobID="7", Cluster="site", User="ann", UID="1001", Account="proj",
                   Partition="batch", JobName="train|v2", State="CANCELLED by 0", Submit="100",
                   Start="110", End="230", ElapsedRaw="120", TimelimitRaw="60",
                   TotalCPU="1-01:02:03.500", AllocTRES="billing=4,cpu=4,gres/gpu=2,mem=8G,node=2",
                   NNodes="2", NodeList="g[1-2]", AdminComment="greend v1 final t=1 e_j=2",
                   ExitCode="0:15"),
        sacct_line(JobIDRaw="7.batch", JobID="7.batch", MaxRSS="1024K"),
        sacct_line(JobIDRaw="7.0", JobID="7.0", MaxRSS="3G"),
        sacct_line(JobIDRaw="8", JobID="5_3", State="RUNNING", Start="Unknown", End="Unknown",
                   AllocTRES="cpu=1,mem=500M", TotalCPU="00:02.250"),
        "garbage without delimiters",
    ])
    a, b = parse_sacct(text)
    assert (a.cluster, a.job_id, a.user, a.uid, a.name, a.state) == ("site", "7", "ann", 1001, "train|v2",
                                                                     "CANCELLED")
    assert (a.submit_time, a.start_time, a.end_time, a.elapsed_s, a.time_limit_s) == (100, 110, 230,
                                                                                     120.0, 3600.0)
    assert a.cpu_time_s == 86400 + 3600 + 2 * 60 + 3.5
    assert (a.alloc_cpus, a.alloc_mem_bytes, a.alloc_gpus, a.alloc_nodes) == (4.0, 8 << 30, 2, 2)
    assert a.max_rss_bytes == 3 << 30 and a.ended and a.admin_comment.startswith("greend v1")
    assert (b.job_id, b.job_id_raw, b.state, b.start_time, b.end_time) == ("5_3", "8", "RUNNING", None, None)
    assert b.cpu_time_s == 2.25 and b.max_rss_bytes is None and not b.ended


@pytest.mark.parametrize("text,seconds", [
    ("00:00.003", 0.003), ("01:02", 62.0), ("1:00:00", 3600.0), ("2-00:00:01", 172801.0),
    ("", 0.0), ("junk", 0.0),
])
def test_cpu_seconds(text, seconds):
    assert cpu_seconds(text) == pytest.approx(seconds)


# -- the report's parts ------------------------------------------------------------------------------
def past(**kw) -> SacctJob:
    base = dict(cluster="site", job_id="9", job_id_raw="9", name="train", user="ann", uid=1001,
                account="proj", partition="batch", state="COMPLETED", submit_time=100, start_time=110,
                end_time=3710, elapsed_s=3600.0, time_limit_s=48 * 3600.0, cpu_time_s=3600.0,
                alloc_cpus=8.0, alloc_mem_bytes=32 << 30, alloc_gpus=0, alloc_nodes=1, nodes="n1",
                max_rss_bytes=2 << 30, admin_comment="", exit_code="0:0")
    base.update(kw)
    return SacctJob(**base)


def test_advice_right_sizes_an_oversized_request():
    adv = {a["what"]: a for a in sa.advice(past(), None, gpu_w=300)}
    assert adv["cpus"]["option"] == "--cpus-per-task=2"  # 1 CPU busy -> 1.2 -> 2
    assert adv["memory"]["option"] == "--mem=2560M"  # 2 GiB peak x 1.25
    assert adv["time"]["option"] == "--time=90"
    idle_gpus = figures(gpu_j=300 * 2 * 3600 * 0.01, src={"gpu": "measured"})
    adv = {a["what"]: a for a in sa.advice(past(alloc_gpus=2), idle_gpus, gpu_w=300)}
    assert adv["gpus"]["option"] == "--gpus=0" and "1%" in adv["gpus"]["why"]


def test_advice_leaves_a_well_sized_job_alone():
    fitted = past(cpu_time_s=8 * 3500.0, max_rss_bytes=30 << 30, time_limit_s=2 * 3600.0)
    assert sa.advice(fitted, None, gpu_w=300) == []


def test_model_estimate_follows_the_documented_formula():
    cfg = config_mod.parse({})
    sj = past(cpu_time_s=2 * 3600.0, alloc_cpus=4.0, alloc_mem_bytes=8 << 30)
    f, how = sa.model_figures(sj, cfg)
    p = cfg.power
    want = 3600 * (4 * p.unknown_cpu_w_per_core * 0.5 + 8 * p.memory_w_per_gb)
    assert f.it_j == pytest.approx(want) and how["cpu_usage"] == 0.5
    fs = config_mod.cluster_factors(cfg).at(sj.end_time)
    assert f.carbon_g == pytest.approx(want / 3.6e6 * fs.pue * fs.carbon_intensity_g_per_kwh)
    assert f.water_site_l == pytest.approx(want / 3.6e6 * fs.wue_site_l_per_kwh)
    assert f.src == {"cpu": "modelled", "memory": "modelled"}


def test_report_prefers_the_newest_final_figure_and_labels_the_model():
    cfg = config_mod.parse({})
    d = sa.build_report(past(admin_comment=sa.encode(figures())), cfg)
    assert d["footprint"]["kind"] == "measured" and "AdminComment" in d["footprint"]["label"]
    assert d["footprint"]["it_j"] == pytest.approx(1234.5)
    d = sa.build_report(past(), cfg)
    assert d["footprint"]["kind"] == "model" and "did not see" in d["footprint"]["label"]
    out = sa.text(d)
    assert "model estimate" in out and "Next time:" in out and "--cpus-per-task=2" in out


# -- against the real testbed -----------------------------------------------------------------------
from slurmbed import BURN, root_testbed  # noqa: E402 - with the testbed tests it serves


@pytest.fixture(scope="module")
def tb():
    return root_testbed()


def greend_cli(tb, cluster: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREEND_")}
    env["SLURM_CONF"] = str(tb.conf(cluster))
    return subprocess.run([GREEND, *args], env=env, capture_output=True, text=True, timeout=60)


def wait_cgroup_tree(tb, node: str) -> None:
    """A node's Slurm cgroup tree exists once a job ran there (greend's cgroup mode needs it)."""
    job_id = tb.submit("site", BURN.format(secs=2), extra_args=["-w", node])
    tb.wait_state("site", job_id, "RUNNING", timeout=30)
    wait_for(lambda: (tb.job_cgroup("cpuacct", node, job_id) / "cpuacct.usage").exists()
             or tb.job("site", job_id)["job_state"] != "RUNNING", 30, what="job cgroup")
    tb.wait_accounted("site", job_id)


@pytest.mark.slurm
def test_final_footprint_reaches_sacct_report_and_mail(tb, tmp_path):
    """A real job measured by a real agent: the epilog writes its final footprint into accounting,
    `greend report` reads it back, and the end-of-job mail carries the report."""
    if not tb.uses_cgroups("site"):
        pytest.skip("the testbed runs without job cgroups on this host")
    wait_cgroup_tree(tb, "site-n1")
    cfg = {"cluster": "site", "attribution": {"jobs_from": "cgroup"},
           "slurm": {"enabled": True, "conf": str(tb.conf("site")), "refresh_s": 1.0},
           "clusters": {"site": {"tier": "site"}}}
    mail_out = tmp_path / "mail.txt"
    mailer = tmp_path / "mailer"
    mailer.write_text(f'#!/bin/sh\n{{ echo "ARGS: $*"; cat; }} > {mail_out}.tmp\n'
                      f'mv {mail_out}.tmp {mail_out}\n')
    mailer.chmod(0o755)
    with Greend(tmp_path / "n1", node="site-n1", config=cfg) as g:
        g.start()
        api = f"http://127.0.0.1:{g.port}"
        epilog = (f"#!/bin/sh\nexec {GREEND} slurm epilog --api {api} --final-wait 20 "
                  f"--complete-wait 60 --log-file {tmp_path}/epilog.log\n")
        mail = (f'#!/bin/sh\nexec {GREEND} slurm mail --api {api} --mailer {mailer} --wait 60 -- "$@"\n')
        with tb.hook("site", "epilog-slurmctld", epilog), tb.hook("site", "mailprog", mail):
            job_id = tb.submit("site", BURN.format(secs=4), extra_args=[
                "-w", "site-n1", "-c", "2", "-J", "acct-e2e", "--account=proj-acct",
                "--mail-type=END", "--mail-user=greendtest"])
            tb.wait_accounted("site", job_id)

            def final_comment():
                c = tb.sacct("site", job_id)["AdminComment"]
                return c if c.startswith("greend v1 final") else None
            comment = wait_for(final_comment, 90, what=lambda: (
                f"final figure in AdminComment; have {tb.sacct('site', job_id)}; epilog log: "
                f"{(tmp_path / 'epilog.log').read_text() if (tmp_path / 'epilog.log').exists() else '-'}"))
            wait_for(mail_out.exists, 90, what="the mail wrapper's output")
        rows = g.rows("SELECT * FROM jobs WHERE cluster = 'site' AND job_id = ?", (str(job_id),))
        g.stop()
    # The figure in accounting is the ledger's final one.
    (row,) = rows
    assert row["state"] == "ended"
    fig = sa.decode(comment)
    it_j = (row["cpu_uj"] + row["dram_uj"] + row["gpu_uj"] + row["memory_uj"]) / 1e6
    assert fig.status == "final" and fig.nodes == 1 and fig.t == int(row["last_seen"])
    assert it_j > 0 and fig.it_j == pytest.approx(it_j, rel=1e-5)
    assert fig.carbon_g == pytest.approx(row["carbon_g"], rel=1e-5)
    # A 4 s busy loop: well under 4 CPU seconds on a loaded host, but never nothing.
    assert fig.cpu_s == pytest.approx(row["cpu_time_ns"] / 1e9, rel=1e-5) and fig.cpu_s > 0.1
    assert fig.src["cpu"] == "modelled"  # power.rapl = false in the harness
    # It round-trips through `greend report`, which needs nothing but sacct.
    p = greend_cli(tb, "site", "report", "--json", str(job_id))
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["job"]["state"] == "COMPLETED" and d["job"]["alloc_cpus"] == 2.0
    assert d["job"]["user"] == "greendtest" and d["job"]["account"] == "proj-acct"
    f = d["footprint"]
    assert f["kind"] == "measured" and f["status"] == "final" and "AdminComment" in f["label"]
    assert f["it_j"] == pytest.approx(it_j, rel=1e-5)
    # One busy loop on two CPUs: at most about half (less on a busy host).
    assert 0.005 < d["efficiency"]["cpu"] < 0.6
    # Peak memory: sacct's MaxRSS where Slurm recorded one, else greend's (from the cgroup).
    assert d["efficiency"]["peak_mem_from"] in ("sacct MaxRSS", "greend")
    assert 0 < d["efficiency"]["memory"] < 1
    text = greend_cli(tb, "site", "report", str(job_id)).stdout
    assert f"Job ID: {job_id}" in text and "greend's final figures" in text
    # An older or equal figure never replaces it.
    sacct = Sacct(tb.conf("site"))
    sj = sacct.job(str(job_id), "site")
    older = sa.Figures(status="provisional", t=fig.t + 50, nodes=1, it_j=1.0)
    assert sa._write(sacct, sj, older) and sa._write(sacct, sj, sa.Figures("final", fig.t - 1, 1, 2.0))
    assert tb.sacct("site", job_id)["AdminComment"] == comment
    # The mail: Slurm's subject and recipient passed on, the report appended.
    mailed = mail_out.read_text()
    assert mailed.startswith(f"ARGS: -s Slurm Job_id={job_id} Name=acct-e2e Ended")
    assert mailed.rstrip().endswith("Next time: the request fitted the job; nothing to change.")
    assert "greend report" in mailed and f"Job ID: {job_id}" in mailed and "Energy (IT)" in mailed


@pytest.mark.slurm
def test_job_greend_did_not_see_gets_a_labelled_model_estimate(tb):
    job_id = tb.submit("site", BURN.format(secs=2), extra_args=["-c", "1", "-J", "unseen"])
    tb.wait_accounted("site", job_id)
    p = greend_cli(tb, "site", "report", "--json", str(job_id))
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    f = d["footprint"]
    assert f["kind"] == "model" and "did not see" in f["label"] and f["model"]["formula"]
    cfg = config_mod.parse({})
    j = d["job"]
    want = j["elapsed_s"] * (j["alloc_cpus"] * cfg.power.unknown_cpu_w_per_core * f["model"]["cpu_usage"]
                             + j["alloc_mem_bytes"] / (1 << 30) * cfg.power.memory_w_per_gb)
    assert j["elapsed_s"] >= 2 and f["it_j"] == pytest.approx(want)
    assert "model estimate" in greend_cli(tb, "site", "report", str(job_id)).stdout


@pytest.mark.slurm
def test_report_on_unknown_job_and_bad_api_say_so(tb):
    p = greend_cli(tb, "site", "report", "99999999")
    assert p.returncode == 1 and "accounting has no job 99999999" in p.stderr and not p.stdout
    p = greend_cli(tb, "site", "report", "--api", "ftp://x", "1")
    assert p.returncode == 2 and "expected http://HOST:PORT or unix:/PATH" in p.stderr
    p = greend_cli(tb, "site", "slurm", "epilog", "--api", "http://127.0.0.1:1")
    assert p.returncode == 2 and "SLURM_JOB_ID is not set" in p.stderr


def test_sacct_reader_reports_a_missing_sacct(tmp_path):
    from greend.collectors.sacct import SacctError

    s = Sacct(None)
    s.commands.bin_dir = tmp_path
    with pytest.raises(SacctError, match="sacct: command not found in"):
        s.job("1")


@pytest.mark.slurm
def test_history_and_usage_read_the_whole_record_in_sacct(tb):
    """The engine's history and the budgets see jobs through sacct: measured ones by their
    AdminComment figures, others by their efficiency (history) and the model (usage)."""
    import uuid

    from greend.policies.history import LedgerView
    from greend.policies.history_sacct import SacctHistory
    from greend.policies.site import compile_site

    name, account = f"hist-{uuid.uuid4().hex[:8]}", f"proj-{uuid.uuid4().hex[:6]}"
    ids = [tb.submit("site", BURN.format(secs=2), extra_args=["-c", "1", "-J", name, f"--account={account}"])
           for _ in range(3)]
    for i in ids:
        tb.wait_accounted("site", i)
    sacct = Sacct(tb.conf("site"))
    figs = [figures(t=1, it_j=100.0, gpu_j=0.0, carbon_g=0.5, facility_j=140.0),
            figures(t=2, it_j=300.0, gpu_j=0.0, carbon_g=1.5, facility_j=420.0)]
    for job_id, f in zip(ids[:2], figs, strict=True):
        sacct.set_admin_comment(str(job_id), sa.encode(f), "site")
    site = compile_site(config_mod.parse({
        "cluster": "site", "clusters": {"site": {"tier": "site", "pue": 1.3, "wue_site_l_per_kwh": 0.4,
                                                 "ewif_l_per_kwh": 1.6, "carbon_intensity_g_per_kwh": 56.0,
                                                 "power_model": {"cpu_w_per_core": 10.0}}}}))
    # Just after jobs end, sacct's time-window queries (no -j) can miss them for a few seconds
    # (seen on 22.05 while `sacct -j` already shows them ended): wait until they are listed.
    wait_for(lambda: len(sacct.jobs(time.time() - 3600, user="greendtest", name=name)) == 3, 30,
             what="the jobs in sacct's time-window query")
    view = LedgerView(None, site)  # no ledger at all: everything comes from accounting
    view.sacct = SacctHistory(sacct, site, "site")
    h = view.similar("greendtest", name, time.time())
    assert h is not None and sorted(j.job_id for j in h.jobs) == sorted(map(str, ids))
    assert h.measured_j == pytest.approx(400.0)
    power = site.by_name["site"].power
    modelled = [j.modelled_j for j in h.jobs if j.job_id in (str(ids[0]), str(ids[1]))]
    assert h.modelled_j == pytest.approx(sum(modelled))
    assert h.power_ratio == pytest.approx(400 / sum(modelled))
    assert all(j.modelled_j == pytest.approx(j.elapsed_s * (power.cpu_w_per_core * power.cpu_usage
                                                            + 0.25 * power.memory_w_per_gb)) for j in h.jobs)
    assert 0 < h.cpu_efficiency <= 1.05 and h.median_elapsed_s >= 2
    u = view.usage(account, time.time() - 3600)
    assert u.jobs == 3
    third = next(j for j in sacct.jobs(time.time() - 3600, account=account) if j.job_id == str(ids[2]))
    f = site.by_name["site"].factors
    third_kwh = third.elapsed_s * (power.cpu_w_per_core * min(third.cpu_efficiency, 1.0)
                                   + 0.25 * power.memory_w_per_gb) / 3.6e6
    assert u.carbon_g == pytest.approx(2.0 + third_kwh * f.pue * f.carbon_intensity_g_per_kwh)
    assert u.facility_energy_j == pytest.approx(560.0 + third_kwh * f.pue * 3.6e6)
    assert view.similar("greendtest", "no-such-job-name", time.time()) is None


@pytest.mark.slurm
def test_epilog_writes_provisional_then_completes_it_when_the_last_node_reports(tb, tmp_path):
    """A two-node job whose second node's record comes late: a provisional figure first, then the
    final one when the record arrives; never the other way round."""
    import threading

    from greend.ledger import JobRow, Ledger

    job_id = tb.submit("site", BURN.format(secs=1), extra_args=["-N", "2", "-J", "two-nodes"])
    rec = tb.wait_accounted("site", job_id)
    assert rec["State"] == "COMPLETED"
    sacct = Sacct(tb.conf("site"))
    sj = sacct.job(str(job_id), "site")
    assert sj.alloc_nodes == 2
    ledger = Ledger(tmp_path / "ledger.sqlite")

    def record(node: str, state: str, cpu_j: float) -> None:
        row = JobRow(cluster="site", job_id=str(job_id), node=node, kind="slurm", state=state,
                     first_seen=sj.submit_time + 1, last_seen=sj.end_time + (1 if node == "site-n1" else 2),
                     submit_time=sj.submit_time, cpu_uj=int(cpu_j * 1e6), carbon_g=cpu_j / 1000,
                     facility_j=cpu_j * 1.5, provenance={"cpu": "measured: RAPL"})
        with ledger.transaction() as db:
            ledger.upsert_job(db, row)

    record("site-n1", "ended", 10.0)
    record("site-n2", "running", 4.0)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(res=sa.write_final(
        sacct, sa.LedgerSource([ledger.path]), str(job_id), "site", wait_s=30, final_wait_s=1,
        complete_wait_s=60, poll_s=0.3)))
    t.start()
    try:
        prov = wait_for(lambda: sa.decode(tb.sacct("site", job_id)["AdminComment"]), 30,
                        what="the provisional figure")
        assert prov.status == "provisional" and prov.it_j == pytest.approx(14.0) and prov.nodes == 2
        record("site-n2", "ended", 6.0)  # site-n2's last sample arrives
    finally:
        t.join(90)
        ledger.close()
    res = out["res"]
    assert res.note == "" and res.written.final
    final = sa.decode(tb.sacct("site", job_id)["AdminComment"])
    assert final.status == "final" and final.it_j == pytest.approx(16.0) and final.t == sj.end_time + 2
    assert final.src == {"cpu": "measured"} and final.carbon_g == pytest.approx(0.016)
    # A late provisional figure (a second epilog run, an older copy) does not undo it.
    assert sa._write(sacct, sj, prov)
    assert sa.decode(tb.sacct("site", job_id)["AdminComment"]) == final


@pytest.mark.slurm
def test_epilog_with_greend_unreachable_writes_nothing_and_says_why(tb):
    job_id = tb.submit("site", BURN.format(secs=1), extra_args=["-J", "no-greend"])
    tb.wait_accounted("site", job_id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREEND_")}
    env.update(SLURM_CONF=str(tb.conf("site")), SLURM_JOB_ID=str(job_id), SLURM_CLUSTER_NAME="site")
    p = subprocess.run([GREEND, "slurm", "epilog", "--foreground", "--json", "--api", "http://127.0.0.1:1",
                        "--final-wait", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["written"] is None and out["comment"] == ""
    assert out["note"].startswith(f"greend has no record of job {job_id} (last error: http://127.0.0.1:1:")
    assert tb.sacct("site", job_id)["AdminComment"] == ""
