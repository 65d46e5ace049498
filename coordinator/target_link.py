"""A request's pinned target: prefill, resume and verify, with failover. A target that fails
(transport error, deadline, lost sequence) is marked unhealthy; the sequence is re-prefilled from
the history the caller holds on another replica and the round is verified again there. Verify is
never retried on the same worker. A preempted sequence (the pool ran dry) resumes on the same
target."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc

from coordinator.backend import WORKER_FAILURES, Backend
from coordinator.pool import Endpoint
from coordinator.request import GenerationRequest
from coordinator.workers import VerifySession
from splitspec.errors import Unavailable
from splitspec.v1 import draft_pb2, target_pb2

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TargetLink:
    backend: Backend
    request: GenerationRequest
    seq_id: str
    timeout: Callable[[float], float]  # the call's timeout under the client's deadline (raises once it passed)
    endpoint: Endpoint | None = None
    verifier: VerifySession | None = None  # the verify stream on the pinned target
    tried: set[str] = field(default_factory=set)
    failovers: int = 0
    preemptions: int = 0
    cached_prompt_tokens: int = 0  # the first prefill's prefix-cache hit

    @property
    def sequences(self) -> int:
        """Requests sharing this request's target: the batch its rounds are verified in."""
        return self.endpoint.pinned if self.endpoint is not None else 1

    def _pin(self, failure: str = "") -> Endpoint:
        endpoint = self.backend.targets.pin(self.tried)
        if endpoint is None:
            tried = ", ".join(sorted(self.tried)) or "none"
            raise Unavailable(f"no target worker can serve this request{failure} (tried: {tried})")
        self.endpoint = endpoint
        return endpoint

    def _failed(self, exc: grpc.aio.AioRpcError) -> str:
        """Forget the pinned target after a failure; returns a phrase for the final error. A call
        cut short by the client's own deadline is not the target's failure: DeadlineExceeded."""
        assert self.endpoint is not None
        self.timeout(self.backend.timeouts.target)  # raises once the client's deadline has passed
        failed = self.endpoint
        self.close_verifier()
        self.backend.targets.mark_failed(failed)
        failed.pinned -= 1
        self.backend.release_later(failed, self.seq_id)
        self.endpoint = None
        self.failovers += 1
        self.backend.metrics.failovers.labels("target").inc()
        log.warning("target failed; failing over", extra={
            "request_id": self.request.request_id, "address": failed.address, "code": exc.code().name})
        return f" after {failed.address} failed ({exc.code().name}: {exc.details()})"

    def close_verifier(self) -> None:
        if self.verifier is not None:
            self.verifier.close()
            self.verifier = None

    def release(self) -> None:
        """The request is over: close its stream and free its sequence on the target."""
        self.close_verifier()
        if self.endpoint is not None:
            self.endpoint.pinned -= 1
            self.backend.release_later(self.endpoint, self.seq_id)

    async def prefill(self) -> target_pb2.PrefillResponse:
        """Prefill the prompt (first token) on a pinned target, moving to another on failure."""
        request, failure = self.request, ""
        while True:
            endpoint = self._pin(failure)
            try:
                reply = await endpoint.client.prefill(
                    self.seq_id, request.prompt_token_ids, request.params, request.max_tokens, request.k + 1,
                    timeout=self.timeout(self.backend.timeouts.target),
                    num_prompt_logprobs=request.num_prompt_logprobs)
                self.cached_prompt_tokens = reply.num_cached_tokens
                return reply
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in WORKER_FAILURES:
                    raise
                failure = self._failed(exc)

    async def _resume(self, endpoint: Endpoint, history: list[int]) -> None:
        """Recompute the sequence's KV on `endpoint` from `history`."""
        request = self.request
        generated = len(history) - len(request.prompt_token_ids)
        await endpoint.client.prefill(
            self.seq_id, history, request.params, request.max_tokens - generated, request.k + 1,
            resume=True, timeout=self.timeout(self.backend.timeouts.target))

    async def verify(self, proposal: draft_pb2.DraftResponse | None, history: list[int], chained: bool = False,
                     autonomous_rounds: int = 0) -> Any:
        """Verify the proposal after `history` (`chained`: the target started it on its own; read
        its verdict). Preempted: resume on the same target, verify again. Failed target: resume
        on another replica, verify again there."""
        failure = ""
        while True:
            endpoint = self.endpoint
            try:
                if endpoint is None:
                    endpoint = self._pin(failure)
                    await self._resume(endpoint, history)
                timeout = self.timeout(self.backend.timeouts.target)
                if chained and self.verifier is not None:
                    chained = False  # a retry sends the round itself
                    verdict = await self.verifier.chained(timeout)
                else:
                    if self.verifier is None:
                        self.verifier = endpoint.client.open_verify(self.seq_id)
                    verdict = await self.verifier.verify(proposal, len(history), timeout, autonomous_rounds)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in WORKER_FAILURES:
                    raise
                failure = self._failed(exc)
                continue
            if not verdict.preempted:
                return verdict
            self.preemptions += 1
            log.info("sequence preempted; resuming", extra={"request_id": self.request.request_id})
            try:
                await self._resume(endpoint, history)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in WORKER_FAILURES:
                    raise
                failure = self._failed(exc)
