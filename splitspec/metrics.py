"""Request and speculation metrics shared by the coordinator and the gateway, with vLLM's names
under a `splitspec:` prefix. Each service extends this with its own and keeps its own registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(slots=True)
class ServingMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    requests: Counter = field(init=False)
    running: Gauge = field(init=False)
    ttft: Histogram = field(init=False)
    time_per_output_token: Histogram = field(init=False)
    e2e_latency: Histogram = field(init=False)
    num_drafts: Counter = field(init=False)
    num_draft_tokens: Counter = field(init=False)
    num_accepted_tokens: Counter = field(init=False)
    num_accepted_tokens_per_pos: Counter = field(init=False)
    inter_token_latency: Histogram = field(init=False)
    queue_time: Histogram = field(init=False)
    prompt_tokens: Counter = field(init=False)
    generation_tokens: Counter = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("splitspec:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.running = Gauge("splitspec:num_requests_running", "Requests in flight", registry=r)
        self.ttft = Histogram("splitspec:time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.time_per_output_token = Histogram("splitspec:time_per_output_token_seconds",
                                               "Time per output token after the first", registry=r,
                                               buckets=LATENCY_BUCKETS)
        self.e2e_latency = Histogram("splitspec:e2e_request_latency_seconds", "End-to-end request latency",
                                     registry=r, buckets=LATENCY_BUCKETS)
        self.num_drafts = Counter("splitspec:spec_decode_num_drafts", "Proposals verified", registry=r)
        self.num_draft_tokens = Counter("splitspec:spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.num_accepted_tokens = Counter("splitspec:spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                           registry=r)
        self.num_accepted_tokens_per_pos = Counter("splitspec:spec_decode_num_accepted_tokens_per_pos",
                                                   "Accepted draft tokens by position", ["position"], registry=r)

        self.inter_token_latency = Histogram(
            "splitspec:inter_token_latency_seconds",
            "Time between a request's successive outputs (one observation per output, which holds several "
            "tokens when speculation accepts them)", registry=r, buckets=LATENCY_BUCKETS)
        self.queue_time = Histogram("splitspec:request_queue_time_seconds",
                                    "Time a request waited for admission at the coordinator", registry=r,
                                    buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter("splitspec:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("splitspec:generation_tokens", "Tokens generated", registry=r)

    def record_accepted_positions(self, num_accepted: int) -> None:
        for position in range(num_accepted):
            self.num_accepted_tokens_per_pos.labels(str(position)).inc()
