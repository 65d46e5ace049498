from __future__ import annotations

import pytest

from coordinator.adaptive import (
    EXPLORE, REFRESH_ROUNDS, AcceptanceEstimate, CostModel, batch_bucket, choose_k, expected_tokens,
)


def costs(rounds: dict[int, float], sequences: int = 1) -> CostModel:
    """Round seconds by k, measured at a batch of `sequences`."""
    model = CostModel()
    for k, seconds in rounds.items():
        model.observe(sequences, k, seconds)
    return model


def rounds(target_alone: float, base: float, per_token: float) -> dict[int, float]:
    """Round seconds for k = 0 and, on a line, for every other EXPLORE length."""
    return {k: target_alone if k == 0 else base + per_token * k for k in EXPLORE}


def sure(rate: float) -> AcceptanceEstimate:
    return AcceptanceEstimate(prior=rate, weight=1e9)  # the prior alone, at every position


def test_expected_tokens_follows_the_geometric_formula():
    assert expected_tokens(sure(0.5), 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 32)] == [1, 1, 2, 4, 4, 8, 8, 16, 32]


def test_cheap_rounds_and_high_acceptance_choose_a_long_proposal():
    flat = rounds(0.030, 0.032, 0.001)  # verifying k + 1 tokens costs little more than one
    assert choose_k(sure(0.9), costs(flat), 1, 8) >= 6


def test_poor_acceptance_or_dear_rounds_choose_the_target_alone():
    assert choose_k(sure(0.2), costs(rounds(0.030, 0.040, 0.010)), 1, 8) == 0
    assert choose_k(sure(0.9), costs(rounds(0.010, 0.040, 0.010)), 1, 8) == 0


def test_each_batch_bucket_keeps_its_own_round_times():
    """At concurrency 1 a round of k = 4 costs little more than the target alone; at 32 the step is
    compute-bound and the same acceptance chooses k = 0."""
    model = CostModel()
    for k, seconds in rounds(0.030, 0.032, 0.002).items():
        model.observe(1, k, seconds)
    for k, seconds in rounds(0.120, 0.150, 0.075).items():
        model.observe(32, k, seconds)
    assert choose_k(sure(0.7), model, 1, 4) == 4
    assert choose_k(sure(0.7), model, 30, 4) == 0  # 30 sequences fall in the bucket of 32


def test_unmeasured_lengths_are_read_off_the_line_through_measured_ones():
    model = costs({0: 0.030, 2: 0.040, 4: 0.050})
    assert model.round_seconds(1, 3) == pytest.approx(0.045)
    assert model.round_seconds(1, 8) == pytest.approx(0.070)
    assert model.round_seconds(1, 0) == pytest.approx(0.030)  # k = 0 is never extrapolated from k >= 1
    assert CostModel().round_seconds(1, 0) is None


def test_exploration_measures_each_listed_length_before_choosing():
    model = CostModel()
    explored = []
    for _ in EXPLORE:
        k = choose_k(sure(0.9), model, 1, 8)
        explored.append(k)
        model.observe(1, k, 0.030 + 0.001 * k)
    assert explored == list(EXPLORE)
    assert choose_k(sure(0.9), model, 1, 8) == 8  # then goodput decides
    assert choose_k(sure(0.9), model, 1, 3) == 3  # capped at max_k


def test_a_length_unseen_for_long_is_measured_again():
    model = costs(rounds(0.030, 0.030, 0.0005))
    assert choose_k(sure(0.9), model, 1, 4) == 4
    for _ in range(REFRESH_ROUNDS + 1):  # only k = 4 rounds for a while: the others go stale
        model.observe(1, 4, 0.032)
    assert model.stale(1, 2) and model.stale(1, 0) and not model.stale(1, 4)
    assert choose_k(sure(0.9), model, 1, 4) == 1
    for k in (1, 2, 3):
        model.observe(1, k, 0.031)
    assert choose_k(sure(0.9), model, 1, 4) == 0


def test_round_times_are_moving_averages():
    model = CostModel(smoothing=0.5)
    model.observe(1, 2, 0.040)
    model.observe(1, 2, 0.020)
    assert model.round_seconds(1, 2) == pytest.approx(0.030)


def test_pooled_acceptance_follows_the_traffic():
    estimate = AcceptanceEstimate(decay=0.99)
    for _ in range(500):
        estimate.observe(1, 0)  # a stretch of text the draft never guesses
    assert estimate.rate(0) < 0.05
    for _ in range(500):
        estimate.observe(1, 1)  # then one it always does
    assert estimate.rate(0) > 0.95
