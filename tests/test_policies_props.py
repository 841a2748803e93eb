"""Properties of the policy engine over any configuration, cluster state and request (hypothesis):
health data never leaves HDS-certified clusters, closed clusters get nothing, a deferred job still
ends by its deadline, and every decision explains itself."""

from __future__ import annotations

import json

from greend.policies.carbon import CarbonWindow
from greend.policies.engine import Engine
from greend.policies.request import JobRequest
from greend.policies.site import compile_site
from greend.policies.state import ClusterState, JobState
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_policies import NOW, node

from greend import config as config_mod

NAMES = ["lab", "campus-a", "campus-b", "jean-zay", "adastra"]
TIERS = ["local", "site", "national"]
ACCOUNTS = ["proj-a", "proj-b", "proj-hds"]


@st.composite
def partitions(draw):
    out = {}
    for i in range(draw(st.integers(0, 3))):
        p = {"default": i == 0 and draw(st.booleans())}
        if draw(st.booleans()):
            p["max_walltime"] = draw(st.sampled_from(["30:00", "2:00:00", "1-00:00:00", "2-00:00:00", 90]))
        if draw(st.booleans()):
            p["max_cpus"] = draw(st.integers(1, 64))
        if draw(st.booleans()):
            p["cpus_per_node"] = draw(st.integers(1, 64))
        if draw(st.booleans()):
            p["mem_per_node"] = draw(st.sampled_from(["4000M", "64G", 256000]))
        if draw(st.booleans()):
            p["max_gpus"] = draw(st.integers(0, 8))
        if draw(st.booleans()):
            p["gpu_types"] = draw(st.lists(st.sampled_from(["a100", "h100", "v100"]), unique=True))
        out[f"p{i}"] = p
    return out


@st.composite
def cluster(draw, tier):
    c = {"tier": tier, "hds": draw(st.booleans()), "open": draw(st.booleans() | st.just(True)),
         "pue": draw(st.floats(1.0, 2.5)), "carbon_intensity_g_per_kwh": draw(st.floats(0, 900)),
         "wue_site_l_per_kwh": draw(st.floats(0, 3)), "ewif_l_per_kwh": draw(st.floats(0, 5)),
         "partitions": draw(partitions())}
    if draw(st.booleans()):
        c["accounts"] = draw(st.lists(st.sampled_from(ACCOUNTS), min_size=1, unique=True))
    if draw(st.booleans()):
        c["gpu_types"] = draw(st.lists(st.sampled_from(["a100", "h100"]), unique=True))
    if draw(st.booleans()):
        c["power_model"] = {"cpu_w_per_core": draw(st.floats(1, 30))}
    return c


RULE_CHOICES = [
    {"rule": "cluster_open"}, {"rule": "hds"}, {"rule": "hds", "classes": ["hds", "genomic"]},
    {"rule": "account_allowed"}, {"rule": "fits_partition"}, {"rule": "reachable"},
    {"rule": "tier_conditions", "tier": "local"},
    {"rule": "tier_conditions", "tier": "national", "max_cpus": 2},
    {"rule": "overflow", "tier": "site"},
    {"rule": "overflow", "tier": "site", "max_load": 0.5, "relax": False},
    {"rule": "overflow", "tier": "national", "max_wait": "10m"},
    {"rule": "tier_preference", "weight": 4}, {"rule": "tier_preference", "tiers": {"local": 1.0}},
    {"rule": "carbon", "weight": 3}, {"rule": "water"}, {"rule": "energy"}, {"rule": "expected_wait"},
    {"rule": "data_locality"}, {"rule": "budget"}, {"rule": "carbon_deferral", "min_saving_pct": 0},
    {"rule": "right_sizing"},
]


@st.composite
def config(draw):
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True))
    clusters = {n: draw(cluster(draw(st.sampled_from(TIERS)))) for n in names}
    data = {"cluster": names[0], "clusters": clusters}
    if draw(st.booleans()):
        data["policy"] = {"rules": draw(st.lists(st.sampled_from(RULE_CHOICES), max_size=10))}
    return data


def state_for(draw, name: str):
    kind = draw(st.sampled_from(["none", "idle", "busy", "dead"]))
    if kind == "none":
        return None
    if kind == "dead":
        return ClusterState(name, False, NOW, error="controller did not answer")
    cpus = draw(st.integers(1, 16))
    alloc = cpus if kind == "busy" else draw(st.integers(0, cpus))
    running = [JobState("1", "RUNNING", alloc, "p0", 3600.0, NOW + draw(st.floats(0, 86400)), (f"{name}-n1",))
               ] if alloc else []
    pending = [JobState("2", "PENDING", draw(st.integers(1, 8)), "p0", 3600.0, NOW + 3600, ())
               for _ in range(draw(st.integers(0, 3)))]
    return ClusterState(name, True, NOW, nodes=[node(f"{name}-n1", cpus, alloc, ("p0", "p1", "p2"))],
                        running=running, pending=pending)


@st.composite
def request(draw):
    r = JobRequest(
        job_name="job", user="alice",
        account=draw(st.none() | st.sampled_from(ACCOUNTS)),
        walltime_s=draw(st.none() | st.integers(60, 4 * 86400)),
        nodes=draw(st.integers(1, 3)), ntasks=draw(st.integers(1, 8)), cpus_per_task=draw(st.integers(1, 8)),
        mem_mb=draw(st.none() | st.floats(1, 512000)),
        gpus=draw(st.integers(0, 4)), gpu_type=draw(st.none() | st.sampled_from(["a100", "h100"])),
        data_class=draw(st.sampled_from(["", "hds", "public", "genomic"])),
        deferrable=draw(st.booleans()),
        deadline=draw(st.none() | st.floats(NOW + 60, NOW + 5 * 86400)),
        flags=frozenset(draw(st.lists(st.sampled_from(["interactive", "debug"]), unique=True))),
    )
    return r


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_config_any_request(data):
    cfg = config_mod.parse(data.draw(config()))
    site = compile_site(cfg)
    eng = Engine(site)
    states = {c.name: s for c in site.clusters if (s := state_for(data.draw, c.name)) is not None}
    r = data.draw(request())
    d = eng.decide(r, now=NOW, states=states)

    # Health data never goes, nor falls back, to a cluster that is not HDS-certified.
    if r.data_class == "hds":
        assert all(site.by_name[c.name].hds for c in d.ranking)
        assert d.cluster is None or site.by_name[d.cluster].hds
    # Closed clusters get nothing.
    assert all(site.by_name[c.name].open for c in d.ranking)

    # The decision explains itself: a summary, a reason for every verdict, a verdict of every filter on
    # every cluster up to its rejection, a score of every score rule on every eligible cluster.
    assert d.summary()
    assert all(v.reason for v in d.verdicts)
    for cand in d.candidates:
        seen = [v.rule for v in d.verdicts if v.cluster == cand.name and v.kind == "filter"]
        if cand.rejected is None:
            assert [f.name for f in eng.filters] == [x for x in seen if x != "only"][: len(eng.filters)]
        else:
            assert cand.rejected.reason and cand.rejected in d.verdicts
    for cand in d.ranking:
        assert set(cand.scores) == {s.name for s in eng.scorers}
    assert (d.plan is None) == (not d.ranking)
    if d.plan is not None:
        assert d.plan.cluster == d.ranking[0].name
        assert {v.rule for v in d.plan.verdicts} == {a.name for a in eng.adjusters}
        # A deferred job still ends by its deadline.
        if d.plan.begin is not None and r.deadline is not None and any(
                v.rule == "carbon_deferral" and v.verdict == "defer" for v in d.plan.verdicts):
            assert d.plan.begin + d.plan.walltime_s <= r.deadline + 1e-6
    json.dumps(d.to_dict())


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.integers(0, 500), min_size=1, max_size=24),
       static=st.integers(0, 500), earliest=st.integers(-3, 30), span=st.integers(0, 30),
       duration=st.integers(1, 10))
def test_lowest_window_is_the_true_minimum(values, static, earliest, span, duration):
    step = 100.0
    w = CarbonWindow(float(static), [i * step for i in range(len(values))], [float(v) for v in values],
                     max_gap_s=step)
    e, latest, dur = earliest * step / 2, (earliest + span) * step / 2, duration * step / 3
    got = w.lowest(e, latest, dur)
    assert e <= got.start <= latest
    # brute force on a fine grid (the true minimum is at a grid point: all breakpoints are multiples of
    # step/6 here)
    grid = [e + i * step / 6 for i in range(int((latest - e) / (step / 6)) + 1)]
    brute = min(w.mean(s, s + dur) for s in [*grid, latest])
    assert got.mean_g_per_kwh <= brute + 1e-6
    assert abs(w.mean(got.start, got.start + dur) - got.mean_g_per_kwh) < 1e-6
