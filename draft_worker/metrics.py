"""Prometheus metrics of one draft worker (own registry)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(slots=True)
class DraftMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    proposals: Counter = field(init=False)
    draft_tokens: Counter = field(init=False)
    propose_seconds: Histogram = field(init=False)
    open_streams: Gauge = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.proposals = Counter("splitspec:draft_proposals", "Proposals made", registry=r)
        self.draft_tokens = Counter("splitspec:draft_tokens", "Tokens proposed", registry=r)
        self.propose_seconds = Histogram(
            "splitspec:draft_propose_seconds", "Time to draft one proposal", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.open_streams = Gauge("splitspec:draft_open_sequences", "Sequences with an open stream", registry=r)
