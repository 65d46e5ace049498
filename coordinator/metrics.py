"""Prometheus metrics of the coordinator: the shared serving metrics, worker failovers, overlap
outcomes, and what --k auto has measured and chosen per batch bucket."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.adaptive import CostModel
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


@dataclass(slots=True, eq=False)  # hashable: the registry keys collectors by identity
class AutoKCollector(Collector):
    """--k auto's state, read at scrape time: each bucket's choice and measured round seconds."""

    costs: CostModel

    def collect(self) -> Iterator[GaugeMetricFamily]:
        chosen = GaugeMetricFamily("splitspec:auto_k", "The draft length --k auto runs now, per batch bucket",
                                   labels=["bucket"])
        seconds = GaugeMetricFamily("splitspec:auto_round_seconds",
                                    "Round seconds (verdict to verdict) --k auto measured, per batch bucket and k",
                                    labels=["bucket", "k"])
        for bucket, times in sorted(self.costs.buckets.items()):
            if times.choice is not None:
                chosen.add_metric([str(bucket)], times.choice)
            for k, value in sorted(times.seconds.items()):
                seconds.add_metric([str(bucket), str(k)], value)
        yield chosen
        yield seconds
