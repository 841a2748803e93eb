"""The policy engine without Slurm: requests, rules, estimates, budgets, deferral, advice, state, submit.

Helpers here (site config, cluster states, ledger rows) are shared by the other test_policies_* files.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from greend.policies import registry as registry_mod
from greend.policies import rules as rules_mod
from greend.policies.carbon import CarbonWindow
from greend.policies.engine import Engine
from greend.policies.history import LedgerView
from greend.policies.request import RequestError, build_request
from greend.policies.site import compile_site
from greend.policies.state import ClusterState, JobState, NodeState, StateCache, parse_sinfo, parse_squeue
from greend.policies.submit import DecisionLog, submit

from greend import config as config_mod
from greend import quantities as q
from greend.config import ConfigError
from greend.footprint import footprint
from greend.ledger import JobRow, Ledger

NOW = 1_800_000_000.0  # a fixed "now" (2027-01-15): tests never depend on the wall clock
HOUR = 3600.0


# -- a site like the testbed's ----------------------------------------------------------------------
def partitions(cpus_per_node: int, nodes: int, gpus: dict | None = None) -> dict:
    common = {"max_cpus": cpus_per_node * nodes, "max_nodes": nodes, "cpus_per_node": cpus_per_node,
              "mem_per_node": "4000M", "def_mem_per_cpu": "256M"}
    parts = {
        "debug": {"default": True, "max_walltime": "30:00", **common},
        "batch": {"max_walltime": "2-00:00:00", **common},
    }
    if gpus:
        for p in parts.values():
            p["max_gpus"] = 0  # CPU-only partitions on a cluster with GPUs
        parts["gpu"] = {"max_walltime": "1-00:00:00", **common, **gpus}
    return parts


def site_data(**over) -> dict:
    data = {
        "cluster": "site",
        "clusters": {
            "local": {"tier": "local", "pue": 1.8, "wue_site_l_per_kwh": 0.0, "ewif_l_per_kwh": 1.5,
                      "carbon_intensity_g_per_kwh": 60.0, "partitions": partitions(2, 1),
                      "power_model": {"cpu_w_per_core": 15.0}},
            "site": {"tier": "site", "hds": True, "pue": 1.3, "wue_site_l_per_kwh": 0.4,
                     "ewif_l_per_kwh": 1.6, "carbon_intensity_g_per_kwh": 56.0,
                     "accounts": ["proj-green", "proj-hds", "proj-budget"],
                     "data_stores": ["site-lustre"], "gpu_types": ["a100"],
                     "partitions": partitions(4, 2, {"max_gpus": 4, "gpus_per_node": 2}),
                     "power_model": {"cpu_w_per_core": 10.0, "gpu_tdp_w": {"a100": 400.0}}},
            "national": {"tier": "national", "pue": 1.2, "wue_site_l_per_kwh": 0.0, "ewif_l_per_kwh": 1.6,
                         "carbon_intensity_g_per_kwh": 40.0, "partitions": partitions(8, 1),
                         "power_model": {"cpu_w_per_core": 8.0}},
        },
    }
    for k, v in over.items():
        data[k] = v
    return data


def make_site(data: dict | None = None, path: Path | None = None):
    cfg = config_mod.parse(data or site_data())
    return compile_site(cfg, path)


def make_engine(data: dict | None = None, ledger: Path | None = None, site=None) -> Engine:
    site = site or make_site(data)
    view = LedgerView(ledger, site) if ledger is not None else None
    return Engine(site, ledger=view)


def node(name: str, cpus: int, alloc: int = 0, partitions=("debug", "batch"), state="idle") -> NodeState:
    return NodeState(name, state, cpus, alloc, 4000.0, 256.0 * alloc, tuple(partitions), True)


def idle_states(now: float = NOW) -> dict[str, ClusterState]:
    return {
        "local": ClusterState("local", True, now, nodes=[node("local-n1", 2)]),
        "site": ClusterState("site", True, now, nodes=[node("site-n1", 4), node("site-n2", 4)]),
        "national": ClusterState("national", True, now, nodes=[node("national-n1", 8)]),
    }


def saturated_site(now: float = NOW, remaining_s: float = 2 * HOUR) -> ClusterState:
    """Both site nodes fully allocated by jobs with `remaining_s` left, and one job pending."""
    running = [JobState(str(i), "RUNNING", 4, "batch", 3 * HOUR, now + remaining_s, (f"site-n{i}",))
               for i in (1, 2)]
    pending = [JobState("3", "PENDING", 4, "batch", 3 * HOUR, now + 3 * HOUR, ())]
    return ClusterState("site", True, now, nodes=[node("site-n1", 4, 4, state="allocated"),
                                                  node("site-n2", 4, 4, state="allocated")],
                        running=running, pending=pending)


def script(tmp_path: Path, body: str, name: str = "job.sh") -> Path:
    p = tmp_path / name
    p.write_text("#!/bin/bash\n" + body.lstrip("\n"))
    return p


def request(body: str = "", cli=(), tmp_path: Path | None = None, user: str = "alice", now: float = NOW,
            account: str | None = "proj-green"):
    """A request from a script body and/or command-line options; with an account unless told not to
    (the site cluster accepts listed accounts only)."""
    cli = list(cli)
    if account and not body and not any(k == "account" for k, _ in cli):
        cli.append(("account", account))
    path = None
    if body:
        import tempfile

        d = Path(tmp_path or tempfile.mkdtemp())
        path = script(d, body)
    return build_request(path, list(cli), user=user, now=now)


def verdicts(decision, rule: str) -> dict[str, str]:
    return {v.cluster: v.verdict for v in decision.verdicts if v.rule == rule}


def add_jobs(ledger_path: Path, rows: list[dict]) -> None:
    led = Ledger(ledger_path)
    with led.transaction() as db:
        for i, r in enumerate(rows):
            base = dict(cluster="site", job_id=str(1000 + i), node="site-n1", kind="slurm", state="ended",
                        first_seen=NOW - 10 * HOUR, last_seen=NOW - 9 * HOUR, end_time=NOW - 9 * HOUR,
                        user="alice", name="train", account="proj-green")
            base.update(r)
            led.upsert_job(db, JobRow(**base))
    led.close()


# -- quantities ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text,seconds", [
    ("30", 1800), ("30:00", 1800), ("1:00:00", 3600), ("2-00:00:00", 172800), ("1-12", 129600),
    ("1-00:30", 88200), ("90m", 5400), ("2h", 7200), ("1.5h", 5400), ("1d", 86400), (45, 2700),
    ("UNLIMITED", None),
])
def test_durations_read_as_slurm_reads_them(text, seconds):
    assert q.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["abc", "1:2:3:4", "-5", "1-x", "", "h2"])
def test_bad_durations_say_what_is_expected(bad):
    with pytest.raises(ValueError, match="expected"):
        q.parse_duration(bad)


def test_memory_and_time_points():
    assert q.parse_memory_mb("8G") == 8192
    assert q.parse_memory_mb("512") == 512
    assert q.parse_memory_mb("1T") == 1024 * 1024
    assert q.parse_memory_mb("100K") == pytest.approx(100 / 1024)
    with pytest.raises(ValueError):
        q.parse_memory_mb("8 parsecs")
    assert q.parse_time_point("+6h", NOW) == NOW + 6 * HOUR
    assert q.parse_time_point("now+2hours", NOW) == NOW + 2 * HOUR
    t = q.parse_time_point("2030-01-02T03:04:05+00:00", NOW)
    assert t == 1893553445.0
    assert q.parse_time_point(q.slurm_time_point(NOW + 100), NOW) == NOW + 100
    with pytest.raises(ValueError, match="ISO 8601"):
        q.parse_time_point("tomorrow-ish", NOW)


# -- requests -----------------------------------------------------------------------------------
def test_script_directives_are_read_as_sbatch_reads_them(tmp_path):
    p = script(tmp_path, """
# a comment
#SBATCH --job-name=train
#SBATCH -c4
#SBATCH -n 2
#SBATCH --mem-per-cpu=1G
#SBATCH -t 2:00:00   # two hours
#SBATCH --gres=gpu:a100:2 -A proj-green
#SBATCH --array=0-9%2
#GREEND --data-class=HDS --deferrable --deadline=+12h --data site-lustre,archive

srun python train.py
#SBATCH --time=99:00:00
#GREEND --bogus
""")
    r = build_request(p, [], user="alice", now=NOW)
    assert (r.job_name, r.cpus_per_task, r.ntasks, r.cpus) == ("train", 4, 2, 8)
    assert r.mem_mb == 8 * 1024
    assert r.walltime_s == 7200  # the #SBATCH after the first command is not read, as sbatch does
    assert (r.gpus, r.gpu_type, r.account, r.array_tasks) == (2, "a100", "proj-green", 10)
    assert r.data_class == "hds" and r.deferrable and r.deadline == NOW + 12 * HOUR
    assert r.data_stores == ("site-lustre", "archive")
    assert r.origin["cpus-per-task"] == f"{p}:4"
    assert r.origin["time"] == f"{p}:7"


def test_command_line_wins_over_the_script_and_is_passed_on(tmp_path):
    p = script(tmp_path, "#SBATCH -c 4\n#SBATCH --time=10:00\n")
    r = build_request(p, [("cpus-per-task", "2"), ("data-class", "hds"), ("deferrable", None)],
                      user="alice", now=NOW)
    assert r.cpus == 2 and r.walltime_s == 600 and r.data_class == "hds" and r.deferrable
    assert r.origin["cpus-per-task"] == "command line"
    assert r.sbatch_args == ["--cpus-per-task=2"]  # greend's own options do not go to sbatch
    assert r.job_name == "job.sh"  # Slurm's default name: the script's file name


@pytest.mark.parametrize("body,message", [
    ("#SBATCH --cpus-per-task=four\n", r"job.sh:2: --cpus-per-task: expected a positive integer"),
    ("#SBATCH -t abc\n", r"job.sh:2: --time: expected a Slurm time"),
    ("#SBATCH --mem=lots\n", r"job.sh:2: --mem: expected a size"),
    ("# note\n#GREEND --frobnicate\n", r"job.sh:3: unknown #GREEND option --frobnicate"),
    ("#GREEND --deadline=yesterday\n", r"job.sh:2: --deadline: expected ISO 8601"),
    ("#GREEND --deadline=2001-01-01T00:00\n", r"job.sh:2: --deadline: .* is already past"),
    ("#SBATCH --clusters=national\n", r"job.sh:2: --clusters: greend chooses the cluster itself"),
    ("#SBATCH --gpus=a100:x\n", r"job.sh:2: --gpus: expected \[TYPE:\]COUNT"),
    ("#SBATCH --array=9-0\n", r"job.sh:2: --array: expected ranges"),
    ("#SBATCH --comment='unclosed\n", r"job.sh:2: cannot split #SBATCH line"),
    ("#GREEND --deferrable=maybe\n", r"job.sh:2: --deferrable: expected yes or no"),
])
def test_malformed_directives_name_file_line_and_option(tmp_path, body, message):
    p = script(tmp_path, body)
    with pytest.raises(RequestError, match=message):
        build_request(p, [], user="alice", now=NOW)


def test_unreadable_scripts_are_clear_errors(tmp_path):
    with pytest.raises(RequestError, match="no such batch script"):
        build_request(tmp_path / "nope.sh", [], user="a", now=NOW)
    (tmp_path / "noshebang.sh").write_text("#SBATCH -c 1\necho hi\n")
    with pytest.raises(RequestError, match=r"noshebang.sh:1: a batch script must start with #!"):
        build_request(tmp_path / "noshebang.sh", [], user="a", now=NOW)
    (tmp_path / "bin.sh").write_bytes(b"#!\x00\x01")
    with pytest.raises(RequestError, match="not a text file"):
        build_request(tmp_path / "bin.sh", [], user="a", now=NOW)
    with pytest.raises(RequestError, match="is a directory"):
        build_request(tmp_path, [], user="a", now=NOW)


# -- routing ------------------------------------------------------------------------------------
def test_small_job_goes_to_the_site_and_every_rule_explains_itself():
    eng = make_engine()
    d = eng.decide(request(cli=[("cpus-per-task", "2"), ("time", "1:00:00"), ("account", "proj-green")]),
                   now=NOW, states=idle_states())
    assert d.outcome == "route" and d.cluster == "site"
    assert d.plan.partition == "batch"  # 1 h does not fit debug's 30 min
    assert d.fallbacks == ["national", "local"]
    # every filter gave a verdict on every cluster, every score on every eligible one
    for rule in eng.filters:
        assert set(verdicts(d, rule.name)) == {"local", "site", "national"}, rule.name
    for rule in eng.scorers:
        assert set(verdicts(d, rule.name)) == {"local", "site", "national"}, rule.name
    assert all(v.reason for v in d.verdicts)
    out = d.to_dict()
    json.dumps(out)  # JSON all the way down
    assert out["plan"]["sbatch_options"] == ["--cpus-per-task=2", "--time=1:00:00", "--account=proj-green",
                                             "--partition=batch"]
    assert {c["cluster"] for c in out["candidates"]} == {"local", "site", "national"}
    assert all("carbon_g" in c["estimate"] for c in out["candidates"])
    assert "-> site/batch" in out["summary"]


def test_saturated_site_overflows_to_national():
    states = idle_states()
    states["site"] = saturated_site()
    d = make_engine().decide(request(cli=[("cpus-per-task", "2"), ("time", "1:00:00")]), now=NOW,
                             states=states)
    assert d.cluster == "national"
    (held,) = [v for v in d.verdicts if v.rule == "overflow" and v.cluster == "site"]
    assert held.verdict == "hold"
    assert held.numbers["expected_wait_s"] == pytest.approx(2 * HOUR)
    assert held.numbers["load"] == 1.0
    assert "not site: expected wait 2.0 h > 60 min" in d.summary()


def test_hds_job_with_site_saturated_stays_on_the_hds_site_and_waits():
    states = idle_states()
    states["site"] = saturated_site()
    r = request(cli=[("cpus-per-task", "2"), ("time", "1:00:00"), ("data-class", "hds"),
                     ("account", "proj-hds")])
    d = make_engine().decide(r, now=NOW, states=states)
    assert d.cluster == "site"
    assert d.relaxed == ["site"]
    assert verdicts(d, "hds") == {"local": "reject", "site": "pass", "national": "reject"}
    assert "waits here" in next(v for v in d.verdicts if v.verdict == "relaxed").reason


def test_hds_job_without_any_hds_cluster_open_is_not_routed():
    data = site_data()
    data["clusters"]["site"]["open"] = False
    d = make_engine(data).decide(request(cli=[("data-class", "hds")]), now=NOW, states=idle_states())
    assert d.outcome == "no_cluster" and d.plan is None
    assert "HDS-certified" in d.summary() and "closed" in d.summary()


def test_local_only_for_short_small_interactive_or_debug_jobs():
    data = site_data()
    data["clusters"]["site"]["open"] = False
    data["clusters"]["national"]["open"] = False
    eng = make_engine(data)
    big = eng.decide(request(cli=[("cpus-per-task", "2"), ("time", "4:00:00")]), now=NOW,
                     states=idle_states())
    assert big.outcome == "no_cluster"
    assert "local takes only short, small jobs" in big.summary()
    short = eng.decide(request(cli=[("cpus-per-task", "2"), ("time", "20")]), now=NOW, states=idle_states())
    assert short.cluster == "local"
    debug = eng.decide(request(cli=[("time", "4:00:00"), ("interactive", None)]), now=NOW,
                       states=idle_states())
    assert debug.cluster == "local"


def test_fits_partition_returns_its_choice_and_leaves_the_candidate_alone():
    from greend.policies.engine import Candidate, Context
    from greend.policies.filters import FitsPartition
    from greend.policies.rule import Check

    eng = make_engine()
    site = eng.site.by_name["site"]
    req = request(cli=[("cpus-per-task", "2"), ("time", "1:00:00")])
    ctx = Context(eng.site, req, NOW, None, "live state off", None)
    cand = Candidate(site, site.default_partition)
    rule = next(r for r in eng.filters if isinstance(r, FitsPartition))
    got = rule.filter(ctx, cand)
    assert isinstance(got, Check) and got.passes
    assert got.partition is site.partition("batch") and got.numbers["partition"] == "batch"
    assert site.default_partition is not got.partition
    assert cand.partition is site.default_partition  # the engine, not the rule, applies the choice
    too_big = rule.filter(Context(eng.site, request(cli=[("cpus-per-task", "64")]), NOW, None, "", None),
                          Candidate(site, site.default_partition))
    assert not too_big.passes and too_big.partition is None and "fits no partition" in str(too_big.reason())


def test_accounts_gpus_and_partition_limits_filter():
    eng = make_engine()
    d = eng.decide(request(cli=[("account", "proj-other")]), now=NOW, states=idle_states())
    assert verdicts(d, "account_allowed")["site"] == "reject"
    assert d.cluster == "national"

    gpu = eng.decide(request(cli=[("gpus", "a100:2"), ("time", "2:00:00"), ("account", "proj-green")]),
                     now=NOW, states=idle_states())
    assert gpu.cluster == "site" and gpu.plan.partition == "gpu"
    assert verdicts(gpu, "fits_partition") == {"local": "reject", "site": "pass", "national": "reject"}

    h100 = eng.decide(request(cli=[("gpus", "h100:1")]), now=NOW, states=idle_states())
    assert h100.outcome == "no_cluster"
    assert "GPU type h100 not here (a100)" in h100.summary()

    huge = eng.decide(request(cli=[("ntasks", "16"), ("time", "2:00:00")]), now=NOW, states=idle_states())
    assert huge.outcome == "no_cluster"
    reasons = {v.cluster: v.reason for v in huge.verdicts if v.rule == "fits_partition"}
    assert "batch: 16 CPUs > max 8" in reasons["site"]
    long = eng.decide(request(cli=[("time", "3-00:00:00")]), now=NOW, states=idle_states())
    reasons = {v.cluster: v.reason for v in long.verdicts if v.rule == "fits_partition"}
    assert "batch: walltime 3-00:00:00 > max 2-00:00:00" in reasons["national"]


def test_dead_controller_is_a_stated_fact():
    states = idle_states()
    states["site"] = ClusterState("site", False, NOW - 5, error="controller did not answer: squeue did not "
                                  "answer within 3 s")
    d = make_engine().decide(request(cli=[("time", "1:00:00")]), now=NOW, states=states)
    assert d.cluster == "national"
    reason = {v.cluster: v.reason for v in d.verdicts if v.rule == "reachable"}["site"]
    assert "did not answer within 3 s" in reason
    assert d.to_dict()["candidates"][1]["state"]["ok"] is False


def test_without_live_state_the_decision_says_so():
    d = make_engine().decide(request(cli=[("time", "1:00:00")]), now=NOW)
    assert d.cluster == "site"
    assert "live state off" in {v.reason for v in d.verdicts if v.rule == "reachable"}.pop()
    assert d.to_dict()["live_state"] == "live state off"


def test_data_locality_and_carbon_break_ties():
    data = site_data()
    data["policy"] = {"rules": [{"rule": "carbon", "weight": 1}, {"rule": "data_locality", "weight": 5}]}
    eng = make_engine(data)
    d = eng.decide(request(cli=[("data", "site-lustre"), ("time", "1:00:00")]), now=NOW)
    assert d.cluster == "site"
    d2 = eng.decide(request(cli=[("time", "1:00:00")]), now=NOW)
    assert d2.cluster == "national"  # lowest carbon: 8 W/core, PUE 1.2, 40 g/kWh


# -- estimates ----------------------------------------------------------------------------------
def test_estimate_follows_green_algorithms_and_the_footprint_model():
    site = make_site()
    eng = Engine(site)
    d = eng.decide(request(cli=[("cpus-per-task", "2"), ("mem", "2G"), ("time", "2:00:00")]), now=NOW)
    cand = next(c for c in d.candidates if c.name == "site")
    e = d.context.estimate(cand)
    it_j = 2 * HOUR * (2 * 10.0 * 1.0 + 2 * 0.3725)
    assert e.it_energy_j == pytest.approx(it_j)
    assert e.footprint == footprint(it_j, site.by_name["site"].factors)
    assert e.footprint.facility_energy_j == pytest.approx(it_j * 1.3)
    assert e.carbon_g == pytest.approx(it_j / 3.6e6 * 1.3 * 56.0)
    assert e.footprint.water_l == pytest.approx(it_j / 3.6e6 * (0.4 + 1.3 * 1.6))
    gpu = eng.decide(request(cli=[("gpus", "a100:1"), ("time", "1:00:00")]), now=NOW)
    e = gpu.context.estimate(next(c for c in gpu.candidates if c.name == "site"))
    assert e.power.gpu_w == 400.0


def test_history_corrects_power_and_runtime(tmp_path):
    led = tmp_path / "ledger.sqlite"
    # Two ended 'train' jobs: 2 CPUs and 1 GB for 1 h each, that measured half the modelled energy.
    model_w = 2 * 10.0 + 1 * 0.3725
    add_jobs(led, [dict(job_id=str(i), alloc_cpus=2, alloc_mem_bytes=2**30, first_seen=NOW - 5 * HOUR,
                        last_seen=NOW - 4 * HOUR, end_time=NOW - 4 * HOUR,
                        cpu_uj=int(model_w * HOUR * 0.5 * 1e6), cpu_time_ns=int(0.4 * 2 * HOUR * 1e9),
                        max_mem_bytes=200 * 2**20) for i in range(2)])
    eng = make_engine(ledger=led)
    d = eng.decide(request(cli=[("job-name", "train"), ("cpus-per-task", "2"), ("mem", "1G"),
                                ("time", "4:00:00"), ("account", "proj-green")]), now=NOW)
    e = d.plan.estimate
    assert e.correction == pytest.approx(0.5)
    assert e.runtime_s == pytest.approx(HOUR)  # median run time of the similar jobs, not 4 h
    assert e.it_energy_j == pytest.approx(model_w * HOUR * 0.5)
    assert "2 similar job(s) of alice named 'train'" in e.correction_from
    # right-sizing advice with the figures
    advice = [v for v in d.verdicts if v.rule == "right_sizing" and v.verdict == "advice"]
    assert len(advice) == 2
    assert "used 40% of their CPUs" in advice[0].reason and "about 1 would do" in advice[0].reason
    assert "peaked at 200 MB" in advice[1].reason
    assert d.plan.advice and d.plan.advice[0] == advice[0].reason
    # another user's or another name's jobs are not similar
    other = eng.decide(request(cli=[("job-name", "train")], user="bob"), now=NOW)
    assert other.plan.estimate.correction == 1.0


# -- budgets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["warn", "nice", "defer", "refuse"])
def test_budget_actions(tmp_path, action):
    led = tmp_path / "ledger.sqlite"
    add_jobs(led, [dict(account="proj-budget", facility_j=2 * 3.6e6, carbon_g=100.0,
                        first_seen=NOW - 2 * HOUR, last_seen=NOW - HOUR)])
    data = site_data(policy={"budgets": [{"account": "proj-budget", "energy_kwh": 1.5, "action": action,
                                          "nice": 777}]})
    eng = make_engine(data, ledger=led)
    d = eng.decide(request(cli=[("account", "proj-budget"), ("time", "1:00:00")]), now=NOW)
    (v,) = [v for v in d.verdicts if v.rule == "budget"]
    assert v.verdict == action
    assert v.numbers["energy_used"] == pytest.approx(2.0) and v.numbers["energy_limit"] == 1.5
    assert "energy 2 kWh used" in v.reason
    opts = d.plan.sbatch_options(d.request)
    if action == "warn":
        assert d.plan.warnings and d.outcome == "route" and not any("nice" in o for o in opts)
    elif action == "nice":
        assert "--nice=777" in opts
    elif action == "defer":
        _, end = rules_mod.period_start("month", NOW)
        assert d.plan.begin == end
        assert f"--begin={q.slurm_time_point(end)}" in opts
    else:
        assert d.outcome == "refused" and "not submitted" in v.reason
    # another project is not affected
    other = eng.decide(request(cli=[("account", "proj-green"), ("time", "1:00:00")]), now=NOW)
    assert [v.verdict for v in other.verdicts if v.rule == "budget"] == ["skip"]


def test_budget_within_limits_and_include_estimate(tmp_path):
    led = tmp_path / "ledger.sqlite"
    add_jobs(led, [dict(account="proj-budget", facility_j=0.9 * 3.6e6, first_seen=NOW - 2 * HOUR,
                        last_seen=NOW - HOUR)])
    budget = {"account": "proj-budget", "energy_kwh": 1.0, "action": "refuse"}
    r = request(cli=[("account", "proj-budget"), ("ntasks", "8"), ("time", "2-00:00:00"),
                     ("partition", "batch")])
    d = make_engine(site_data(policy={"budgets": [budget]}), ledger=led).decide(r, now=NOW)
    assert d.outcome == "refused"  # 0.9 kWh used + this job's estimate > 1 kWh
    budget["include_estimate"] = False
    d = make_engine(site_data(policy={"budgets": [budget]}), ledger=led).decide(r, now=NOW)
    assert d.outcome == "route"


def test_period_starts():
    s, e = rules_mod.period_start("month", NOW)
    assert time.localtime(s)[1:6] == (time.localtime(NOW).tm_mon, 1, 0, 0, 0)
    assert s <= NOW < e
    for p in ("day", "week", "quarter", "year"):
        s, e = rules_mod.period_start(p, NOW)
        assert s <= NOW < e


# -- carbon-aware deferral ----------------------------------------------------------------------
def series_site(tmp_path: Path, values: list[float], start: float = NOW) -> dict:
    rows = ["timestamp,g_per_kwh"] + [
        f"{time.strftime('%Y-%m-%dT%H:%M:%S+00:00', time.gmtime(start + i * HOUR))},{v}"
        for i, v in enumerate(values)]
    (tmp_path / "ci.csv").write_text("\n".join(rows) + "\n")
    data = site_data()
    data["clusters"]["site"]["carbon_intensity_series"] = str(tmp_path / "ci.csv")
    return data


def test_deferrable_job_begins_in_the_lowest_carbon_window_before_its_deadline(tmp_path):
    data = series_site(tmp_path, [80, 80, 80, 20, 20, 80, 80, 80, 5, 5, 5, 5])
    eng = make_engine(data)
    r = request(cli=[("time", "2:00:00"), ("account", "proj-green"), ("deferrable", None),
                     ("deadline", "+7h")])
    d = eng.decide(r, now=NOW)
    assert d.cluster == "site"
    assert d.plan.begin == NOW + 3 * HOUR  # 20 g/kWh for 2 h; the 5 g/kWh window ends after the deadline
    assert d.plan.begin + 2 * HOUR <= r.deadline
    (v,) = [v for v in d.verdicts if v.rule == "carbon_deferral"]
    assert v.verdict == "defer" and v.numbers["mean_best_g_per_kwh"] == 20.0
    assert v.numbers["mean_now_g_per_kwh"] == 80.0
    assert f"--begin={q.slurm_time_point(NOW + 3 * HOUR)}" in d.plan.sbatch_options(r)
    assert d.plan.estimate.factors.carbon_intensity_g_per_kwh == pytest.approx(20.0)
    # a later deadline reaches the 5 g/kWh window
    r2 = request(cli=[("time", "2:00:00"), ("deferrable", None), ("deadline", "+12h")])
    assert make_engine(data).decide(r2, now=NOW).plan.begin == NOW + 8 * HOUR
    # not deferrable: starts now
    r3 = request(cli=[("time", "2:00:00"), ("deadline", "+12h")])
    assert make_engine(data).decide(r3, now=NOW).plan.begin is None
    # deadline too close for the walltime: never deferred past it
    r4 = request(cli=[("time", "2:00:00"), ("deferrable", None), ("deadline", "+1h")])
    d4 = make_engine(data).decide(r4, now=NOW)
    assert d4.plan.begin is None
    assert [v.verdict for v in d4.verdicts if v.rule == "carbon_deferral"] == ["warn"]


def test_carbon_window_against_brute_force():
    w = CarbonWindow(50.0, [0, 100, 200, 300], [10, 90, 30, 70], max_gap_s=100)
    assert w.at(-1) == 50 and w.at(0) == 10 and w.at(150) == 90 and w.at(400) == 50
    assert w.mean(0, 200) == pytest.approx(50.0)
    assert w.mean(-100, 0) == pytest.approx(50.0)
    assert w.mean(350, 450) == pytest.approx((70 * 50 + 50 * 50) / 100)
    best = w.lowest(0, 300, 100)
    assert best.start == 0 and best.mean_g_per_kwh == pytest.approx(10)
    brute = min((w.mean(s, s + 150), s) for s in range(0, 301))
    got = w.lowest(0, 300, 150)
    assert got.mean_g_per_kwh == pytest.approx(brute[0])


# -- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,message", [
    ({"rules": [{"rule": "nonsense"}]}, r"key 'policy.rules.0': unknown rule 'nonsense': built-in rules are"),
    ({"rules": [{"rule": "carbon"}, {"rule": "overflow", "max_wai": "1h"}]},
     r"key 'policy.rules.1': rule 'overflow': unknown parameter 'max_wai' \(parameters of overflow: tier, "
     r"max_wait"),
    ({"rules": [{"rule": "overflow", "max_wait": "soon"}]}, r"parameter 'max_wait': expected a Slurm time"),
    ({"rules": [{"rule": "hds", "enabled": False}]}, r"rule 'hds': this rule cannot be disabled"),
    ({"rules": [{"rule": "reachable", "weight": 3}]}, r"'weight' applies to score rules only"),
    ({"rules": [{"rule": "carbon"}], "budgets": [{"account": "a", "energy_kwh": 1}]},
     r"no enabled 'budget' rule"),
    ({"budgets": [{"account": "a"}]}, r"needs at least one of energy_kwh"),
    ({"budgets": [{"account": "a", "energy_kwh": 1, "action": "panic"}]}, r"policy.budgets.0.action"),
    ({"rules": [{"rule": "tier_preference", "tiers": {"moon": 1}}]}, r"unknown tier 'moon'"),
    ({"default_walltime": "forever"}, r"policy.default_walltime"),
    ({"colour": "green"}, r"key 'policy.colour': unknown key"),
])
def test_bad_policy_config_names_the_key(tmp_path, policy, message):
    p = tmp_path / "greend.toml"
    data = site_data(policy=policy)
    import tomllib  # noqa: F401  (the file is written as JSON-compatible TOML below)

    p.write_text(_toml(data))
    with pytest.raises(ConfigError, match=message) as e:
        config_mod.load(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("cluster_keys,message", [
    ({"partitions": {"batch": {"max_walltime": "lots"}}}, r"clusters.site.partitions.batch.max_walltime"),
    ({"partitions": {"batch": {"max_cpu": 4}}}, r"key 'clusters.site.partitions.batch.max_cpu': unknown key"),
    ({"slurm": {"timeout": 3}}, r"key 'clusters.site.slurm.timeout': unknown key"),
    ({"power_model": {"cpu_w_per_core": -1}}, r"clusters.site.power_model.cpu_w_per_core"),
    ({"accounts": "proj"}, r"clusters.site.accounts"),
])
def test_bad_cluster_keys_name_the_key(tmp_path, cluster_keys, message):
    data = site_data()
    data["clusters"]["site"].update(cluster_keys)
    p = tmp_path / "greend.toml"
    p.write_text(_toml(data))
    with pytest.raises(ConfigError, match=message):
        config_mod.load(p)


def _toml(data: dict, prefix: str = "") -> str:
    """A small TOML writer for test configurations (tables, arrays of tables, scalars, lists)."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for x in v:
                tables.append((f"[{k}]", x))
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    out = "\n".join(lines) + "\n"
    for k, v in tables:
        if k.startswith("["):
            name = f"{prefix}.{k[1:-1]}" if prefix else k[1:-1]
            out += f"\n[[{name}]]\n" + _toml(v, name)
        else:
            name = f"{prefix}.{k}" if prefix else k
            out += f"\n[{name}]\n" + _toml(v, name)
    return out


def test_example_configuration_loads_and_compiles():
    path = Path(__file__).resolve().parent.parent / "examples" / "testbed.toml"
    cfg = config_mod.load(path)
    site = compile_site(cfg, path)
    assert [c.name for c in site.clusters] == ["local", "site", "national"]
    assert site.by_name["site"].hds and not site.by_name["national"].hds
    assert site.by_name["site"].slurm.conf == Path("/tmp/greend-testbed/site/etc/slurm.conf")


def test_the_site_example_routes_its_example_jobs():
    ex = Path(__file__).resolve().parent.parent / "examples"
    cfg = config_mod.load(ex / "site.toml")
    site = compile_site(cfg, ex / "site.toml")
    assert site.by_name["campus"].carbon.has_series  # relative to the config file
    eng = Engine(site)
    now = time.time()
    got = {}
    for job in ("small", "train", "cohort-hds"):
        d = eng.decide(build_request(ex / "jobs" / f"{job}.sh", [], user="alice", now=now), now=now)
        got[job] = (d.cluster, d.plan.partition)
    assert got == {"small": ("campus", "short"), "train": ("campus", "gpu"), "cohort-hds": ("campus", "long")}


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    data = site_data()
    data["clusters"]["site"]["slurm"] = {"conf": "etc/site.conf", "bin_dir": "bin"}
    data["policy"] = {"ledger": "state/ledger.sqlite"}
    p = tmp_path / "greend.toml"
    p.write_text(_toml(data))
    site = compile_site(config_mod.load(p), p)
    assert site.by_name["site"].slurm.conf == tmp_path / "etc/site.conf"
    assert site.by_name["site"].slurm.command("sbatch") == str(tmp_path / "bin" / "sbatch")
    assert site.settings.ledger == tmp_path / "state/ledger.sqlite"


# -- plugins ------------------------------------------------------------------------------------
PLUGIN = '''
from greend.policies.rules import FilterRule, Params


class NoFridayParams(Params):
    tier: str = "national"


class NoFriday(FilterRule):
    """A site's own rule: no national submissions on Fridays."""

    name = "no_friday"
    Params = NoFridayParams

    def filter(self, ctx, cand):
        if cand.cluster.tier == self.params.tier:
            return False, "no national jobs today (site rule)", {"weekday": 4}
        return True, "fine", {}
'''


def test_a_site_rule_from_the_entry_point_group(tmp_path, monkeypatch):
    (tmp_path / "site_rules.py").write_text(PLUGIN)
    dist = tmp_path / "site_rules-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: site-rules\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[greend.rules]\nno_friday = site_rules:NoFriday\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry_mod, "_plugins", None)
    data = site_data(policy={"rules": [{"rule": "no_friday", "tier": "national"},
                                       {"rule": "tier_preference", "tiers": {"national": 1.0, "site": 0.1}}]})
    eng = make_engine(data)
    d = eng.decide(request(cli=[("time", "1:00:00")]), now=NOW)
    assert verdicts(d, "no_friday") == {"local": "pass", "site": "pass", "national": "reject"}
    assert d.cluster == "site"
    # the mandatory rules were put first although the list left them out
    assert [r.name for r in eng.rules][:2] == ["cluster_open", "hds"]
    with pytest.raises(ConfigError, match="unknown parameter 'tyer'"):
        config_mod.parse(site_data(policy={"rules": [{"rule": "no_friday", "tyer": "x"}]}))
    monkeypatch.setattr(registry_mod, "_plugins", None)


# -- live state ---------------------------------------------------------------------------------
SINFO_22_05 = {"nodes": [
    {"name": "site-n1", "state": "allocated", "state_flags": [], "cpus": 4, "alloc_cpus": 4, "idle_cpus": 0,
     "real_memory": 4000, "alloc_memory": 1024, "partitions": ["debug", "batch"]},
    {"name": "site-n2", "state": "idle", "state_flags": ["DRAIN"], "cpus": 4, "alloc_cpus": 0,
     "real_memory": 4000, "alloc_memory": 0, "partitions": ["debug", "batch"]},
]}
SQUEUE_22_05 = {"jobs": [
    {"job_id": 6, "job_state": "RUNNING", "cpus": 4, "partition": "debug", "time_limit": 30,
     "start_time": NOW - 60, "end_time": NOW + 1740, "name": "burn", "comment": "greend-abc",
     "user_name": "greendtest", "job_resources": {"allocated_nodes": [{"nodename": "site-n1"}]}},
    {"job_id": 8, "job_state": "PENDING", "cpus": 4, "partition": "debug", "time_limit": 30,
     "start_time": 0, "end_time": 0, "job_resources": {}},
    {"job_id": 1, "job_state": "COMPLETED", "cpus": 1, "partition": "debug", "time_limit": 30},
]}
SQUEUE_23_11 = {"jobs": [
    {"job_id": 6, "job_state": ["RUNNING"], "cpus": {"set": True, "number": 4}, "partition": "debug",
     "time_limit": {"set": True, "infinite": False, "number": 30},
     "start_time": {"set": True, "number": NOW - 60}, "end_time": {"set": True, "number": NOW + 1740}},
]}


def test_slurm_json_of_22_05_and_23_x_is_read():
    nodes = parse_sinfo(SINFO_22_05)
    assert [(n.name, n.usable, n.idle_cpus) for n in nodes] == [("site-n1", True, 0), ("site-n2", False, 0)]
    running, pending, every = parse_squeue(SQUEUE_22_05, NOW)
    assert [j.job_id for j in running] == ["6"] and [j.job_id for j in pending] == ["8"]
    assert len(every) == 3 and running[0].nodes == ("site-n1",) and running[0].comment == "greend-abc"
    r23, _, _ = parse_squeue(SQUEUE_23_11, NOW)
    assert (r23[0].cpus, r23[0].time_limit_s, r23[0].end_time) == (4, 1800.0, NOW + 1740)
    st = ClusterState("site", True, NOW, nodes=nodes, running=running, pending=pending)
    assert st.load() == (1.0, 4, 4)  # the drained node does not count
    w = st.expected_wait(2, 1, 2, 512, "debug", NOW)
    # The running job ends in 1740 s, then the pending 4-CPU job goes first for its 30 min.
    assert w.seconds == pytest.approx(1740 + 1800)
    assert w.numbers["pending_jobs"] == 1


def test_state_cache_refreshes_stale_states_shares_them_through_a_file_and_in_the_background(tmp_path):
    site = make_site()
    calls = []
    clock = [NOW]

    def fetcher(c):
        calls.append(c.name)
        return ClusterState(c.name, True, clock[0], nodes=[node(f"{c.name}-n1", 4)])

    cache = StateCache(site.clusters, 30, tmp_path / "state.json", fetcher=fetcher, clock=lambda: clock[0])
    assert set(cache.snapshot()) == {"local", "site", "national"}
    assert sorted(calls) == ["local", "national", "site"]
    cache.snapshot()
    assert len(calls) == 3  # fresh: not fetched again
    clock[0] += 31
    cache.snapshot()
    assert len(calls) == 6
    cache.save()
    again = StateCache(site.clusters, 30, tmp_path / "state.json", fetcher=fetcher, clock=lambda: clock[0])
    again.load()
    assert again.snapshot()["site"].nodes[0].name == "site-n1"
    assert len(calls) == 6  # read from the file
    bg = StateCache(site.clusters, 30, fetcher=fetcher)
    bg.start(0.05)
    deadline = time.monotonic() + 5
    while len(calls) < 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    bg.stop()
    assert len(calls) >= 12


def test_fetch_reports_a_missing_slurm_conf_without_waiting(tmp_path):
    from greend.policies.state import fetch

    data = site_data()
    data["clusters"]["site"]["slurm"] = {"conf": str(tmp_path / "missing.conf")}
    c = make_site(data).by_name["site"]
    t0 = time.monotonic()
    st = fetch(c)
    assert not st.ok and "missing.conf does not exist" in st.error
    assert time.monotonic() - t0 < 1


def test_fetch_reads_an_answer_of_only_errors_as_a_controller_that_did_not_answer(tmp_path):
    # 22.05's squeue/sinfo --json exit 0 when the controller cannot be reached: not an empty cluster
    from greend.policies.state import fetch

    d = tmp_path / "bin"
    d.mkdir()
    sinfo = {"errors": [{"error": "Unspecified error", "errno": -1}], "nodes": []}
    for cmd, answer in (("squeue", SQUEUE_2205_NO_CONTROLLER), ("sinfo", sinfo)):
        (d / cmd).write_text(f"#!/bin/sh\necho '{json.dumps(answer)}'\n")
        (d / cmd).chmod(0o755)
    data = site_data()
    data["clusters"]["site"]["slurm"] = {"bin_dir": str(d)}
    st = fetch(make_site(data).by_name["site"])
    assert not st.ok and st.error == ("controller did not answer: squeue: Failed while looking for jobs "
                                      "(slurm_load_jobs: Unspecified error)")


# -- submission with stand-in Slurm commands -------------------------------------------------------
FAKE_SBATCH = """#!/bin/sh
# Stand-in sbatch: behaviour chosen by files next to it.
dir=$(dirname "$0")
echo "$SLURM_CONF $*" >> "$dir/calls"
fail() { echo "sbatch: error: Batch job submission failed: $1" >&2; exit 1; }
case "$(cat "$dir/mode")" in
  ok) echo "4242" ;;
  down) fail "Unable to contact slurm controller (connect failure)" ;;
  hang) sleep 30 ;;
  socket) fail "Socket timed out on send/recv operation" ;;
  invalid) fail "Invalid account or account/partition combination specified" ;;
esac
"""
# What 22.05's `squeue --json` prints, with exit status 0, when it cannot reach the controller.
SQUEUE_2205_NO_CONTROLLER = {"meta": {"Slurm": {"release": "22.05.8"}}, "errors": [
    {"description": "Failed while looking for jobs", "error_number": -1, "error": "Unspecified error",
     "source": "slurm_load_jobs"}], "jobs": []}
FAKE_SQUEUE = """#!/bin/sh
dir=$(dirname "$0")
token=$(grep -o 'greend-[0-9a-f]*' "$dir/calls" | tail -1)
case "$(cat "$dir/queue")" in
  has) printf '{"jobs": [{"job_id": 777, "name": "job.sh", "comment": "%s"}]}' "$token" ;;
  empty) echo '{"jobs": []}' ;;
  dead) echo "squeue: error: Unable to contact slurm controller" >&2; exit 1 ;;
  dead-json) echo 'NO_CONTROLLER' ;;
esac
""".replace("NO_CONTROLLER", json.dumps(SQUEUE_2205_NO_CONTROLLER))


def fake_slurm(tmp_path: Path, name: str, mode: str, queue: str = "empty") -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    for cmd, body in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE)):
        (d / cmd).write_text(body)
        (d / cmd).chmod(stat.S_IRWXU)
    (d / "mode").write_text(mode)
    (d / "queue").write_text(queue)
    return d


def submit_setup(tmp_path, modes: dict[str, tuple[str, str]], timeout: float = 1.0):
    data = site_data()
    for name, (mode, queue) in modes.items():
        d = fake_slurm(tmp_path, name, mode, queue)
        data["clusters"][name]["slurm"] = {"bin_dir": str(d), "submit_timeout_s": timeout,
                                           "timeout_s": 1.0}
    eng = make_engine(data)
    led = Ledger(tmp_path / "ledger.sqlite")
    job = script(tmp_path, "#SBATCH -t 1:00:00\n#SBATCH -A proj-green\nsleep 1\n")
    d = eng.decide(build_request(job, [], user="alice", now=time.time()))
    return eng, d, led, job


def test_submit_runs_sbatch_on_the_chosen_cluster_and_records_the_decision(tmp_path):
    eng, d, led, job = submit_setup(tmp_path, {"site": ("ok", "empty")})
    log = DecisionLog(led)
    sub = submit(eng, d, job, log, user="alice")
    assert (sub.outcome, sub.cluster, sub.job_id, sub.exit_status) == ("submitted", "site", "4242", 0)
    call = (tmp_path / "site" / "calls").read_text()
    assert "--parsable" in call and f"--comment={sub.token}" in call and "--partition=batch" in call
    assert call.rstrip().endswith(str(job))
    row = log.get(sub.token)
    assert (row["outcome"], row["cluster"], row["job_id"], row["partition"]) == ("submitted", "site", "4242",
                                                                                "batch")
    assert json.loads(row["decision"])["cluster"] == "site"
    assert row["energy_j"] > 0 and row["user"] == "alice"


def test_submit_falls_back_when_the_controller_does_not_take_the_job(tmp_path):
    eng, d, led, job = submit_setup(tmp_path, {"site": ("down", "dead"), "national": ("ok", "empty")})
    sub = submit(eng, d, job, DecisionLog(led), user="alice")
    assert (sub.outcome, sub.cluster) == ("submitted", "national")
    assert "controller did not take the job" in sub.tried[0]["result"]
    assert "--partition=batch" in (tmp_path / "national" / "calls").read_text()


def test_sbatch_timeout_with_the_job_queued_is_not_submitted_twice(tmp_path):
    eng, d, led, job = submit_setup(tmp_path, {"site": ("hang", "has"), "national": ("ok", "empty")})
    sub = submit(eng, d, job, DecisionLog(led), user="alice")
    assert (sub.outcome, sub.cluster, sub.job_id) == ("submitted", "site", "777")
    assert not (tmp_path / "national" / "calls").exists()


def test_sbatch_timeout_without_the_job_tries_the_next_cluster(tmp_path):
    eng, d, led, job = submit_setup(tmp_path, {"site": ("socket", "empty"), "national": ("ok", "empty")})
    sub = submit(eng, d, job, DecisionLog(led), user="alice")
    assert (sub.outcome, sub.cluster) == ("submitted", "national")
    assert "squeue shows no such job" in sub.tried[0]["result"]


@pytest.mark.parametrize("squeue", ["dead", "dead-json"])
def test_sbatch_timeout_with_squeue_dead_stops_with_exit_75(tmp_path, squeue):
    # dead-json: squeue exits 0 with only an error, which is no proof that the job is not queued
    eng, d, led, job = submit_setup(tmp_path, {"site": ("hang", squeue), "national": ("ok", "empty")})
    log = DecisionLog(led)
    sub = submit(eng, d, job, log, user="alice")
    assert (sub.outcome, sub.exit_status) == ("unknown", 75)
    assert sub.token in sub.message and "before submitting again" in sub.message
    assert not (tmp_path / "national" / "calls").exists()
    assert log.get(sub.token)["outcome"] == "unknown"


def test_sbatch_refusing_the_job_is_reported_not_retried_elsewhere(tmp_path):
    eng, d, led, job = submit_setup(tmp_path, {"site": ("invalid", "empty"), "national": ("ok", "empty")})
    sub = submit(eng, d, job, DecisionLog(led), user="alice")
    assert sub.outcome == "failed" and "Invalid account" in sub.message
    assert not (tmp_path / "national" / "calls").exists()


def test_refused_decision_is_recorded_and_not_submitted(tmp_path):
    eng, d, led, job = submit_setup(tmp_path, {"site": ("ok", "empty")})
    d.plan.refused = "budget proj-green/month exceeded"
    log = DecisionLog(led)
    sub = submit(eng, d, job, log, user="alice")
    assert sub.outcome == "refused" and sub.exit_status == 1
    assert not (tmp_path / "site" / "calls").exists()
    assert log.get(sub.token)["outcome"] == "refused"


# -- the commands -------------------------------------------------------------------------------
GREEND = Path(sys.executable).with_name("greend")


def run_greend(*argv, env=None, cwd=None):
    import subprocess

    e = {**os.environ, "XDG_CACHE_HOME": str(cwd or "/tmp"), **(env or {})}
    e.pop("GREEND_CONFIG", None)
    return subprocess.run([str(GREEND), *map(str, argv)], capture_output=True, text=True, env=e, cwd=cwd,
                          timeout=60)


@pytest.fixture
def cli_config(tmp_path) -> Path:
    data = site_data(policy={"live_state": False})
    p = tmp_path / "greend.toml"
    p.write_text(_toml(data))
    return p


def test_history_from_sacct_reads_this_clusters_accounting(tmp_path):
    import argparse

    from greend.policies import cli as pcli
    from greend.policies.history_sacct import SacctHistory

    data = site_data(policy={"live_state": False, "history_from": "sacct"})
    data["clusters"]["site"]["slurm"] = {"conf": str(tmp_path / "site-slurm.conf")}
    p = tmp_path / "greend.toml"
    p.write_text(_toml(data))
    args = argparse.Namespace(config=str(p), state_dir=str(tmp_path), no_live=True, refresh=False)
    engine, _site, cfg, _ = pcli._setup(args, live=False)
    history = engine.ledger.sacct
    assert isinstance(history, SacctHistory) and cfg.cluster == "site"
    assert history.sacct.commands.env["SLURM_CONF"] == str(tmp_path / "site-slurm.conf")
    data["policy"]["history_from"] = "ledger"
    p.write_text(_toml(data))
    assert pcli._setup(args, live=False)[0].ledger.sacct is None  # the default: greend's ledger only


def test_greend_route_prints_every_rule_and_the_footprint(tmp_path, cli_config):
    job = script(tmp_path, "#SBATCH -c 2\n#SBATCH -t 1:00:00\n#SBATCH -A proj-green\n")
    p = run_greend("-c", cli_config, "--state-dir", tmp_path, "route", job, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "-> site/batch (tier site)" in out
    for rule in ("cluster_open", "hds", "account_allowed", "fits_partition", "tier_conditions", "overflow",
                 "tier_preference", "carbon", "water", "expected_wait", "budget", "carbon_deferral"):
        assert rule in out, rule
    assert "estimated footprint" in out and "national" in out
    j = run_greend("-c", cli_config, "--state-dir", tmp_path, "route", "--json", job, cwd=tmp_path)
    d = json.loads(j.stdout)
    assert d["cluster"] == "site" and d["plan"]["sbatch_options"] == ["--partition=batch"]
    assert {v["rule"] for v in d["rules"]} >= {"hds", "fits_partition", "tier_preference"}


def test_greend_estimate_json(tmp_path, cli_config):
    p = run_greend("-c", cli_config, "--state-dir", tmp_path, "estimate", "--json", "-c", "4", "-t", "2h",
                   cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert set(d["estimates"]) == {"local", "site", "national"}
    site = d["estimates"]["site"]
    assert site["it_energy_j"] == pytest.approx(2 * HOUR * (4 * 10 + 1 * 0.3725), rel=1e-3)
    assert d["power_models"]["site"]["cpu_w_per_core"] == 10.0
    assert d["eligible"]["local"] is False
    t = run_greend("-c", cli_config, "--state-dir", tmp_path, "estimate", "-c", "4", "-t", "2h", cwd=tmp_path)
    assert "W = CPU" in t.stdout and "not eligible" in t.stdout


@pytest.mark.parametrize("args,message", [
    (["route", "{script}"], r"greend: route: .*job.sh:2: --cpus-per-task: expected a positive integer"),
    (["route", "--cluster", "moon", "{script}"], r"greend: unknown cluster 'moon'"),
    (["route", "/nonexistent/job.sh"], r"greend: route: /nonexistent/job.sh: no such batch script"),
    (["estimate", "-t", "forever"], r"greend: estimate: command line: --time: expected"),
    (["route", "--at", "whenever", "-t", "1h"], r"greend: route: --at: expected ISO 8601"),
])
def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, cli_config, args, message):
    job = script(tmp_path, "#SBATCH -c zero\n")
    p = run_greend("-c", cli_config, "--state-dir", tmp_path, *[a.format(script=job) for a in args],
                   cwd=tmp_path)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    import re

    assert re.search(message, p.stderr), p.stderr


def test_bad_config_is_a_clear_error_naming_the_file_and_key(tmp_path):
    p = tmp_path / "bad.toml"
    data = site_data(policy={"rules": [{"rule": "overflow", "max_wait": "soon"}]})
    p.write_text(_toml(data))
    r = run_greend("-c", p, "route", "-t", "1h", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(p) in r.stderr and "policy.rules" in r.stderr and "max_wait" in r.stderr


def test_no_cluster_exits_1_with_the_reasons(tmp_path, cli_config):
    r = run_greend("-c", cli_config, "--state-dir", tmp_path, "route", "-G", "h100:1", "-A", "proj-green",
                   cwd=tmp_path)
    assert r.returncode == 1
    assert "no cluster can take this job" in r.stdout and "GPU type h100 not here" in r.stdout


def test_greend_submit_with_stand_in_sbatch(tmp_path):
    data = site_data(policy={"live_state": False})
    d = fake_slurm(tmp_path, "site", "ok")
    data["clusters"]["site"]["slurm"] = {"bin_dir": str(d)}
    cfg = tmp_path / "greend.toml"
    cfg.write_text(_toml(data))
    job = script(tmp_path, "#SBATCH -t 1:00:00\n#SBATCH -A proj-green\n")
    r = run_greend("-c", cfg, "--state-dir", tmp_path / "state", "submit", job, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "greend: submitted job 4242 to site (partition batch)" in r.stdout
    assert "why: -> site/batch" in r.stdout
    led = Ledger(tmp_path / "state" / "ledger.sqlite", readonly=True)
    rows = led.db.execute("SELECT outcome, cluster, job_id FROM decisions").fetchall()
    assert [tuple(x) for x in rows] == [("submitted", "site", "4242")]
    dry = run_greend("-c", cfg, "--state-dir", tmp_path / "state", "submit", "--dry-run", job, cwd=tmp_path)
    assert "would run: " in dry.stdout and "--partition=batch" in dry.stdout
    assert (tmp_path / "site" / "calls").read_text().count("\n") == 1  # the dry run ran nothing


def test_router_decides_from_states_refreshed_in_the_background(tmp_path):
    from greend.policies import router as router_mod

    site = make_site()
    calls = []

    def fetcher(c):
        calls.append(c.name)
        return ClusterState(c.name, c.name != "site", time.time(), error="controller did not answer",
                            nodes=[node(f"{c.name}-n1", 8)])

    r = router_mod.Router(site, None, refresh_s=0.05)
    r.states.fetcher = fetcher
    r.start()
    try:
        d = r.route_script(None, [("time", "1:00:00"), ("account", "proj-green")], user="alice")
        assert d.cluster == "national" and "controller did not answer" in d.summary()
        deadline = time.monotonic() + 5
        while len(calls) < 9 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 9  # refreshed in the background, not by decisions
    finally:
        r.stop()
    cfg = config_mod.parse(site_data(policy={"live_state": False}))
    offline = router_mod.Router.from_config(cfg, ledger_path=tmp_path / "none.sqlite")
    d = offline.route_script(None, [("time", "1:00:00"), ("account", "proj-green")], user="alice")
    assert d.cluster == "site" and d.state_note == "live state off"


@pytest.mark.parametrize("command", ["estimate", "route", "submit"])
def test_help_of_each_command(command):
    p = run_greend(command, "--help")
    assert p.returncode == 0, p.stderr
    assert "#GREEND" in p.stdout and "--data-class" in p.stdout
