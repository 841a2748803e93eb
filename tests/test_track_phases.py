"""greend/phases.py on its own: the books at a boundary, contiguous phases summing to the books over
their span, the cap on phases, the ledger's job_phases round trip, and validation that never
fails otherwise than with a message naming the field."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greend import phases
from greend.ledger import JobRow, Ledger
from greend.phases import Books, JobPhases, PhaseInvalid, books_at, validate

NOW = 1_800_000_000.0


def row(**kw) -> JobRow:
    base = dict(cluster="c1", job_id="42", node="n1", kind="slurm", state="running",
                first_seen=NOW - 100, last_seen=NOW, user="alice", uid=1000, cpu_uj=80_000_000,
                dram_uj=20_000_000, facility_j=140.0, carbon_g=2.0, water_site_l=0.05,
                water_offsite_l=0.07, cpu_time_ns=50 * 10**9)
    base.update(kw)
    return JobRow(**base)


class Acc:
    def __init__(self, r: JobRow, last_interval_uj: int):
        self.row, self.last_interval_uj = r, last_interval_uj


def test_books_at_adds_the_last_intervals_power_up_to_the_boundary():
    acc = Acc(row(), last_interval_uj=10_000_000)  # 10 J in the last 5 s interval: 2 W
    at_tick = books_at(acc, NOW, NOW, 5.0)
    assert at_tick.it_j == pytest.approx(100.0) and at_tick.carbon_g == pytest.approx(2.0)
    later = books_at(acc, NOW + 2.5, NOW, 5.0)  # half an interval on: +5 J, in the books' mix
    assert later.it_j == pytest.approx(105.0)
    assert later.cpu_j / later.dram_j == pytest.approx(4.0)
    assert later.carbon_g == pytest.approx(2.0 * 1.05) and later.facility_j == pytest.approx(147.0)
    assert later.cpu_s == at_tick.cpu_s == 50.0  # CPU time is the last reading's
    far = books_at(acc, NOW + 60, NOW, 5.0)  # a stalled sampler extrapolates two intervals at most
    assert far.it_j == pytest.approx(120.0)
    assert books_at(Acc(row(cpu_uj=0, dram_uj=0), 10_000_000), NOW + 1, NOW, 5.0).it_j == 0


def test_books_never_go_back():
    ahead = Books(NOW, cpu_j=10.0, carbon_g=0.2, cpu_s=3.0)  # a boundary extrapolated ahead
    measured = Books(NOW + 1, cpu_j=9.5, dram_j=1.0, carbon_g=0.19, cpu_s=3.5)
    b = measured.at_least(ahead)
    assert (b.t, b.cpu_j, b.dram_j, b.carbon_g, b.cpu_s) == (NOW + 1, 10.0, 1.0, 0.2, 3.5)
    assert measured.at_least(None) is measured
    jp = JobPhases()
    assert jp.last is None
    jp.boundary("a", ahead)
    assert jp.last is ahead
    jp.boundary(None, b)
    assert jp.last is b


def test_contiguous_phases_sum_to_the_books_over_their_span():
    jp = JobPhases()
    b = [Books(NOW + i, cpu_j=10.0 * i * i, carbon_g=0.1 * i, cpu_s=float(i)) for i in range(5)]
    jp.boundary("load", b[0])
    jp.boundary("epoch 1", b[1])
    jp.boundary("epoch 2", b[3])
    assert jp.open.name == "epoch 2"
    jp.boundary(None, b[4])  # end the open one
    assert jp.open is None
    ds = [p.end.minus(p.start) for p in jp.phases]
    assert [p.name for p in jp.phases] == ["load", "epoch 1", "epoch 2"]
    assert sum(d.cpu_j for d in ds) == pytest.approx(b[4].cpu_j - b[0].cpu_j)
    assert sum(d.carbon_g for d in ds) == pytest.approx(b[4].carbon_g - b[0].carbon_g)
    assert sum(d.t for d in ds) == pytest.approx(4.0)
    assert [d.cpu_s for d in ds] == [1.0, 2.0, 1.0]


def test_a_job_has_at_most_max_phases(monkeypatch):
    monkeypatch.setattr(phases, "MAX_PHASES", 3)
    jp = JobPhases()
    for i in range(3):
        jp.boundary(f"p{i}", Books(NOW + i))
    with pytest.raises(phases.TooMany):
        jp.boundary("one too many", Books(NOW + 3))
    jp.boundary(None, Books(NOW + 4))  # ending the open phase is always possible
    assert len(jp.phases) == 3 and jp.open is None


def test_phases_round_trip_through_the_ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    try:
        r = row()
        with led.transaction() as db:
            pk = led.upsert_job(db, r)
        jp = JobPhases()
        jp.boundary("train", Books(NOW, cpu_j=1.0, carbon_g=0.01, cpu_s=1.0))
        jp.boundary("eval", Books(NOW + 10, cpu_j=11.0, dram_j=2.0, facility_j=18.2,
                                  carbon_g=0.21, water_site_l=0.001, water_offsite_l=0.002,
                                  cpu_s=9.0))
        with led.transaction() as db:  # eval is open: its figures so far
            phases.put(db, pk, jp, Books(NOW + 12, cpu_j=15.0, dram_j=2.0, carbon_g=0.25, cpu_s=11))
        stored = phases.of_job(led.db, pk)
        assert [(p["seq"], p["name"], p["end"]) for p in stored] == [(1, "train", NOW + 10),
                                                                   (2, "eval", None)]
        train = stored[0]
        assert train["energy_j"] == {"cpu": 10.0, "dram": 2.0, "gpu": 0.0, "memory": 0.0,
                                     "it": 12.0, "facility": 18.2}
        assert train["carbon_g"] == pytest.approx(0.2) and train["cpu_time_s"] == pytest.approx(8.0)
        assert train["water_l"]["total"] == pytest.approx(0.003)
        assert stored[1]["energy_j"]["cpu"] == pytest.approx(4.0)
        jp.boundary(None, Books(NOW + 20, cpu_j=21.0, dram_j=2.0, carbon_g=0.31, cpu_s=15))
        with led.transaction() as db:  # closed now: written again, final
            phases.put(db, pk, jp, Books(NOW + 20))
        final = phases.of_job(led.db, pk)
        assert final[1]["end"] == NOW + 20 and final[1]["energy_j"]["cpu"] == pytest.approx(10.0)
        assert final[0] == train  # a closed phase is written once
    finally:
        led.close()


def test_validate_names_the_field():
    ok = validate({"job_id": "42", "name": "epoch 1", "t": NOW}, NOW, "c1")
    assert ok == ("c1", "42", "epoch 1", True, NOW)
    assert validate({"job_id": 42}, NOW, "c1") == ("c1", "42", None, False, NOW)
    assert validate({"job_id": "42", "end": True, "cluster": "c2"}, NOW, "c1")[:4] == \
        ("c2", "42", None, True)
    for body, field in [([], "JSON object"), ({"name": "x"}, "job_id"), ({"job_id": True}, "job_id"),
                        ({"job_id": "4 2"}, "job_id"), ({"job_id": "1", "name": " "}, "name"),
                        ({"job_id": "1", "name": "\ud800"}, "name"),
                        ({"job_id": "1", "t": math.inf}, "t"), ({"job_id": "1", "t": NOW - 60}, "t"),
                        ({"job_id": "1", "end": 1}, "end"), ({"job_id": "1", "cluster": ""}, "cluster"),
                        ({"job_id": "1", "x": 1}, "unknown field")]:
        with pytest.raises(PhaseInvalid, match=field):
            validate(body, NOW, "c1")


def _nested(children):
    return st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
                     _nested, max_leaves=8)


@settings(max_examples=500, deadline=None)
@given(body=st.one_of(_json, st.fixed_dictionaries(
    {"job_id": _json}, optional={"name": _json, "t": _json, "end": _json, "cluster": _json})))
def test_validate_takes_anything_json_and_only_ever_says_which_field(body):
    try:
        cluster, job_id, name, end, t = validate(body, NOW, "c1")
    except PhaseInvalid as e:
        assert str(e)
        return
    assert isinstance(cluster, str) and 0 < len(cluster) <= 128
    assert job_id.isascii() and 0 < len(job_id) <= 64
    assert name is None or (name.strip() != "" and len(name) <= phases.MAX_NAME)
    assert end == (name is not None or body.get("end") is True)
    assert abs(t - NOW) <= phases.SLACK_S
