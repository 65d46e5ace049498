"""The gateway's Prometheus metrics (own registry), with vLLM's speculative-decoding names.

Request, latency and speculation figures are counted from the responses the gateway relays;
KV-block and queue gauges are refreshed from the coordinator's GetStats at scrape time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from splitspec.metrics import ServingMetrics

from splitspec.v1 import coordinator_pb2


@dataclass(slots=True)
class GatewayMetrics(ServingMetrics):
    http_errors: Counter = field(init=False)
    waiting: Gauge = field(init=False)
    kv_blocks_used: Gauge = field(init=False)
    kv_blocks_total: Gauge = field(init=False)
    kv_usage: Gauge = field(init=False)

    def __post_init__(self) -> None:
        ServingMetrics.__post_init__(self)
        r = self.registry
        self.http_errors = Counter("splitspec:http_errors", "Error responses", ["status"], registry=r)
        self.waiting = Gauge("splitspec:num_requests_waiting", "Target work queued for admission", registry=r)
        self.kv_blocks_used = Gauge("splitspec:kv_blocks_used", "KV blocks in use", ["worker"], registry=r)
        self.kv_blocks_total = Gauge("splitspec:kv_blocks_total", "KV blocks in the pool", ["worker"], registry=r)
        self.kv_usage = Gauge("splitspec:kv_cache_usage_perc", "Fraction of KV blocks in use", ["worker"], registry=r)

    def record_finished(self, stream: Any, response: coordinator_pb2.GenerateResponse) -> None:
        """Called once per finished choice with its last message."""
        elapsed = time.perf_counter() - stream.started
        tokens = response.usage.completion_tokens
        self.requests.labels(response.finish_reason).inc()
        self.e2e_latency.observe(elapsed)
        if tokens > 1 and stream.first_token_at is not None:
            self.time_per_output_token.observe((time.perf_counter() - stream.first_token_at) / (tokens - 1))
        self.queue_time.observe(response.queue_seconds)
        self.prompt_tokens.inc(response.usage.prompt_tokens)
        self.num_drafts.inc(response.spec.rounds)
        self.num_draft_tokens.inc(response.spec.draft_tokens)
        self.num_accepted_tokens.inc(response.spec.accepted_tokens)

    def record_origins(self, origins: list[str], run: int) -> int:
        """Per-position acceptance from the origin sequence: a run of accepted tokens ends at the
        round's recovered or bonus token. Returns the open run length to carry to the next delta."""
        for origin in origins:
            if origin == "accepted":
                run += 1
            elif origin in ("recovered", "bonus"):
                self.record_accepted_positions(run)
                run = 0
        return run

    def update_from(self, stats: coordinator_pb2.CoordinatorStats) -> None:
        self.waiting.set(stats.target.waiting_requests)
        workers = [("target", stats.target)] + ([("draft", stats.draft)] if stats.HasField("draft") else [])
        for name, worker in workers:
            self.kv_blocks_used.labels(name).set(worker.blocks_used)
            self.kv_blocks_total.labels(name).set(worker.blocks_total)
            self.kv_usage.labels(name).set(worker.utilization)
