"""Exact splitting of node energy: the books balance to the microjoule, shares follow the model."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from greend.attribution import (
    CpuInterval,
    DomainEnergy,
    counter_delta,
    split_domain,
    split_exact,
    tdp_power_w,
)

# Realistic magnitudes: an interval's energy stays far below 2**53 µJ (9 GJ), CPU time is in ns.
totals = st.integers(min_value=0, max_value=10**15)
weight = st.one_of(
    st.just(0),
    st.integers(min_value=0, max_value=10**13),
    st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
)
weights = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3), weight, max_size=12)
denominators = st.one_of(
    st.just(0.0),
    st.floats(min_value=0, max_value=1e14, allow_nan=False, allow_infinity=False),
)


def exact_quotas(total: int, w: dict, denominator: float) -> dict[str, Fraction]:
    pos = {k: Fraction(v) for k, v in w.items() if v > 0}
    wsum = sum(pos.values(), Fraction(0))
    if total <= 0 or wsum == 0:
        return dict.fromkeys(w, Fraction(0))
    denom = max(Fraction(denominator), wsum)
    return {k: total * pos[k] / denom if k in pos else Fraction(0) for k in w}


@settings(max_examples=400)
@given(totals, weights, denominators)
def test_split_exact_shares_are_non_negative_and_never_exceed_total(total, w, denominator):
    shares = split_exact(total, w, denominator)
    assert set(shares) == set(w)
    assert all(isinstance(s, int) and s >= 0 for s in shares.values())
    assert sum(shares.values()) <= total


@settings(max_examples=400)
@given(totals, weights, denominators)
def test_split_exact_each_share_within_one_microjoule_of_its_quota(total, w, denominator):
    shares = split_exact(total, w, denominator)
    quotas = exact_quotas(total, w, denominator)
    for key, share in shares.items():
        assert abs(share - quotas[key]) <= 1, (key, share, float(quotas[key]))


@settings(max_examples=300)
@given(totals, weights, denominators)
def test_split_exact_zero_weight_gets_nothing(total, w, denominator):
    shares = split_exact(total, {**w, "zero": 0, "neg": -5.0}, denominator)
    assert shares["zero"] == 0
    assert shares["neg"] == 0


@settings(max_examples=300)
@given(totals, weights)
def test_split_exact_hands_out_everything_when_weights_cover_the_denominator(total, w):
    assume(any(v > 0 for v in w.values()))
    wsum = sum(v for v in w.values() if v > 0)
    for denominator in (0.0, wsum / 2, float(wsum)):
        assert sum(split_exact(total, w, denominator).values()) == total


def test_split_exact_leaves_the_uncovered_part_to_the_caller():
    # Two jobs used 2 of 8 cores' worth: they get a quarter, the rest is the caller's remainder.
    shares = split_exact(1000, {"a": 1.0, "b": 1.0}, 8.0)
    assert shares == {"a": 125, "b": 125}


def test_split_exact_largest_remainder_gets_the_odd_microjoule():
    shares = split_exact(10, {"a": 1, "b": 1, "c": 1}, 3)
    assert sorted(shares.values()) == [3, 3, 4]
    assert split_exact(100, {"big": 2, "small": 1}, 3) == {"big": 67, "small": 33}


ratios = st.floats(min_value=-0.5, max_value=1.5, allow_nan=False)


@settings(max_examples=400)
@given(totals, ratios, weights, denominators, weights, denominators)
def test_split_domain_books_balance_exactly(energy, ratio, aw, aden, iw, iden):
    d = DomainEnergy("package-0", "cpu", energy, "test", ratio, aw, aden, iw, iden)
    s = split_domain(d)
    assert all(v >= 0 for v in s.jobs.values())
    assert s.unattributed_uj >= 0
    assert sum(s.jobs.values()) + s.unattributed_uj == energy
    assert 0 <= s.idle_uj <= energy
    for key in set(aw) | set(iw):
        if aw.get(key, 0) <= 0 and iw.get(key, 0) <= 0:
            assert s.jobs.get(key, 0) == 0


@settings(max_examples=300)
@given(totals, st.floats(min_value=0, max_value=1, allow_nan=False), weights, denominators)
def test_split_domain_job_shares_follow_the_active_quota(energy, ratio, aw, aden):
    d = DomainEnergy("package-0", "cpu", energy, "test", ratio, aw, aden, {}, 1.0)
    s = split_domain(d)
    active = energy - s.idle_uj
    assert abs(active - energy * Fraction(ratio)) <= 1
    quotas = exact_quotas(active, aw, aden)
    for key, share in s.jobs.items():
        assert abs(share - quotas[key]) <= 1


# -- counters -------------------------------------------------------------------------------------
RANGE = 262_143_328_850


def test_counter_delta_plain_increase():
    assert counter_delta(1_000, 5_000, RANGE) == 4_000
    assert counter_delta(7, 7, RANGE) == 0


def test_counter_delta_wrap_uses_the_reference_formula():
    prev, cur = RANGE - 1_000, 4_000
    assert counter_delta(prev, cur, RANGE) == (RANGE - prev) + cur == 5_000


def test_counter_delta_reset_without_range_counts_what_the_counter_shows():
    # A GPU driver reload: the counter restarted from zero, 300 is all that is known since.
    assert counter_delta(10_000_000, 300, None) == 300
    assert counter_delta(10_000_000, 300, 0) == 300


@given(st.integers(1, RANGE - 1), st.integers(0, RANGE - 1))
def test_counter_delta_recovers_any_energy_below_the_range(prev, energy):
    cur = prev + energy
    if cur >= RANGE:
        cur -= RANGE
    assert counter_delta(prev, cur, RANGE) == energy


# -- CPU intervals and the idle rule --------------------------------------------------------------
def interval(rule: str, *, active=400, total=800, ncpu=8, cpu=None, alloc=None) -> CpuInterval:
    return CpuInterval(
        active_ticks=active, total_ticks=total, ncpu=ncpu, tick_ns=10_000_000,
        job_cpu_ns=cpu if cpu is not None else {"a": 3_000_000_000, "b": 1_000_000_000},
        job_alloc_cpus=alloc if alloc is not None else {"a": 2.0, "b": 2.0},
        idle_rule=rule,
    )


def test_idle_rule_allocated_shares_idle_power_by_allocated_cores():
    # Half the node's time was active (4 s of CPU out of 8 s): 500 µJ active, 500 µJ idle.
    s = split_domain(interval("allocated").domain("package-0", "cpu", 1000, "t"))
    assert s.idle_uj == 500
    # active 500 by CPU time 3:1; idle 500 by cores: 2 of 8 each -> 125 each, 250 unallocated
    assert s.jobs == {"a": 375 + 125, "b": 125 + 125}
    assert s.unattributed_uj == 250
    assert sum(s.jobs.values()) + s.unattributed_uj == 1000


def test_idle_rule_unattributed_leaves_idle_power_in_the_remainder():
    s = split_domain(interval("unattributed").domain("package-0", "cpu", 1000, "t"))
    assert s.jobs == {"a": 375, "b": 125}
    assert s.unattributed_uj == 500 == s.idle_uj


def test_idle_rule_allocated_over_allocated_node_splits_all_idle():
    # Allocations above the core count (oversubscription): all idle power goes to the jobs.
    s = split_domain(interval("allocated", ncpu=2).domain("package-0", "cpu", 1000, "t"))
    assert s.unattributed_uj == 0
    assert s.jobs == {"a": 375 + 250, "b": 125 + 250}


def test_activity_outside_jobs_stays_unattributed():
    # The node was busy 8 s but jobs account for 4 s: half the active energy is nobody's.
    it = interval("unattributed", active=800, total=800)
    s = split_domain(it.domain("package-0", "cpu", 1000, "t"))
    assert s.jobs == {"a": 375, "b": 125}
    assert s.unattributed_uj == 500
    assert s.idle_uj == 0


def test_jobs_seen_running_when_procstat_saw_nothing_get_the_energy():
    it = interval("unattributed", active=0, total=0)
    s = split_domain(it.domain("package-0", "cpu", 1000, "t"))
    assert s.jobs == {"a": 750, "b": 250}


# -- TDP model ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("load", "expected"), [
    (0.0, 15.0), (1.0, 150.0), (0.5, 150 * (0.1 + 0.9 * 0.125)), (-1.0, 15.0), (2.0, 150.0),
])
def test_tdp_power_follows_codecarbon_model(load, expected):
    assert tdp_power_w(150.0, load) == pytest.approx(expected)


@given(st.floats(0, 1), st.floats(0, 1))
def test_tdp_power_is_monotonic_in_load(a, b):
    lo, hi = sorted((a, b))
    assert tdp_power_w(200.0, lo) <= tdp_power_w(200.0, hi)
