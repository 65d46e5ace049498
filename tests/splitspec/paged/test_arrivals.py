"""Arrivals: when a batch is held for expected callers, and for how long."""

from __future__ import annotations

import pytest

from splitspec.paged.arrivals import MIN_GAPS, Arrivals

STEP = 0.030


def measured(gap: float, quick: bool = False) -> Arrivals:
    """Arrivals that have seen MIN_GAPS gaps of `gap` seconds."""
    arrivals = Arrivals()
    for _ in range(MIN_GAPS):
        arrivals.expect("warm-up", quick, 0.0)
        arrivals.arrived("warm-up", gap, quick)
    return arrivals


def test_gap_is_a_high_quantile_of_the_recent_gaps_of_its_kind():
    arrivals = measured(0.010)
    assert arrivals.gap(quick=True) is None  # nothing in-process measured yet
    assert 0.010 < arrivals.gap(quick=False) < 0.015
    for _ in range(40):  # the window forgets old gaps
        arrivals.expect("s", False, 0.0)
        arrivals.arrived("s", 0.002)
    assert arrivals.gap(quick=False) < 0.004


def test_one_present_waits_for_three_expected():
    arrivals = measured(0.010)
    for key in ("b", "c", "d"):
        arrivals.expect(key, False, 100.0)
    until = arrivals.hold_until({"a"}, 1, now=100.001, step_cost=STEP, limit=STEP)
    assert until == pytest.approx(100.0 + arrivals.gap(False))


def test_three_present_do_not_wait_long_for_one():
    """Three chained rounds are in; the fourth crosses the network and takes most of a step: it
    joins the next step instead of idling the three."""
    arrivals = measured(0.020)
    arrivals.expect("d", False, 100.0)
    assert arrivals.hold_until({"a", "b", "c"}, 3, now=100.0, step_cost=STEP, limit=STEP) is None
    quick = measured(0.0002, quick=True)  # but an in-process round is worth its fraction of a millisecond
    quick.expect("d", True, 100.0)
    assert quick.hold_until({"a", "b", "c"}, 3, now=100.0, step_cost=STEP, limit=STEP) is not None


def test_nothing_expected_or_all_present_no_hold():
    arrivals = measured(0.010)
    assert arrivals.hold_until({"a"}, 1, now=5.0, step_cost=STEP, limit=STEP) is None
    arrivals.expect("a", False, 5.0)
    assert arrivals.hold_until({"a"}, 1, now=5.0, step_cost=STEP, limit=STEP) is None
    arrivals.forget("a")
    assert not arrivals.expected


def test_never_past_the_limit_and_not_again_after_giving_up():
    arrivals = measured(0.010)
    arrivals.expect("b", False, 100.0)
    assert arrivals.hold_until({"a"}, 1, now=100.0, step_cost=STEP, limit=0.005) is None  # due after the limit
    arrivals.give_up({"a"})
    assert arrivals.late == 1
    assert arrivals.hold_until({"a"}, 1, now=100.0, step_cost=STEP, limit=STEP) is None
    arrivals.arrived("b", 100.05)  # it came after all: timed, and expected again after its next outcome
    assert max(arrivals.gaps[False]) == pytest.approx(0.05)
