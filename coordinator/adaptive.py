"""Goodput k (`--k auto`, the default of `splitspec up`): the draft length with the most tokens per second.

For draft length k with per-position conditional acceptance a_1..a_k, a round yields
E(k) = 1 + a_1 + a_1 a_2 + ... + a_1...a_k tokens and takes T(k) seconds, verdict to verdict:
drafting, the network, queueing and the verify step, with overlap and chained rounds as they
happened. k = 0 is the target alone, decoding by itself (autonomous chunks, no round trip per
token): E(0) = 1. T depends on how many sequences share the target's steps, so it is measured
per batch bucket (the requests pinned to the target, rounded up to a power of two): at
concurrency 1 a verify of k + 1 tokens costs little more than one token and speculation pays;
at concurrency 32 the step is compute-bound and k = 0 wins. This follows SmartSpec (arXiv
2406.14066): choose by goodput, not by acceptance, and let k = 0 win when it is fastest.

Goodput is a property of the batch, so the batch chooses: one k per bucket, shared by every
request in it, and a round is measured only on a batch that runs that k. Measured one request at
a time, speculation always looks worth it: a request's extra tokens cost little inside a step of
target-only sequences, and a target-only request's step is priced by its neighbours' verifies.
Acceptance is pooled over all requests, old rounds decaying, smoothed towards a prior. T(k) is
a trimmed mean of the last SAMPLES rounds per sequence of the bucket: the mean, because goodput is
tokens over total time and round times are bimodal with overlap (a chained round costs a verify,
a missed branch a draft and a verify: a median jumps between the two modes as the hit rate
drifts); trimmed (TRIM of each end), because a step that also ran new requests' prefills is an
outlier; per sequence, because at concurrency 4 the sequences finish and prefill together and a
window of 32 rounds was 8 tokens each, which one such burst filled (T(0) read 20 ms for 13).

A bucket runs its choice for DECIDE_ROUNDS rounds per sequence, then chooses again. Lengths not
yet measured are explored first (EXPLORE: k = 0 and the two shortest proposals), and each again once
it has fewer than MEASURE_ROUNDS rounds per sequence measured in the last REFRESH_SECONDS, so that a
cost taken under other traffic or in a burst of prefills does not stick for the rest of a run; an
exploring choice is held until MEASURE_ROUNDS rounds per sequence have been measured. After a
switch, rounds of the last choice are still in flight (an autonomous chunk runs AUTONOMOUS_CHUNK
of them): a round that started before they can all have ended (SETTLE_MARGIN times the longest
of them; a chunk of them where k = 0 is the last choice or the new one) shares steps with them
and is not measured. Other k >= 1 are read off a line through the
bucket's measured points, up to one past the longest measured where that one, run as the bucket's
choice, wins again; a proposal must beat k = 0 by
SPECULATION_MARGIN. Longer proposals are thus reached one at a time, each measured only once the
one before it won. Two proposal lengths are explored, not one, because k = 0 and k >= 1 may run
on different cores (the target's steps of target-only rounds take the drafts' cores too,
`target_worker.cores`): T(1) - T(0) is then no per-token cost, and only a line through two
proposals says what a longer one costs (with k = 1 alone, k = 0 won at concurrency 1, 12.98
against 22.33 ms for 1.73 tokens, where k = 3 then gave 23.5 ms for 2.6).

T(0) is compared with proposals as measured in a steady run of k = 0, not in the rounds right
after proposals: k = 0 is explored first in a pass; where the bucket ran k = 0 as its choice until
the pass, its rounds from that run stand (fresh: no exploration); and a switch to or from k = 0
settles over an autonomous chunk of the last choice's rounds. Measured from 2x the last round
after a switch from proposals, T(0) read 18-22 ms a round at concurrency 4 where the steady run
read 14-16, and chose k = 1 or 2 for 11-13 s of 19 s phases at 32-42 ms a round; in a faster
run, the first chunk's rounds after proposals read 9.9-13.6 ms (the 7th-9th slowest, where the
chunk is extended), steady 10.3. Freshness counts rounds, not the last one: a few rounds in
another phase's tail kept an old T(0) of 18.8 ms fresh while k = 1 and 2 were explored anew.

Speculation pays less the larger the batch (SmartSpec): where a smaller bucket's last choice by
goodput was k = 0 over its measured proposals, within LOST_BELOW_SECONDS, a larger one runs k = 0
without exploring proposals, so that a large batch pays no exploration where a smaller one has
lost. A larger bucket's k = 0 taken so is no such choice: it renews nothing. Within REFRESH_SECONDS
only, traffic that went from concurrency 4 to 16 after other work (the peer benchmark's
interleaved rounds) explored k = 1 and 2 at bucket 16 and 32: 80-155 ms a round against 33-54 for
k = 0, 1.9 and 3.0 s of 8 and 7 s phases. Exploration changes speed only, never the output.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

AUTO_K = -1  # GenerationRequest.k when the coordinator runs with --k auto
EXPLORE = (0, 1, 2)  # draft lengths measured first in every bucket; longer ones one at a time as they win
REFRESH_SECONDS = 20.0  # a k with fewer than MEASURE_ROUNDS rounds per sequence this recent is measured again
LOST_BELOW_SECONDS = 300.0  # a bucket's k = 0 by goodput spares larger buckets exploring for this long
DECIDE_ROUNDS = 16      # rounds per sequence a bucket runs its choice before choosing again
SETTLE_MARGIN = 2.0     # after a switch, the last choice's rounds may take this much longer than measured
MEASURE_ROUNDS = 8      # rounds per sequence an exploring choice is measured before it is compared
SAMPLES = 64            # rounds per sequence of the bucket that a round time is averaged over
TRIM = 0.1              # the share of rounds dropped at each end before averaging
SPECULATION_MARGIN = 0.05  # the goodput a proposal must gain over the target alone: less is within noise
AUTONOMOUS_CHUNK = 8    # target-only rounds the target runs by itself when k = 0 wins, before k is chosen again
EXTEND_AHEAD = 2        # ... chosen again this many rounds before the chunk ends: k = 0 again extends it in time


def batch_bucket(sequences: int) -> int:
    """1, 2, 4, 8, ...: the power of two at or above `sequences`."""
    return 1 << max(0, sequences - 1).bit_length()


def trimmed_mean(samples: "deque[float] | list[float]") -> float:
    """The mean without the TRIM share of lowest and highest values (at least one each from five
    samples on)."""
    ordered = sorted(samples)
    cut = max(int(len(ordered) * TRIM), 1 if len(ordered) >= 5 else 0)
    kept = ordered[cut: len(ordered) - cut]
    return sum(kept) / len(kept)


@dataclass(slots=True)
class RoundTimes:
    """One batch bucket's round seconds by draft length, as trimmed means of the last rounds
    measured, and the draft length its requests run now."""

    bucket: int = 1                                          # the batch bucket: rounds per step
    samples: dict[int, deque] = field(default_factory=dict)  # k -> the last `window` round seconds
    measured_at: dict[int, deque] = field(default_factory=dict)  # k -> when each of them ended (perf_counter)
    means: dict[int, float] = field(default_factory=dict)    # k -> trimmed mean of its samples, once asked for
    unsorted: set[int] = field(default_factory=set)          # k whose samples changed since its mean was taken
    choice: int | None = None                                # the k every request here runs
    choice_rounds: int = 0                                   # rounds of `choice` measured since it was chosen
    hold: int = 0                                            # ... before the bucket chooses again
    settled_at: float = 0.0                                  # rounds started before this share steps with the last choice's
    exploring: bool = False                                  # `choice` is being measured, not chosen by goodput
    lost_at: float = float("-inf")                           # time.perf_counter() of its last k = 0 by goodput
    chosen: set[int] = field(default_factory=set)            # the k this bucket has run by goodput

    @property
    def window(self) -> int:
        """Rounds each k's estimate is taken over: SAMPLES per sequence."""
        return SAMPLES * self.bucket

    @property
    def seconds(self) -> dict[int, float]:
        """k -> trimmed mean round seconds. Taken when asked (at a decision), not per round: the
        sort of a bucket-32 window (2048 rounds) cost 144 us, on every round of every sequence."""
        for k in self.unsorted:
            if self.samples.get(k):  # else dropped to be measured afresh: the last mean stands till then
                self.means[k] = trimmed_mean(self.samples[k])
        self.unsorted.clear()
        return self.means

    def add(self, k: int, seconds: float, now: float) -> None:
        if k not in self.samples:  # once per k, not per round (setdefault built two deques a round)
            self.samples[k], self.measured_at[k] = deque(maxlen=self.window), deque(maxlen=self.window)
        self.samples[k].append(seconds)
        self.measured_at[k].append(now)
        self.unsorted.add(k)

    def forget(self, k: int) -> None:
        """Drop k's rounds, to be measured afresh (the old ones ran under other traffic)."""
        self.samples.pop(k, None)
        self.measured_at.pop(k, None)

    def fresh(self, k: int, now: float) -> bool:
        """MEASURE_ROUNDS rounds per sequence of k measured within the last REFRESH_SECONDS."""
        needed, since, recent = MEASURE_ROUNDS * self.bucket, now - REFRESH_SECONDS, 0
        for at in reversed(self.measured_at.get(k, ())):
            if at < since or recent >= needed:
                break
            recent += 1
        return recent >= needed

    def switch(self, k: int, hold: int, now: float, shared: bool, exploring: bool = False) -> None:
        """Every request here runs `k` from now, for `hold` measured rounds. `shared`: several
        sequences share the steps, so rounds of the last choice are still in flight."""
        if shared and self.choice is not None and k != self.choice:
            last = self.seconds.get(self.choice, max(self.seconds.values(), default=0.0))
            self.settled_at = now + SETTLE_MARGIN * last * (AUTONOMOUS_CHUNK if 0 in (k, self.choice) else 1)
        self.choice, self.hold, self.choice_rounds, self.exploring = k, hold, 0, exploring
        if not exploring:
            self.chosen.add(k)

    def line(self, k: int) -> float | None:
        """T(k) for k >= 1 off a least-squares line through the measured k >= 1 points (slope >= 0).
        Through one point p, the slope is (T(p) - T(0)) / p where k = 0 is measured: each draft
        token is taken to cost what the first cost over the target alone (a flat line through T(1)
        made k = 2 look as cheap as k = 1 and chose it at concurrency 4, where k = 1 had lost to
        k = 0: 24.5 against 13.1 ms a round)."""
        points = [(p, t) for p, t in self.seconds.items() if p >= 1]
        if not points:
            return None
        if len(points) == 1:
            (p, t), alone = points[0], self.seconds.get(0)
            slope = max(t - alone, 0.0) / p if alone is not None else 0.0
            return max(t + slope * (k - p), 1e-6)
        n = len(points)
        mean_k = sum(p for p, _ in points) / n
        mean_t = sum(t for _, t in points) / n
        spread = sum((p - mean_k) ** 2 for p, _ in points)
        slope = sum((p - mean_k) * (t - mean_t) for p, t in points) / spread if spread else 0.0
        return max(mean_t + max(slope, 0.0) * (k - mean_k), 1e-6)  # a longer proposal never costs less


@dataclass(slots=True)
class CostModel:
    """Coordinator-wide round times, per batch bucket and draft length."""

    buckets: dict[int, RoundTimes] = field(default_factory=dict)

    def times(self, sequences: int) -> RoundTimes:
        bucket = batch_bucket(sequences)
        if bucket not in self.buckets:
            self.buckets[bucket] = RoundTimes(bucket=bucket)
        return self.buckets[bucket]

    def observe(self, sequences: int, k: int, seconds: float, now: float | None = None) -> None:
        """A round of `k` draft tokens took `seconds`, verdict to verdict, ending `now`
        (time.perf_counter()). Measured only when it ran the bucket's choice and started after the
        switch to it settled (before any choice: always)."""
        times, now = self.times(sequences), time.perf_counter() if now is None else now
        if times.choice is not None:
            if (k == 0) != (times.choice == 0) or k > times.choice:
                return  # another choice's round (a shorter proposal counts: confidence or max_tokens cut it)
            if now - seconds < times.settled_at:
                return
            times.choice_rounds += 1
        times.add(k, seconds, now)

    def round_seconds(self, sequences: int, k: int) -> float | None:
        """T(k) at this batch: measured, else (k >= 1) off the line; None when nothing says."""
        times = self.times(sequences)
        seconds = times.seconds
        if k in seconds:
            return seconds[k]
        return times.line(k) if k >= 1 else None

    def speculation_lost_below(self, sequences: int, now: float) -> bool:
        """A smaller batch's bucket last chose by goodput k = 0, within the last LOST_BELOW_SECONDS."""
        bucket = batch_bucket(sequences)
        return any(smaller < bucket and now - times.lost_at <= LOST_BELOW_SECONDS
                   for smaller, times in self.buckets.items())

    def stale(self, sequences: int, k: int, now: float) -> bool:
        """Not measured at this batch for MEASURE_ROUNDS rounds per sequence in the last REFRESH_SECONDS."""
        return not self.times(sequences).fresh(k, now)


@dataclass(slots=True)
class AcceptanceEstimate:
    """Per-position acceptance, smoothed towards `prior`; each round weighs `decay` times the one
    after it, so the estimate follows the traffic."""

    prior: float = 0.6
    weight: float = 4.0  # pseudo-observations of the prior
    decay: float = 0.999
    proposed: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def observe(self, k: int, num_accepted: int) -> None:
        while len(self.proposed) < k:
            self.proposed.append(0.0)
            self.accepted.append(0.0)
        for position in range(len(self.proposed)):
            self.proposed[position] *= self.decay
            self.accepted[position] *= self.decay
        for position in range(k):
            if position <= num_accepted:  # positions after the first rejection were never judged
                self.proposed[position] += 1
                self.accepted[position] += int(position < num_accepted)

    def rate(self, position: int) -> float:
        proposed = self.proposed[position] if position < len(self.proposed) else 0
        accepted = self.accepted[position] if position < len(self.accepted) else 0
        return (accepted + self.prior * self.weight) / (proposed + self.weight)


def expected_tokens(estimate: AcceptanceEstimate, k: int) -> float:
    total, reach = 1.0, 1.0
    for position in range(k):
        reach *= estimate.rate(position)
        total += reach
    return total


def choose_k(estimate: AcceptanceEstimate, costs: CostModel, sequences: int, max_k: int,
             now: float | None = None) -> int:
    """The k of this batch bucket: its current choice while held, else 0 where a smaller bucket
    just chose 0, else a stale EXPLORE length, else the argmax over k in [0, max_k] of E(k) / T(k)."""
    times, bucket = costs.times(sequences), batch_bucket(sequences)
    if times.choice is None or times.choice_rounds >= times.hold:
        now = time.perf_counter() if now is None else now
        lost_below = costs.speculation_lost_below(sequences, now)
        exploring = None if lost_below else next(
            (k for k in dict.fromkeys(min(k, max_k) for k in EXPLORE) if costs.stale(sequences, k, now)), None)
        if lost_below:
            times.switch(0, DECIDE_ROUNDS * bucket, now, bucket > 1)
        elif exploring is not None:
            times.forget(exploring)
            times.switch(exploring, MEASURE_ROUNDS * bucket, now, bucket > 1, exploring=True)
        else:
            times.switch(fastest_k(estimate, costs, sequences, max_k), DECIDE_ROUNDS * bucket, now, bucket > 1)
            times.lost_at = now if times.choice == 0 else float("-inf")
        log.info("k chosen", extra={
            "bucket": bucket, "k": times.choice, "exploring": exploring is not None, "lost_below": lost_below,
            "round_ms": {k: round(1000 * t, 2) for k, t in sorted(times.seconds.items())},
            "acceptance": [round(estimate.rate(p), 3) for p in range(max_k)]})
    return min(times.choice, max_k)


def fastest_k(estimate: AcceptanceEstimate, costs: CostModel, sequences: int, max_k: int) -> int:
    """argmax of E(k) / T(k) at a batch of `sequences`, over k = 0 and the k >= 1 up to the longest
    measured, and one past it where the longest wins again after a run as the bucket's choice (a
    line read far past its points is a guess: T(2) = T(4) within noise once chose k = 10; at
    concurrency 4, k = 3 read off k = 1 and 2, explored and winning by noise in T(0) only, took
    43-49 ms against 31-39 on the line); a proposal wins only by more than SPECULATION_MARGIN
    over k = 0."""
    times = costs.times(sequences)
    longest = min(max((k for k in times.seconds if k >= 1), default=0), max_k)
    best_k, best_rate = 0, 0.0
    for k in range(longest + 2 if longest < max_k else longest + 1):
        if k == longest + 1 and (best_k != longest or longest not in times.chosen):
            break
        seconds = costs.round_seconds(sequences, k)
        if seconds is None:
            continue
        rate = expected_tokens(estimate, k) / seconds * (1.0 if k == 0 else 1.0 / (1.0 + SPECULATION_MARGIN))
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k
