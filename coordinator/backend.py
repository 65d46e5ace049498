"""What every request shares: the worker pools, their limits and timeouts, the tokenizer, the
metrics, --k auto's measurements, and the releases still in flight."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc

from coordinator.adaptive import AcceptanceEstimate, CostModel
from coordinator.metrics import CoordinatorMetrics
from coordinator.pool import Endpoint, WorkerPool
from splitspec.constraints import GrammarCompiler

log = logging.getLogger(__name__)
# Statuses that mean "this worker cannot carry the request on", not "the request is wrong".
WORKER_FAILURES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
})


@dataclass(slots=True, frozen=True)
class Timeouts:
    target: float = 30.0   # longest a prefill or verify may take before the worker counts as failed
    draft: float = 5.0     # --draft-timeout: longest a proposal may take before speculation moves on


@dataclass(slots=True)
class Backend:
    """What every request needs: the worker pools, their limits, and the tokenizer."""

    targets: WorkerPool
    drafts: WorkerPool | None
    eos_token_ids: frozenset[int]
    tokenizer: Any
    metrics: CoordinatorMetrics
    timeouts: Timeouts = field(default_factory=Timeouts)
    costs: CostModel = field(default_factory=CostModel)   # --k auto: measured round times ...
    acceptance: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)  # ... and acceptance, pooled
    max_k: int = 16
    overlap: bool = False  # draft round n+1 while round n is verified
    overlap_width: int = 3  # candidate tokens per accept length that overlap drafts for
    grammars: GrammarCompiler | None = None  # checks a request's constraint before any worker sees it
    releases: set[asyncio.Task] = field(default_factory=set)  # in-flight Release calls
    running: int = 0                                          # requests in flight

    async def drain(self) -> None:
        if self.releases:
            await asyncio.gather(*self.releases, return_exceptions=True)

    def release_later(self, endpoint: Endpoint, seq_id: str) -> None:
        task = asyncio.get_running_loop().create_task(_release(endpoint, seq_id))
        self.releases.add(task)
        task.add_done_callback(self.releases.discard)


async def _release(endpoint: Endpoint, seq_id: str) -> None:
    try:
        await endpoint.client.release(seq_id)
    except Exception as exc:  # noqa: BLE001 - best effort; the worker may be gone
        log.info("release failed", extra={"seq_id": seq_id, "address": endpoint.address, "error": repr(exc)})
