"""One request's life: prefill, then rounds of propose -> verify -> stream -> tell the draft.

Stop conditions are checked token by token: stop token ids and EOS (unless ignore_eos) end the
sequence with "stop" (the token is kept in token_ids, not in text); a completed stop string ends
it with "stop" and is not emitted; reaching max_tokens ends it with "length". Speculation is
skipped for a round when only one token is left, and switched off for good once the sequence
would outgrow the draft's context; the request then continues target-only on the same path.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc

from coordinator.detokenizer import TextStream
from coordinator.metrics import CoordinatorMetrics
from coordinator.request import GenerationRequest
from coordinator.workers import DraftClient, DraftSession, TargetClient
from splitspec.errors import Unavailable
from splitspec.v1 import coordinator_pb2, draft_pb2

log = logging.getLogger(__name__)
Origin = coordinator_pb2.TokenOrigin


@dataclass(slots=True)
class Backend:
    """What every request needs: the workers, their limits, and the tokenizer."""

    target: TargetClient
    draft: DraftClient | None
    draft_max_len: int
    eos_token_ids: frozenset[int]
    tokenizer: Any
    metrics: CoordinatorMetrics
    releases: set[asyncio.Task] = field(default_factory=set)  # in-flight Release calls
    running: int = 0                                          # requests in flight

    async def drain(self) -> None:
        if self.releases:
            await asyncio.gather(*self.releases, return_exceptions=True)


@dataclass(slots=True)
class Generation:
    request: GenerationRequest
    backend: Backend
    history: list[int] = field(init=False)
    generated: list[int] = field(default_factory=list)
    text: TextStream = field(init=False)
    finish_reason: str = ""
    spec: coordinator_pb2.SpecStats = field(default_factory=coordinator_pb2.SpecStats)
    session: DraftSession | None = None
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.history = list(self.request.prompt_token_ids)
        self.text = TextStream(self.backend.tokenizer, self.history, self.request.stop)

    async def stream(self) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        request, backend = self.request, self.backend
        seq_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        backend.metrics.running.inc()
        backend.running += 1
        try:
            first = await backend.target.prefill(seq_id, request.prompt_token_ids, request.params,
                                                 request.max_tokens, request.k + 1)
            backend.metrics.ttft.observe(time.perf_counter() - start)
            yield self._emit([first.token_id], [Origin.TOKEN_ORIGIN_TARGET])
            if request.k > 0 and backend.draft is not None:
                self.session = backend.draft.open(seq_id, request.params)
            while not self.finish_reason:
                proposal = await self._propose()
                verdict = await self._verify(seq_id, proposal)
                yield self._emit(*self._round_tokens(proposal, verdict))
            elapsed = time.perf_counter() - start
            backend.metrics.e2e_latency.observe(elapsed)
            if len(self.generated) > 1:
                backend.metrics.time_per_output_token.observe(elapsed / len(self.generated))
            backend.metrics.requests.labels(self.finish_reason).inc()
            log.info("request finished", extra={
                "request_id": request.request_id, "finish_reason": self.finish_reason,
                "prompt_tokens": len(request.prompt_token_ids), "completion_tokens": len(self.generated),
                "k": request.k, "rounds": self.spec.rounds, "draft_tokens": self.spec.draft_tokens,
                "accepted_tokens": self.spec.accepted_tokens, "seconds": round(elapsed, 4),
            })
        finally:
            backend.metrics.running.dec()
            backend.running -= 1
            if self.session is not None:
                self.session.close()
            task = asyncio.get_running_loop().create_task(self._release(seq_id))
            backend.releases.add(task)
            task.add_done_callback(backend.releases.discard)

    async def _release(self, seq_id: str) -> None:
        try:
            await self.backend.target.release(seq_id)
        except Exception as exc:  # noqa: BLE001 - best effort; the worker may be gone
            log.warning("release failed", extra={"seq_id": seq_id, "error": repr(exc)})

    async def _verify(self, seq_id: str, proposal: draft_pb2.DraftResponse | None) -> Any:
        """Verify the proposal; when the target preempted the sequence to free memory, recompute
        its KV from the history held here (the target queues that until blocks are free) and retry."""
        target, request = self.backend.target, self.request
        while True:
            verdict = await target.verify(
                seq_id,
                list(proposal.token_ids) if proposal else [],
                proposal.probs if proposal and proposal.HasField("probs") else None,
                len(self.history),
            )
            if not verdict.preempted:
                return verdict
            self.preemptions += 1
            log.info("sequence preempted; resuming", extra={"request_id": request.request_id})
            await target.prefill(seq_id, self.history, request.params,
                                 request.max_tokens - len(self.generated), request.k + 1, resume=True)

    def _round_k(self) -> int:
        """Tokens to draft this round; closes the draft stream once its context is exhausted."""
        if self.session is None:
            return 0
        draft_room = self.backend.draft_max_len + 1 - len(self.history)
        if draft_room < 1:
            log.info("draft context exhausted; continuing target-only", extra={"request_id": self.request.request_id})
            self.session.close()
            self.session = None
            return 0
        remaining = self.request.max_tokens - len(self.generated)
        return max(0, min(self.request.k, remaining - 1, draft_room))

    async def _propose(self) -> draft_pb2.DraftResponse | None:
        k = self._round_k()
        if k == 0 or self.session is None:
            return None
        try:
            return await self.session.propose(self.history, k)
        except (grpc.aio.AioRpcError, Unavailable) as exc:
            # Speculation is an optimisation: without the draft the request continues target-only.
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "UNAVAILABLE"
            log.warning("draft failed; continuing target-only",
                        extra={"request_id": self.request.request_id, "code": code})
            self.session.close()
            self.session = None
            return None

    def _round_tokens(self, proposal: draft_pb2.DraftResponse | None, verdict: Any) -> tuple[list[int], list[int]]:
        if proposal is None:
            return [verdict.token_id], [Origin.TOKEN_ORIGIN_TARGET]
        accepted = verdict.num_accepted
        assert self.session is not None
        self.session.accepted(accepted)
        self.spec.rounds += 1
        self.spec.draft_tokens += len(proposal.token_ids)
        self.spec.accepted_tokens += accepted
        self.backend.metrics.record_round(len(proposal.token_ids), accepted)
        last = Origin.TOKEN_ORIGIN_BONUS if verdict.is_bonus else Origin.TOKEN_ORIGIN_RECOVERED
        return [*proposal.token_ids[:accepted], verdict.token_id], [Origin.TOKEN_ORIGIN_ACCEPTED] * accepted + [last]

    def _emit(self, token_ids: list[int], origins: list[int]) -> coordinator_pb2.GenerateResponse:
        """Append tokens until a stop condition; returns the stream message for them."""
        response = coordinator_pb2.GenerateResponse()
        for token, origin in zip(token_ids, origins):
            self.history.append(token)
            self.generated.append(token)
            response.token_ids.append(token)
            response.origins.append(origin)
            if token in self.request.stop_token_ids or (
                token in self.backend.eos_token_ids and not self.request.ignore_eos
            ):
                self.finish_reason = "stop"
            elif self.text.add(token):
                self.finish_reason = "stop"
            elif len(self.generated) >= self.request.max_tokens:
                self.finish_reason = "length"
            if self.finish_reason:
                break
        response.text = self.text.delta(final=bool(self.finish_reason))
        if self.finish_reason:
            response.finish_reason = self.finish_reason
            response.usage.prompt_tokens = len(self.request.prompt_token_ids)
            response.usage.completion_tokens = len(self.generated)
            response.spec.CopyFrom(self.spec)
        return response
