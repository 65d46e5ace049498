"""Adaptive k (`--k auto`): pick the draft length that maximises expected tokens per second.

For draft length k with per-position conditional acceptance a_1..a_k, a round yields
E(k) = 1 + a_1 + a_1 a_2 + ... + a_1...a_k tokens and costs draft(k) + verify(k) seconds; k = 0 is
the target alone, 1 token per verify(0). Costs are measured across all requests: the draft's time
per proposed token and a least-squares line of verify time against k (verification of k + 1
tokens is not flat in k on a CPU). Acceptance is measured per request (its own text), smoothed
towards a prior so that early rounds do not swing k; until a request has data, the prior rate is
used. This follows SmartSpec (arXiv 2406.14066): choose by goodput, not by acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CostModel:
    """Coordinator-wide step costs (seconds), as exponential moving averages."""

    draft_per_token: float | None = None
    verify_points: dict[int, float] = field(default_factory=dict)  # k -> mean verify seconds
    smoothing: float = 0.1

    def observe(self, k: int, draft_seconds: float, verify_seconds: float) -> None:
        if k:
            per_token = draft_seconds / k
            self.draft_per_token = per_token if self.draft_per_token is None else \
                (1 - self.smoothing) * self.draft_per_token + self.smoothing * per_token
        old = self.verify_points.get(k)
        self.verify_points[k] = verify_seconds if old is None else (1 - self.smoothing) * old + self.smoothing * verify_seconds

    def verify(self, k: int) -> float | None:
        """Verify seconds for k draft tokens: the measured value, else a line through the measured points."""
        if k in self.verify_points:
            return self.verify_points[k]
        points = list(self.verify_points.items())
        if len(points) < 2:
            return None
        n = len(points)
        mean_k = sum(p for p, _ in points) / n
        mean_t = sum(t for _, t in points) / n
        spread = sum((p - mean_k) ** 2 for p, _ in points)
        slope = sum((p - mean_k) * (t - mean_t) for p, t in points) / spread if spread else 0.0
        return max(mean_t + slope * (k - mean_k), 1e-6)


@dataclass(slots=True)
class AcceptanceEstimate:
    """One request's per-position acceptance, smoothed towards `prior`."""

    prior: float = 0.6
    weight: float = 4.0  # pseudo-observations of the prior
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def observe(self, k: int, num_accepted: int) -> None:
        while len(self.proposed) < k:
            self.proposed.append(0)
            self.accepted.append(0)
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


AUTO_K = -1  # GenerationRequest.k when the coordinator runs with --k auto


def choose_k(estimate: AcceptanceEstimate, costs: CostModel, max_k: int) -> int:
    """argmax over k in [0, max_k] of E(k) / (draft(k) + verify(k)). Until every k in 1..max_k has
    been measured once (coordinator-wide), the smallest unmeasured k is tried: exploration costs
    at most max_k rounds and never changes the output, only its speed."""
    for k in range(1, max_k + 1):
        if k not in costs.verify_points:
            return k
    if costs.draft_per_token is None or costs.verify(0) is None:
        return max_k
    best_k, best_rate = 0, 1.0 / costs.verify(0)
    for k in range(1, max_k + 1):
        verify = costs.verify(k)
        if verify is None:
            continue
        rate = expected_tokens(estimate, k) / (costs.draft_per_token * k + verify)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k
