"""Prometheus metrics of one target worker (own registry: no process-global state)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from splitspec.paged.stats import EngineStats


@dataclass(slots=True)
class TargetMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    prefills: Counter = field(init=False)
    verifies: Counter = field(init=False)
    draft_tokens: Counter = field(init=False)
    accepted_tokens: Counter = field(init=False)
    chained_rounds: Counter = field(init=False)
    step_seconds: Histogram = field(init=False)
    running_sequences: Gauge = field(init=False)
    kv_blocks_used: Gauge = field(init=False)
    kv_blocks_total: Gauge = field(init=False)
    preemptions: Gauge = field(init=False)
    prefix_cache_hit_rate: Gauge = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.prefills = Counter("splitspec:target_prefills", "Prefill calls", registry=r)
        self.verifies = Counter("splitspec:target_verifies", "Verify calls", registry=r)
        self.draft_tokens = Counter("splitspec:target_draft_tokens", "Draft tokens verified", registry=r)
        self.accepted_tokens = Counter("splitspec:target_accepted_tokens", "Draft tokens accepted", registry=r)
        self.chained_rounds = Counter("splitspec:target_chained_rounds",
                                      "Rounds started before the last verdict went out, by what started them",
                                      ["how"], registry=r)
        self.step_seconds = Histogram(
            "splitspec:target_step_seconds", "Model step latency", ["kind"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.running_sequences = Gauge("splitspec:target_running_sequences", "Sequences holding KV", registry=r)
        self.kv_blocks_used = Gauge("splitspec:kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_blocks_total = Gauge("splitspec:kv_blocks_total", "KV blocks in the pool", registry=r)
        self.preemptions = Gauge("splitspec:num_preemptions", "Sequences preempted so far", registry=r)
        self.prefix_cache_hit_rate = Gauge("splitspec:prefix_cache_hit_rate", "Full prompt blocks reused",
                                           registry=r)


@dataclass(slots=True, eq=False)  # hashable: the registry keys collectors by identity
class GrammarMaskCollector(Collector):
    """Structured outputs' grammar masks, read at scrape time from the engine's stats."""

    stats: EngineStats

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("splitspec:grammar_mask_seconds", "Seconds computing grammar masks (beside the forward)",
                                  value=self.stats.mask_seconds)
        yield CounterMetricFamily("splitspec:grammar_mask_wait_seconds",
                                  "Of which steps waited for after their forward", value=self.stats.mask_wait_seconds)
        yield CounterMetricFamily("splitspec:grammar_masked_rows", "Scored positions a grammar masked",
                                  value=self.stats.masked_rows)
