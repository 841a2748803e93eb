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


def _reading(t: float, it_j: float, cpu_s: float) -> Books:
    """A reading at a tick: 80 % CPU, 20 % DRAM, carbon 0.02 g/J, like a job's books."""
    return Books(t, cpu_j=0.8 * it_j, dram_j=0.2 * it_j, facility_j=1.4 * it_j,
                 carbon_g=0.02 * it_j, cpu_s=cpu_s)


def test_boundaries_settle_by_interpolation_between_the_readings_around_them():
    # Ticks every 5 s; the job draws 2 W over [0, 5] and 20 W over [5, 10]: an estimate from the
    # last interval's power at a boundary 2 s into the second interval says 100 + 2*2 = 104 J,
    # the readings around it say 100 + 2/5 * 100 = 140 J.
    r0, r1, r2 = _reading(NOW, 90.0, 10.0), _reading(NOW + 5, 100.0, 11.0), \
        _reading(NOW + 10, 200.0, 16.0)
    jp = JobPhases()
    jp.reading(r0)
    jp.boundary("load", Books(NOW, cpu_j=1.0), estimated=True)  # exactly on a tick
    jp.reading(r1)
    jp.boundary("train", Books(NOW + 7, cpu_j=104 * 0.8, dram_j=104 * 0.2, cpu_s=11.0),
                estimated=True)
    jp.settle()
    load, train = jp.phases
    assert load.start_exact and load.start == r0
    assert not load.end_exact and not train.start_exact  # no reading after NOW + 7 yet
    jp.reading(r2)
    jp.settle()
    assert load.end_exact and train.start_exact and load.end is train.start
    b = train.start
    assert b.t == NOW + 7
    assert b.it_j == pytest.approx(140.0) and b.cpu_j == pytest.approx(112.0)
    assert b.carbon_g == pytest.approx(2.8) and b.facility_j == pytest.approx(196.0)
    assert b.cpu_s == pytest.approx(13.0)
    # Exactly on a tick: the reading itself. The phases then sum to the books over their span.
    jp.boundary(None, Books(NOW + 10, cpu_j=999.0), estimated=True)
    jp.settle()
    assert train.end_exact and train.end == r2
    ds = [p.end.minus(p.start) for p in jp.phases]
    assert [d.it_j for d in ds] == pytest.approx([50.0, 60.0])
    assert sum(d.it_j for d in ds) == pytest.approx(r2.it_j - r0.it_j, rel=1e-12)
    assert sum(d.carbon_g for d in ds) == pytest.approx(r2.carbon_g - r0.carbon_g, rel=1e-12)
    assert sum(d.cpu_s for d in ds) == pytest.approx(6.0)
    assert jp.readings == [r2]  # nothing left to settle: only the last reading is kept


def test_an_ended_jobs_late_boundary_settles_at_its_final_books_and_is_written_once(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    try:
        with led.transaction() as db:
            pk = led.upsert_job(db, row())
        r0, last = _reading(NOW, 10.0, 1.0), _reading(NOW + 5, 60.0, 6.0)
        jp = JobPhases()
        jp.reading(r0)
        jp.boundary("only", Books(NOW + 2, cpu_j=30.0), estimated=True)  # too high
        jp.reading(last)
        jp.boundary(None, Books(NOW + 6, cpu_j=70.0), estimated=True)  # after the last reading
        jp.settle()
        assert not jp.phases[0].end_exact  # the job may still draw power after NOW + 5
        with led.transaction() as db:
            phases.put(db, pk, jp, last)
        assert not jp.phases[0].written
        jp.settle(final=True)  # the job ended: its books stay at its last reading
        with led.transaction() as db:
            phases.put(db, pk, jp, last)
        only, = phases.of_job(led.db, pk)
        assert (only["start"], only["end"]) == (NOW + 2, NOW + 6)
        assert only["energy_j"]["it"] == pytest.approx(60.0 - 30.0)  # 10 + 2/5 * 50 = 30 J at start
        assert jp.phases[0].written
    finally:
        led.close()


def test_exact_boundaries_of_a_self_sampled_run_are_kept_as_read():
    # greend/track_self.py reads the counters at each boundary: settle leaves those books alone
    # (even with a reading of the daemon's kind around them) and contiguous phases sum exactly.
    b = [_reading(NOW + i, 10.0 * i * i, float(i)) for i in range(4)]
    jp = JobPhases()
    jp.boundary("a", b[0])
    jp.boundary("b", b[1])
    jp.boundary(None, b[3])
    jp.reading(_reading(NOW + 2, 1.0, 0.0))
    jp.settle(final=True)
    assert [(p.start, p.end) for p in jp.phases] == [(b[0], b[1]), (b[1], b[3])]
    assert sum(p.end.minus(p.start).it_j for p in jp.phases) == b[3].it_j - b[0].it_j


def test_a_gap_between_phases_settles_each_boundary_at_its_own_time():
    # `with run.phase("a")` ends a, then run.phase("b") begins at another instant: two boundaries.
    r = [_reading(NOW + 5 * i, 10.0 * i, float(i)) for i in range(3)]  # 2 W throughout
    jp = JobPhases()
    jp.reading(r[0])
    jp.boundary("a", Books(NOW + 1), estimated=True)
    jp.boundary(None, Books(NOW + 4), estimated=True)
    jp.boundary("b", Books(NOW + 6), estimated=True)
    jp.boundary(None, Books(NOW + 9), estimated=True)
    jp.reading(r[1])
    jp.settle()
    a, b = jp.phases
    assert (a.start_exact, a.end_exact, b.start_exact, b.end_exact) == (True, True, False, False)
    jp.reading(r[2])
    jp.settle()
    assert [(p.start.t, p.start.it_j, p.end.t, p.end.it_j) for p in jp.phases] == pytest.approx(
        [(NOW + 1, 2.0, NOW + 4, 8.0), (NOW + 6, 12.0, NOW + 9, 18.0)])
