from __future__ import annotations

import time

import pytest

from coordinator.adaptive import (
    AUTONOMOUS_CHUNK, DECIDE_ROUNDS, EXPLORE, LOST_BELOW_SECONDS, MEASURE_ROUNDS, REFRESH_SECONDS, SAMPLES, SETTLE_MARGIN, SPECULATION_MARGIN,
    AcceptanceEstimate, CostModel,
    batch_bucket, choose_k, expected_tokens, fastest_k,
)


def measure(model: CostModel, sequences: int, rounds: dict[int, float], now: float | None = None) -> CostModel:
    """Round seconds by k, measured at a batch of `sequences`, `now`: enough rounds of each to be
    fresh (MEASURE_ROUNDS per sequence)."""
    for k, seconds in rounds.items():
        for _ in range(MEASURE_ROUNDS * batch_bucket(sequences)):
            model.observe(sequences, k, seconds, now=now)
    return model


def costs(rounds: dict[int, float], sequences: int = 1) -> CostModel:
    """Round seconds by k, measured just now at a batch of `sequences`."""
    return measure(CostModel(), sequences, rounds)


def rounds(target_alone: float, base: float, per_token: float) -> dict[int, float]:
    """Round seconds for k = 0 and, on a line, for k = 1 .. 4."""
    return {k: target_alone if k == 0 else base + per_token * k for k in range(5)}


def drive(model: CostModel, estimate: AcceptanceEstimate, seconds: dict[int, float], rounds: int,
          sequences: int = 1, max_k: int = 8, clock: float | None = None) -> list[int]:
    """`rounds` rounds one after another, each of the k chosen for it, taking `seconds[k]` (k beyond
    the dict: its last), on a clock of their own from `clock` (default: now)."""
    chosen, clock = [], time.perf_counter() if clock is None else clock
    for _ in range(rounds):
        k = choose_k(estimate, model, sequences, max_k, now=clock)
        chosen.append(k)
        clock += seconds.get(k, seconds[max(seconds)])
        model.observe(sequences, k, seconds.get(k, seconds[max(seconds)]), now=clock)
    return chosen


def runs(chosen: list[int]) -> list[tuple[int, int]]:
    """(k, how many rounds in a row) of a sequence of choices."""
    out: list[tuple[int, int]] = []
    for k in chosen:
        if out and out[-1][0] == k:
            out[-1] = (k, out[-1][1] + 1)
        else:
            out.append((k, 1))
    return out


def sure(rate: float) -> AcceptanceEstimate:
    return AcceptanceEstimate(prior=rate, weight=1e9)  # the prior alone, at every position


def test_expected_tokens_follows_the_geometric_formula():
    assert expected_tokens(sure(0.5), 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 32)] == [1, 1, 2, 4, 4, 8, 8, 16, 32]


def test_cheap_rounds_and_high_acceptance_climb_to_a_long_proposal():
    """Verifying k + 1 tokens costs little more than one: each decision may go one past the
    longest length measured once that one has won as the bucket's choice, so k climbs to max_k
    as each new length proves itself."""
    flat = {k: 0.030 if k == 0 else 0.032 + 0.001 * k for k in range(9)}
    model = costs(rounds(0.030, 0.032, 0.001))
    assert choose_k(sure(0.9), model, 1, 8) == 4  # the longest measured: it has not run as the choice yet
    chosen = drive(model, sure(0.9), flat, 5 * DECIDE_ROUNDS)
    assert runs(chosen) == [(k, DECIDE_ROUNDS) for k in (4, 5, 6, 7, 8)]


def test_a_line_read_past_its_points_is_not_trusted():
    """T(2) = T(4) within noise: the line is flat, but k = 10 is not chosen off it."""
    model = costs({0: 0.030, 1: 0.069, 2: 0.069, 4: 0.069})
    model.times(1).chosen.add(4)
    assert choose_k(sure(0.7), model, 1, 16) == 5
    assert model.round_seconds(1, 3) == pytest.approx(0.069)


def test_a_proposal_must_beat_the_target_alone_by_the_margin():
    """E(1) = 2 tokens a round: a round of k = 1 wins only if it costs under 2 / (1 + margin)
    target-only rounds."""
    close = 2 * 0.030 / (1 + SPECULATION_MARGIN)
    assert choose_k(sure(1.0 - 1e-9), costs({0: 0.030, 1: close * 1.01}), 1, 1) == 0
    assert choose_k(sure(1.0 - 1e-9), costs({0: 0.030, 1: close * 0.99}), 1, 1) == 1


def test_poor_acceptance_or_dear_rounds_choose_the_target_alone():
    assert choose_k(sure(0.2), costs(rounds(0.030, 0.040, 0.010)), 1, 8) == 0
    assert choose_k(sure(0.9), costs(rounds(0.010, 0.040, 0.010)), 1, 8) == 0


def test_each_batch_bucket_keeps_its_own_round_times():
    """At concurrency 1 a round of k = 4 costs little more than the target alone; at 32 the step is
    compute-bound and the same acceptance chooses k = 0."""
    model = measure(measure(CostModel(), 1, rounds(0.030, 0.032, 0.002)), 32, rounds(0.120, 0.150, 0.075))
    assert choose_k(sure(0.7), model, 1, 4) == 4
    assert choose_k(sure(0.7), model, 30, 4) == 0  # 30 sequences fall in the bucket of 32


def test_unmeasured_lengths_are_read_off_the_line_through_measured_ones():
    model = costs({0: 0.030, 2: 0.040, 4: 0.050})
    assert model.round_seconds(1, 3) == pytest.approx(0.045)
    assert model.round_seconds(1, 8) == pytest.approx(0.070)
    assert model.round_seconds(1, 0) == pytest.approx(0.030)  # k = 0 is never extrapolated from k >= 1
    assert CostModel().round_seconds(1, 0) is None


def test_one_measured_proposal_length_prices_longer_ones_by_its_cost_over_the_target_alone():
    """Only k = 1 and k = 0 measured (say max_k = 1 explored them): k = 2 is priced at T(1) +
    (T(1) - T(0)), so where k = 1 lost to the target alone (concurrency 4 on a CPU: 24.5 against
    13.1 ms) a longer proposal is not chosen for looking as cheap as k = 1; where k = 1 costs
    little more, k = 2 is tried next."""
    dear = costs({0: 0.0131, 1: 0.0245}, sequences=4)
    assert dear.round_seconds(4, 2) == pytest.approx(0.0359)
    acceptance = AcceptanceEstimate(prior=0.6, weight=1e9)
    acceptance.proposed, acceptance.accepted = [1e9, 1e9], [0.78e9, 0.55e9]
    assert fastest_k(acceptance, dear, 4, 8) == 0
    cheap = costs({0: 0.0096, 1: 0.0117})
    assert cheap.round_seconds(1, 2) == pytest.approx(0.0138)
    assert fastest_k(acceptance, cheap, 1, 8) == 1  # k = 1 wins; longer once it has run as the choice
    cheap.times(1).chosen.add(1)
    assert fastest_k(acceptance, cheap, 1, 8) == 2
    assert costs({1: 0.02}).round_seconds(1, 3) == pytest.approx(0.02)  # no k = 0 to compare: flat


def test_exploration_measures_each_listed_length_before_choosing():
    """The target alone and the two shortest proposals are measured first; a longer proposal only
    once the one before it has won (one past the longest measured), so a batch where speculation
    loses never pays for a long one."""
    assert EXPLORE == (0, 1, 2)
    model, window = CostModel(), MEASURE_ROUNDS
    chosen = drive(model, sure(0.9), {k: 0.030 + 0.001 * k for k in range(9)}, len(EXPLORE) * window)
    assert chosen == [k for k in EXPLORE for _ in range(window)]
    assert set(model.buckets[1].seconds) == set(EXPLORE)
    assert choose_k(sure(0.9), model, 1, 8) == 2  # then goodput decides; one past it once it has won as the choice
    assert choose_k(sure(0.9), model, 1, 1) == 1  # capped at max_k
    dear = CostModel()
    drive(dear, sure(0.9), {0: 0.010, 1: 0.040}, len(EXPLORE) * window + 3 * DECIDE_ROUNDS)
    assert set(dear.buckets[1].seconds) == {0, 1, 2}  # both lost to the target alone: nothing longer was tried


def test_a_batch_runs_one_choice_and_measures_only_settled_rounds_of_it():
    """Four requests in bucket 4 ask in turn: all get the bucket's choice. A round of another k
    is not measured, nor one that started while the last choice's rounds could still be in flight:
    a round of it, times SETTLE_MARGIN, and an autonomous chunk of them where k = 0 is the last
    choice or the new one."""
    model = CostModel()
    times = model.times(4)
    model.observe(4, 0, 0.010, now=1.0)  # before any choice: measured
    times.switch(0, 1, now=1.0, shared=True)  # the bucket runs k = 0 for one round
    model.observe(4, 2, 0.030, now=1.5)  # another choice's round
    assert set(times.seconds) == {0}
    k = choose_k(sure(0.9), model, 4, 4, now=2.0)  # k = 0 has one round: explored again, first
    assert k == EXPLORE[0] == 0 and [choose_k(sure(0.9), model, 3, 4, now=2.0) for _ in range(3)] == [0] * 3
    measure(model, 4, {0: 0.010}, now=2.5)
    assert choose_k(sure(0.9), model, 4, 4, now=3.0) == EXPLORE[1] == 1
    settled = 3.0 + SETTLE_MARGIN * 0.010 * AUTONOMOUS_CHUNK
    model.observe(4, 0, 0.010, now=3.1)  # a target-only round of the chunk still running
    model.observe(4, 1, 0.040, now=settled + 0.039)  # started before the chunks could all have ended
    assert set(times.seconds) == {0}
    model.observe(4, 1, 0.040, now=settled + 0.041)
    assert times.seconds[1] == 0.040
    assert choose_k(sure(0.9), model, 4, 4, now=3.5) == 1  # held until measured for MEASURE_ROUNDS per sequence
    times.switch(0, 1, now=4.0, shared=True)  # back to k = 0: its first chunk shares steps with proposals
    assert times.settled_at == pytest.approx(4.0 + SETTLE_MARGIN * 0.040 * AUTONOMOUS_CHUNK)
    times.switch(2, 1, now=5.0, shared=True)
    times.switch(1, 1, now=6.0, shared=True)  # between proposals: a round of the last
    assert times.settled_at == pytest.approx(6.0 + SETTLE_MARGIN * 0.040)  # k = 2 unmeasured: the dearest measured


def test_the_choice_is_made_again_by_goodput():
    """Measured, k = 4 is fastest; then acceptance drops and, at the next decision, k = 0 wins."""
    seconds = rounds(0.030, 0.030, 0.001)
    model = costs(seconds)
    assert drive(model, sure(0.9), seconds, DECIDE_ROUNDS, max_k=4) == [4] * DECIDE_ROUNDS
    assert drive(model, sure(0.01), seconds, 1, max_k=4) == [0]


def test_a_length_unseen_for_long_is_measured_again():
    """k = 4 wins and runs; REFRESH_SECONDS later the lengths it beat are measured again, k = 0 first,
    and k = 4, measured all along as the choice, is not."""
    model, window = measure(CostModel(), 1, rounds(0.030, 0.030, 0.0005), now=0.0), MEASURE_ROUNDS
    seconds = {0: 0.030, 1: 0.0305, 2: 0.031, 4: 0.032}
    explored = len(EXPLORE) * window
    chosen = drive(model, sure(0.9), seconds, int(REFRESH_SECONDS / 0.032) + DECIDE_ROUNDS + explored,
                   max_k=4, clock=0.0)
    refreshed = chosen.index(EXPLORE[0])
    assert set(chosen[:refreshed]) == {4} and refreshed * 0.032 >= REFRESH_SECONDS
    assert chosen[refreshed:refreshed + explored] == [k for k in EXPLORE for _ in range(window)]
    assert set(chosen[refreshed + explored:]) == {4}
    assert not any(model.stale(1, k, refreshed * 0.032 + explored * 0.031) for k in (*EXPLORE, 4))


def test_round_times_are_trimmed_means_of_the_last_rounds():
    """A round whose step also ran a long prefill does not move the estimate; rounds that alternate
    between a chained and a missed branch average out (a median would read one of the two); a
    lasting change does move it."""
    model = CostModel()
    for seconds in (0.020, 0.021, 0.019, 0.200, 0.020) + (0.020,) * 15:
        model.observe(1, 0, seconds)
    assert model.round_seconds(1, 0) == pytest.approx(0.020, rel=0.01)
    for i in range(SAMPLES):
        model.observe(1, 2, 0.008 if i % 2 else 0.016)
    assert model.round_seconds(1, 2) == pytest.approx(0.012, rel=0.01)
    for _ in range(SAMPLES):
        model.observe(1, 0, 0.030)
    assert model.round_seconds(1, 0) == pytest.approx(0.030)


def test_a_bucket_averages_over_as_many_rounds_per_sequence():
    """At a batch of 4, a burst of slow rounds (the batch's sequences finishing and prefilling
    together) that fills half of SAMPLES rounds is a small share of the bucket's window."""
    model = CostModel()
    for _ in range(4 * SAMPLES):
        model.observe(4, 0, 0.013)
    for _ in range(SAMPLES // 2):
        model.observe(4, 0, 0.030)
    assert model.round_seconds(4, 0) < 0.015


def test_pooled_acceptance_follows_the_traffic():
    estimate = AcceptanceEstimate(decay=0.99)
    for _ in range(500):
        estimate.observe(1, 0)  # a stretch of text the draft never guesses
    assert estimate.rate(0) < 0.05
    for _ in range(500):
        estimate.observe(1, 1)  # then one it always does
    assert estimate.rate(0) > 0.95


def test_two_explored_lengths_price_proposals_apart_from_the_target_alone():
    """Where target-only rounds run on more cores than speculative ones (`target_worker.cores`), k = 1
    costs far more than k = 0 and little less than k = 2: the line through k = 1 and 2 prices k = 3,
    and speculation wins where k = 1 alone lost (concurrency 1: 12.98 ms for k = 0, 22.33 for k = 1
    at 1.73 tokens; k = 3 then ran 23.5 ms for 2.6 tokens)."""
    acceptance = sure(0.73)
    model = costs({0: 0.01298, 1: 0.02233})
    assert fastest_k(acceptance, model, 1, 8) == 0  # k = 2 priced at 31.7 ms off T(1) - T(0)
    model.observe(1, 2, 0.0226)
    assert model.round_seconds(1, 3) == pytest.approx(0.02287)
    assert fastest_k(acceptance, model, 1, 8) == 2
    model.times(1).chosen.add(2)  # and it won as the choice
    assert fastest_k(acceptance, model, 1, 8) == 3


def test_a_larger_batch_runs_the_target_alone_where_a_smaller_one_chose_it():
    """Bucket 4 chose k = 0 over its measured proposals: bucket 16 runs k = 0 at once, exploring no
    proposal, until that choice is LOST_BELOW_SECONDS old, though bucket 4 explores meanwhile;
    bucket 2 explores as before. Bucket 16's k = 0 so taken renews nothing for bucket 32."""
    model, now = CostModel(), 1000.0
    measure(model, 4, {0: 0.014, 1: 0.029, 2: 0.031}, now=now)
    assert choose_k(sure(0.6), model, 4, 8, now=now) == 0  # by goodput
    assert not model.buckets[4].exploring
    assert choose_k(sure(0.6), model, 16, 8, now=now + 1.0) == 0
    assert not model.buckets[16].exploring and model.buckets[16].hold == DECIDE_ROUNDS * 16
    assert choose_k(sure(0.6), model, 2, 8, now=now + 1.0) == EXPLORE[0]  # a smaller batch: its own
    model.buckets[4].choice_rounds = model.buckets[4].hold
    assert choose_k(sure(0.6), model, 4, 8, now=now + REFRESH_SECONDS + 1.0) == EXPLORE[0]  # bucket 4 explores
    model.buckets[16].choice_rounds = model.buckets[16].hold
    assert choose_k(sure(0.6), model, 16, 8, now=now + LOST_BELOW_SECONDS - 1.0) == 0
    assert choose_k(sure(0.6), model, 32, 8, now=now + LOST_BELOW_SECONDS + 1.0) == EXPLORE[0]
    model.buckets[16].choice_rounds = model.buckets[16].hold
    assert choose_k(sure(0.6), model, 16, 8, now=now + LOST_BELOW_SECONDS + 1.0) == EXPLORE[0]


def test_a_smaller_batch_that_chose_a_proposal_again_tells_larger_batches_to_explore():
    model, now = CostModel(), 1000.0
    measure(model, 4, {0: 0.014, 1: 0.029, 2: 0.031}, now=now)
    assert choose_k(sure(0.6), model, 4, 8, now=now) == 0
    assert choose_k(sure(0.6), model, 16, 8, now=now + 1.0) == 0
    measure(model, 4, {0: 0.030, 1: 0.016, 2: 0.017}, now=now + 2.0)  # proposals got cheap at bucket 4
    model.buckets[4].choice_rounds = model.buckets[4].hold
    assert choose_k(sure(0.9), model, 4, 8, now=now + 2.0) >= 1
    model.buckets[16].choice_rounds = model.buckets[16].hold
    assert choose_k(sure(0.9), model, 16, 8, now=now + 3.0) == EXPLORE[0]


def test_an_exploring_k_of_0_tells_larger_batches_nothing():
    """Bucket 4 measuring k = 0 (exploring) is no choice: bucket 16 explores its own proposals."""
    model, now = CostModel(), 1000.0
    model.observe(4, 1, 0.02, now=now)
    model.observe(4, 2, 0.021, now=now)
    assert choose_k(sure(0.6), model, 4, 8, now=now) == 0 and model.buckets[4].exploring
    assert choose_k(sure(0.6), model, 16, 8, now=now) == EXPLORE[0]


def test_a_length_past_the_longest_measured_is_tried_only_where_the_longest_wins():
    """k = 1 and 2 measured, both losing to k = 0: k = 3 is not read off their line, however cheap
    it looks there (at concurrency 4 a k = 3 so chosen took 49.0 ms against 38.7 on the line);
    nor where k = 2 wins but has not run as the bucket's choice yet."""
    acceptance = sure(0.9)
    losing = costs({0: 0.010, 1: 0.030, 2: 0.0305})  # k = 3 on the line: 31 ms for 3.44 tokens
    assert losing.round_seconds(1, 3) == pytest.approx(0.031)
    assert fastest_k(acceptance, losing, 1, 8) == 0
    winning = costs({0: 0.020, 1: 0.021, 2: 0.022})
    assert fastest_k(acceptance, winning, 1, 8) == 2
    winning.times(1).chosen.add(2)
    assert fastest_k(acceptance, winning, 1, 8) == 3
    assert fastest_k(acceptance, winning, 1, 2) == 2  # never past max_k


def test_round_times_are_averaged_when_asked_not_per_round():
    """A round only files its time; the trimmed mean (a sort of up to 2048 rounds at bucket 32) is
    taken when a decision reads it, and reflects every round filed since."""
    model = CostModel()
    for seconds in (0.010, 0.020, 0.030):
        model.observe(32, 0, seconds, now=1.0)
    times = model.times(32)
    assert times.means == {} and times.unsorted == {0}
    assert times.seconds == {0: pytest.approx(0.020)}
    model.observe(32, 0, 0.060, now=2.0)
    assert times.means[0] == pytest.approx(0.020)  # not yet re-averaged
    assert model.round_seconds(32, 0) == pytest.approx(0.030)


def test_a_pass_prices_proposals_against_the_steady_run_of_the_target_alone():
    """Bucket 4 runs k = 0 as its choice; REFRESH_SECONDS later k = 1 and 2 are measured anew and
    compared with T(0) from that steady run: k = 0 is not explored again right after them
    (measured so, it read 18-22 ms a round where the steady run read 14-16, and chose proposals)."""
    model, now = measure(CostModel(), 4, {0: 0.014, 1: 0.029, 2: 0.031}, now=1000.0), 1000.0
    times = model.buckets[4]
    assert choose_k(sure(0.6), model, 4, 8, now=now) == 0 and not times.exploring
    later = now + REFRESH_SECONDS + 1.0
    measure(model, 4, {0: 0.0145}, now=later - 1.0)  # the steady run of the choice
    explored = []
    for step in range(2):
        times.choice_rounds = times.hold
        explored.append(choose_k(sure(0.6), model, 4, 8, now=later + step))
        assert times.exploring
        measure(model, 4, {explored[-1]: {1: 0.027, 2: 0.032}[explored[-1]]}, now=later + step + 0.5)
    assert explored == [1, 2]
    times.choice_rounds = times.hold
    assert choose_k(sure(0.6), model, 4, 8, now=later + 3) == 0 and not times.exploring
    assert model.round_seconds(4, 0) == pytest.approx(0.01425, abs=0.0003)


def test_a_few_recent_rounds_do_not_keep_a_length_fresh():
    """k = 0 measured long ago at 18.8 ms, then a few rounds in another phase's tail: the pass
    measures it again, first, then k = 1 and 2, and chooses by the round times it measured, not
    by the old T(0) (which chose k = 2 where k = 0 ran 15 ms a round)."""
    model, now = measure(CostModel(), 4, {0: 0.0188, 1: 0.029, 2: 0.031}, now=1000.0), 1000.0
    times = model.buckets[4]
    later = now + REFRESH_SECONDS + 1.0
    for _ in range(3):
        model.observe(4, 0, 0.0188, now=later - 1.0)
    assert model.stale(4, 0, later)
    explored = []
    for step in range(3):
        k = choose_k(sure(0.6), model, 4, 8, now=later + step)
        assert times.exploring
        explored.append(k)
        measure(model, 4, {k: {0: 0.015, 1: 0.027, 2: 0.032}[k]}, now=later + step + 0.5)
    assert explored == [0, 1, 2]
    assert choose_k(sure(0.6), model, 4, 8, now=later + 4) == 0 and not times.exploring
    assert model.round_seconds(4, 0) == pytest.approx(0.015)
