from __future__ import annotations

import pytest

from coordinator.adaptive import AcceptanceEstimate, CostModel, choose_k, expected_tokens


def costs(draft_per_token: float, verify: dict[int, float]) -> CostModel:
    model = CostModel()
    model.draft_per_token = draft_per_token
    model.verify_points = dict(verify)
    return model


def estimate(rate: float, rounds: int = 200, k: int = 8) -> AcceptanceEstimate:
    est = AcceptanceEstimate(prior=rate)
    for _ in range(rounds):
        est.observe(k, round(rate * k))
    return est


def test_expected_tokens_follows_the_geometric_formula():
    est = AcceptanceEstimate(prior=0.5, weight=1e9)  # the prior alone: a = 0.5 at every position
    assert expected_tokens(est, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_cheap_draft_and_high_acceptance_choose_a_long_proposal():
    flat_verify = {k: 0.020 + 0.001 * k for k in range(0, 9)}
    assert choose_k(AcceptanceEstimate(prior=0.9, weight=1e9), costs(0.001, flat_verify), 8) >= 6


def test_expensive_draft_or_poor_acceptance_turn_speculation_off():
    verify = {k: 0.020 + 0.004 * k for k in range(0, 9)}
    assert choose_k(AcceptanceEstimate(prior=0.2, weight=1e9), costs(0.010, verify), 8) == 0
    assert choose_k(AcceptanceEstimate(prior=0.6, weight=1e9), costs(0.050, verify), 8) == 0


def test_verify_cost_steepness_limits_k():
    """The same acceptance: a verify cost that grows fast with k (a CPU) wants a shorter proposal."""
    acceptance = AcceptanceEstimate(prior=0.7, weight=1e9)
    flat = choose_k(acceptance, costs(0.002, {k: 0.040 + 0.0005 * k for k in range(9)}), 8)
    steep = choose_k(acceptance, costs(0.002, {k: 0.020 + 0.006 * k for k in range(9)}), 8)
    assert steep < flat


def test_unmeasured_k_values_are_explored_first_then_fitted():
    model = CostModel()
    assert choose_k(AcceptanceEstimate(), model, 3) == 1
    model.observe(1, 0.002, 0.030)
    assert choose_k(AcceptanceEstimate(), model, 3) == 2
    model.observe(2, 0.004, 0.034)
    model.observe(3, 0.006, 0.038)
    assert model.verify(0) == pytest.approx(0.026)  # extrapolated: no target-only round seen yet
    assert choose_k(AcceptanceEstimate(prior=0.9, weight=1e9), model, 3) == 3
