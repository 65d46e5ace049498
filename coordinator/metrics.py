"""Prometheus metrics of the coordinator: the shared serving metrics plus worker failovers."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import Counter

from splitspec.metrics import ServingMetrics


@dataclass(slots=True)
class CoordinatorMetrics(ServingMetrics):
    failovers: Counter = field(init=False)
    overlap: Counter = field(init=False)

    def __post_init__(self) -> None:
        ServingMetrics.__post_init__(self)
        self.failovers = Counter("splitspec:worker_failovers", "Requests moved off a failed worker", ["kind"],
                                 registry=self.registry)
        self.overlap = Counter("splitspec:overlap_speculations", "Rounds drafted during verification, by outcome (missed, held, or chained on the target)",
                               ["outcome"], registry=self.registry)

    def record_round(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts.inc()
        self.num_draft_tokens.inc(num_draft_tokens)
        self.num_accepted_tokens.inc(num_accepted)
        self.record_accepted_positions(num_accepted)
