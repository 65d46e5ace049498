"""The gateway's Prometheus metrics (own registry), with vLLM's speculative-decoding names.

Request, latency and speculation figures are counted from the responses the gateway relays;
KV-block and queue gauges are refreshed from the coordinator's GetStats at scrape time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from splitspec.v1 import coordinator_pb2

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(slots=True)
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    requests: Counter = field(init=False)
    http_errors: Counter = field(init=False)
    ttft: Histogram = field(init=False)
    time_per_output_token: Histogram = field(init=False)
    e2e_latency: Histogram = field(init=False)
    running: Gauge = field(init=False)
    waiting: Gauge = field(init=False)
    kv_blocks_used: Gauge = field(init=False)
    kv_blocks_total: Gauge = field(init=False)
    kv_usage: Gauge = field(init=False)
    num_drafts: Counter = field(init=False)
    num_draft_tokens: Counter = field(init=False)
    num_accepted_tokens: Counter = field(init=False)
    num_accepted_tokens_per_pos: Counter = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("splitspec:request_success", "Finished sequences", ["finished_reason"], registry=r)
        self.http_errors = Counter("splitspec:http_errors", "Error responses", ["status"], registry=r)
        self.ttft = Histogram("splitspec:time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_BUCKETS)
        self.time_per_output_token = Histogram("splitspec:time_per_output_token_seconds",
                                               "Time per output token after the first", registry=r, buckets=_BUCKETS)
        self.e2e_latency = Histogram("splitspec:e2e_request_latency_seconds", "End-to-end latency", registry=r,
                                     buckets=_BUCKETS)
        self.running = Gauge("splitspec:num_requests_running", "Sequences in flight through the gateway", registry=r)
        self.waiting = Gauge("splitspec:num_requests_waiting", "Target work queued for admission", registry=r)
        self.kv_blocks_used = Gauge("splitspec:kv_blocks_used", "KV blocks in use", ["worker"], registry=r)
        self.kv_blocks_total = Gauge("splitspec:kv_blocks_total", "KV blocks in the pool", ["worker"], registry=r)
        self.kv_usage = Gauge("splitspec:kv_cache_usage_perc", "Fraction of KV blocks in use", ["worker"], registry=r)
        self.num_drafts = Counter("splitspec:spec_decode_num_drafts", "Proposals verified", registry=r)
        self.num_draft_tokens = Counter("splitspec:spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.num_accepted_tokens = Counter("splitspec:spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                           registry=r)
        self.num_accepted_tokens_per_pos = Counter("splitspec:spec_decode_num_accepted_tokens_per_pos",
                                                   "Accepted draft tokens by position", ["position"], registry=r)

    def record_finished(self, stream: Any, response: coordinator_pb2.GenerateResponse) -> None:
        """Called once per finished choice with its last message."""
        elapsed = time.perf_counter() - stream.started
        tokens = response.usage.completion_tokens
        self.requests.labels(response.finish_reason).inc()
        self.e2e_latency.observe(elapsed)
        if tokens > 1 and stream.first_token_at is not None:
            self.time_per_output_token.observe((time.perf_counter() - stream.first_token_at) / (tokens - 1))
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
                for position in range(run):
                    self.num_accepted_tokens_per_pos.labels(str(position)).inc()
                run = 0
        return run

    def update_from(self, stats: coordinator_pb2.CoordinatorStats) -> None:
        self.waiting.set(stats.target.waiting_requests)
        workers = [("target", stats.target)] + ([("draft", stats.draft)] if stats.HasField("draft") else [])
        for name, worker in workers:
            self.kv_blocks_used.labels(name).set(worker.blocks_used)
            self.kv_blocks_total.labels(name).set(worker.blocks_total)
            self.kv_usage.labels(name).set(worker.utilization)
