"""One request's life: prefill, then rounds of propose -> verify -> stream -> tell the draft.

Stop conditions are checked token by token: stop token ids and EOS (unless ignore_eos) end the
sequence with "stop" (the token is kept in token_ids, not in text); a completed stop string ends
it with "stop" and is not emitted; reaching max_tokens ends it with "length". Speculation is
skipped for a round when only one token is left, and switched off for good once the sequence
would outgrow the draft's context; the request then continues target-only on the same path.

Faults never lose a token: tokens are streamed only after a verify succeeded, and the history
held here is the truth. A draft that fails or misses --draft-timeout is replaced by another draft
replica (which gets the whole history) or the request goes on target-only. A target that fails
(transport error, deadline, lost sequence) is marked unhealthy; the request is re-prefilled from
its history on another replica and the round is verified again there. Verify is never retried on
the same worker. The client's deadline bounds every downstream call.

The next round's request (its proposal, or with a branch held or no draft its verify) goes out
as soon as a verdict's tokens are in the history, before the round is counted and written to the
client; a round's time runs from the last verdict to its own. With overlap, the draft drafts the
next round during verification, once per likely verdict, and those branches go to the target as
a plan: a verdict that matches one starts the next verify on the target at once (a chained
round), with no network between verdict and verify.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc

from coordinator.adaptive import AUTO_K, AUTONOMOUS_CHUNK, AcceptanceEstimate, CostModel, choose_k
from coordinator.detokenizer import TextStream
from coordinator.metrics import CoordinatorMetrics
from coordinator.pool import Endpoint, WorkerPool
from coordinator.request import GenerationRequest
from coordinator.workers import DraftSession, VerifySession
from splitspec.branches import matching_branch
from splitspec.constraints import GrammarCompiler
from splitspec.errors import DeadlineExceeded, SplitspecError, Unavailable
from splitspec.v1 import common_pb2, coordinator_pb2, draft_pb2, target_pb2

log = logging.getLogger(__name__)
Origin = coordinator_pb2.TokenOrigin
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


def _retrieve(task: asyncio.Task) -> None:
    """Mark the outcome of a call nobody will read as seen, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


def _drop(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        task.add_done_callback(_retrieve)


@dataclass(slots=True)
class _Round:
    proposal: draft_pb2.DraftResponse | None
    verifying: asyncio.Task
    speculation: asyncio.Task | None  # overlap: the next round's branches, drafted meanwhile
    proposed_at: float
    exposed_draft: float              # seconds the round waited for the draft
    chained: bool = False             # the target started it on its own, from the last round's plan


async def _release(endpoint: Endpoint, seq_id: str) -> None:
    try:
        await endpoint.client.release(seq_id)
    except Exception as exc:  # noqa: BLE001 - best effort; the worker may be gone
        log.info("release failed", extra={"seq_id": seq_id, "address": endpoint.address, "error": repr(exc)})


@dataclass(slots=True)
class Generation:
    request: GenerationRequest
    backend: Backend
    deadline: float | None = None  # time.monotonic() by which the client wants its answer
    history: list[int] = field(init=False)
    generated: list[int] = field(default_factory=list)
    text: TextStream = field(init=False)
    finish_reason: str = ""
    spec: coordinator_pb2.SpecStats = field(default_factory=coordinator_pb2.SpecStats)
    seq_id: str = ""
    target: Endpoint | None = None
    draft: Endpoint | None = None
    session: DraftSession | None = None
    verifier: VerifySession | None = None  # the verify stream on the pinned target
    tried_targets: set[str] = field(default_factory=set)
    tried_drafts: set[str] = field(default_factory=set)
    preemptions: int = 0
    failovers: int = 0
    cached_prompt_tokens: int = 0  # the first prefill's prefix-cache hit
    queue_seconds: float = 0.0     # waited for admission

    def __post_init__(self) -> None:
        self.history = list(self.request.prompt_token_ids)
        self.text = TextStream(self.backend.tokenizer, self.history, self.request.stop, self.request.min_tokens)

    async def stream(self) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        request, backend = self.request, self.backend
        self.seq_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        pending: asyncio.Task | None = None  # the next round's proposal, requested ahead of the client write
        upcoming: _Round | None = None       # the next round, already verifying during the client write
        backend.metrics.running.inc()
        backend.running += 1
        try:
            prefilled = await self._prefill()
            backend.metrics.ttft.observe(time.perf_counter() - start)
            if request.max_tokens == 0:  # scoring only: the prompt's logprobs, no output
                self.finish_reason = "length"
                first = self._message([], [], [])
            else:
                self._append([prefilled.token_id])
                first = self._message([prefilled.token_id], [Origin.TOKEN_ORIGIN_TARGET],
                                      [prefilled.logprobs] if prefilled.HasField("logprobs") else [])
            if request.num_prompt_logprobs is not None:
                first.prompt_token_ids.extend(request.prompt_token_ids)
                first.prompt_logprobs.extend(prefilled.prompt_logprobs)
            yield first
            if request.k != 0 and not self.finish_reason:
                self._open_draft()
            round_start, settle_wait = time.perf_counter(), 0.0
            while not self.finish_reason:
                if upcoming is None:
                    proposal = await (pending if pending is not None else self._propose())
                    pending = None
                    drafted = proposal.step_seconds if proposal is not None else 0.0
                    upcoming = self._start_round(proposal, settle_wait + drafted)
                current, upcoming = upcoming, None
                verdict = await current.verifying
                verdict_at = time.perf_counter()
                self._learn(current, verdict)
                token_ids, origins = self._round_tokens(current.proposal, verdict)
                kept = self._append(token_ids)
                settle_wait = 0.0
                if self.finish_reason:
                    _drop(current.speculation)
                elif current.speculation is not None:
                    settling = time.perf_counter()
                    ahead = await self._settle(current.speculation, verdict)
                    settle_wait = time.perf_counter() - settling
                    if ahead is not None:  # the next round is verified while this one's tokens are written
                        upcoming = self._start_round(ahead, settle_wait, chained=verdict.chained)
                if not self.finish_reason and upcoming is None:
                    # chained after a target-only round: the target decodes this sequence by itself
                    # and already runs its next round
                    autonomous = verdict.chained and current.proposal is None
                    k = 0 if autonomous else self._round_k()
                    if k == 0:  # no draft, no room for a proposal, or k = 0 is fastest: a target-only round
                        upcoming = self._start_round(None, 0.0, chained=autonomous)
                    else:  # the next proposal is drafted while this round's tokens are written
                        pending = asyncio.get_running_loop().create_task(self._propose(k))
                if upcoming is not None or pending is not None:
                    await asyncio.sleep(0)  # the next round's request goes out before this round's bookkeeping
                self._record_round(current, verdict, round_start, verdict_at)
                round_start = verdict_at  # the next round's clock runs from this verdict
                yield self._message(token_ids[:kept], origins[:kept], list(verdict.logprobs)[:kept])
            self._record(time.perf_counter() - start)
        finally:
            _drop(pending)
            if upcoming is not None:
                _drop(upcoming.verifying)
                _drop(upcoming.speculation)
            backend.metrics.running.dec()
            backend.running -= 1
            self._close_draft()
            self._close_verifier()
            if self.target is not None:
                self.target.pinned -= 1
                backend.release_later(self.target, self.seq_id)

    def _start_round(self, proposal: draft_pb2.DraftResponse | None, exposed_draft: float,
                     chained: bool = False) -> "_Round":
        """Send `proposal` to verification (`chained`: the target already verifies it) and, with
        overlap, the draft after it to speculation. `exposed_draft`: the seconds of drafting this
        round waited for."""
        verifying = asyncio.get_running_loop().create_task(self._verify(proposal, chained))  # first: critical path
        speculation = self._speculate(proposal, verifying)
        return _Round(proposal, verifying, speculation, time.perf_counter(), exposed_draft, chained)

    def _record(self, elapsed: float) -> None:
        metrics, request = self.backend.metrics, self.request
        metrics.e2e_latency.observe(elapsed)
        if len(self.generated) > 1:
            metrics.time_per_output_token.observe(elapsed / len(self.generated))
        metrics.requests.labels(self.finish_reason).inc()
        metrics.prompt_tokens.inc(len(request.prompt_token_ids))
        metrics.generation_tokens.inc(len(self.generated))
        log.info("request finished", extra={
            "request_id": request.request_id, "finish_reason": self.finish_reason,
            "prompt_tokens": len(request.prompt_token_ids), "completion_tokens": len(self.generated),
            "k": request.k, "rounds": self.spec.rounds, "draft_tokens": self.spec.draft_tokens,
            "accepted_tokens": self.spec.accepted_tokens, "failovers": self.failovers,
            "preemptions": self.preemptions, "seconds": round(elapsed, 4),
        })

    # --- deadlines -----------------------------------------------------------------------------
    def _timeout(self, cap: float) -> float:
        if self.deadline is None:
            return cap
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"the client's deadline passed after {len(self.generated)} tokens")
        return min(cap, remaining)

    # --- target --------------------------------------------------------------------------------
    def _pin_target(self, failure: str = "") -> Endpoint:
        endpoint = self.backend.targets.pick(exclude=self.tried_targets)
        if endpoint is None:
            tried = ", ".join(sorted(self.tried_targets)) or "none"
            raise Unavailable(f"no target worker can serve this request{failure} (tried: {tried})")
        self.tried_targets.add(endpoint.address)
        endpoint.pinned += 1
        self.target = endpoint
        return endpoint

    def _target_failed(self, exc: grpc.aio.AioRpcError) -> str:
        """Forget the pinned target after a failure; returns a phrase for the final error. A call
        cut short by the client's own deadline is not the target's failure: DeadlineExceeded."""
        assert self.target is not None
        self._timeout(self.backend.timeouts.target)  # raises once the client's deadline has passed
        failed = self.target
        self._close_verifier()
        self.backend.targets.mark_failed(failed)
        failed.pinned -= 1
        self.backend.release_later(failed, self.seq_id)
        self.target = None
        self.failovers += 1
        self.backend.metrics.failovers.labels("target").inc()
        log.warning("target failed; failing over", extra={
            "request_id": self.request.request_id, "address": failed.address, "code": exc.code().name})
        return f" after {failed.address} failed ({exc.code().name}: {exc.details()})"

    def _close_verifier(self) -> None:
        if self.verifier is not None:
            self.verifier.close()
            self.verifier = None

    async def _prefill(self) -> target_pb2.PrefillResponse:
        """Prefill the prompt (first token) on a pinned target, moving to another on failure."""
        request, failure = self.request, ""
        while True:
            endpoint = self._pin_target(failure)
            try:
                reply = await endpoint.client.prefill(
                    self.seq_id, request.prompt_token_ids, request.params, request.max_tokens, request.k + 1,
                    timeout=self._timeout(self.backend.timeouts.target),
                    num_prompt_logprobs=request.num_prompt_logprobs)
                self.cached_prompt_tokens = reply.num_cached_tokens
                return reply
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in WORKER_FAILURES:
                    raise
                failure = self._target_failed(exc)

    async def _resume(self, endpoint: Endpoint) -> None:
        """Recompute the sequence's KV on `endpoint` from the history held here."""
        request = self.request
        await endpoint.client.prefill(
            self.seq_id, self.history, request.params, request.max_tokens - len(self.generated), request.k + 1,
            resume=True, timeout=self._timeout(self.backend.timeouts.target))

    async def _verify(self, proposal: draft_pb2.DraftResponse | None, chained: bool = False) -> Any:
        """Verify the proposal (`chained`: the target started it on its own; read its verdict).
        Preempted (the pool ran dry): resume on the same target, verify again. Failed target:
        resume on another replica, verify again there."""
        failure = ""
        while True:
            endpoint = self.target
            try:
                if endpoint is None:
                    endpoint = self._pin_target(failure)
                    await self._resume(endpoint)
                timeout = self._timeout(self.backend.timeouts.target)
                if chained and self.verifier is not None:
                    chained = False  # a retry sends the round itself
                    verdict = await self.verifier.chained(timeout)
                else:
                    if self.verifier is None:
                        self.verifier = endpoint.client.open_verify(self.seq_id)
                    verdict = await self.verifier.verify(proposal, len(self.history), timeout,
                                                         self._autonomous_rounds(proposal))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in WORKER_FAILURES:
                    raise
                failure = self._target_failed(exc)
                continue
            if not verdict.preempted:
                return verdict
            self.preemptions += 1
            log.info("sequence preempted; resuming", extra={"request_id": self.request.request_id})
            try:
                await self._resume(endpoint)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in WORKER_FAILURES:
                    raise
                failure = self._target_failed(exc)

    def _autonomous_rounds(self, proposal: draft_pb2.DraftResponse | None) -> int:
        """Target-only rounds the target may run by itself after this one, so that tokens stream
        with no round trip between them: all the request has left once it has no draft (none
        configured, k = 0, or its context is exhausted); AUTONOMOUS_CHUNK when --k auto found
        k = 0 fastest, after which k is chosen again."""
        if proposal is not None:
            return 0
        left = max(0, self.request.max_tokens - len(self.generated) - 1)
        if self.session is None:
            return left
        return min(left, AUTONOMOUS_CHUNK) if self.request.k == AUTO_K else 0

    # --- draft ---------------------------------------------------------------------------------
    def _open_draft(self) -> None:
        pool = self.backend.drafts
        endpoint = pool.pick(exclude=self.tried_drafts) if pool is not None else None
        if endpoint is None:
            return
        self.tried_drafts.add(endpoint.address)
        endpoint.pinned += 1
        self.draft = endpoint
        self.session = endpoint.client.open(self.seq_id, self.request.params, self.request.draft_confidence)

    def _close_draft(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.draft is not None:
            self.draft.pinned -= 1
            self.draft = None

    def _round_k(self) -> int:
        """Tokens to draft this round; closes the draft stream once its context is exhausted."""
        if self.session is None or self.draft is None:
            return 0
        if self.draft.info.max_model_len + 1 - len(self.history) < 1:
            log.info("draft context exhausted; continuing target-only", extra={"request_id": self.request.request_id})
            self._close_draft()
            return 0
        k = self._auto_k() if self.request.k == AUTO_K else self.request.k
        return max(0, self._fit_k(k, len(self.history), len(self.generated)))

    def _auto_k(self) -> int:
        return choose_k(self.backend.acceptance, self.backend.costs, self._sequences(), self.backend.max_k)

    def _sequences(self) -> int:
        """Requests sharing this request's target: the batch its rounds are verified in."""
        return self.target.pinned if self.target is not None else 1

    def _fit_k(self, k: int, history_len: int, generated: int) -> int:
        """k limited so that the round never outgrows max_tokens (its last token is the target's)
        or the draft's context."""
        assert self.draft is not None
        return min(k, self.request.max_tokens - generated - 1, self.draft.info.max_model_len + 1 - history_len)

    async def _propose(self, k: int | None = None) -> draft_pb2.DraftResponse | None:
        """The next proposal, of `k` tokens (default: `_round_k()`); None for a target-only round."""
        while True:
            k = self._round_k() if k is None else k
            if k == 0 or self.session is None:
                return None
            timeout = self._timeout(self.backend.timeouts.draft)  # may raise: before the coroutine exists
            try:
                async with asyncio.timeout(timeout):  # no wrapper task: the request goes out in this step
                    return await self.session.propose(self.history, k)
            except (grpc.aio.AioRpcError, Unavailable, asyncio.TimeoutError) as exc:
                # Speculation is an optimisation: another draft replica (sent the whole history) or none.
                code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                assert self.draft is not None
                log.warning("draft failed; moving on", extra={
                    "request_id": self.request.request_id, "address": self.draft.address, "code": code})
                if not (isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED):
                    self.backend.drafts.mark_failed(self.draft)
                self.backend.metrics.failovers.labels("draft").inc()
                self._close_draft()
                self._open_draft()
                k = None

    def _learn(self, current: _Round, verdict: Any) -> None:
        """Feed --k auto's acceptance estimate."""
        if current.proposal is not None and current.proposal.token_ids:
            self.backend.acceptance.observe(len(current.proposal.token_ids), verdict.num_accepted)

    def _record_round(self, current: _Round, verdict: Any, start: float, end: float) -> None:
        """Count the round, and where its time (`start` to `end`, verdict to verdict) went: draft,
        verify, and (the rest) coordinator and network. The draft's share is what the round waited
        for it: its step time, or for a proposal drafted during the last verify only the wait for
        it after that verdict."""
        proposal, spec = current.proposal, self.spec
        if self.request.k == AUTO_K and (proposal is None or proposal.token_ids):  # --k auto's round times
            k = len(proposal.token_ids) if proposal is not None else 0
            self.backend.costs.observe(self._sequences(), k, end - start, end)
        if proposal is None or not proposal.token_ids:
            spec.target_rounds += 1
            spec.target_round_seconds += end - start
            spec.empty_proposals += int(proposal is not None)
            return
        k, accepted = len(proposal.token_ids), verdict.num_accepted
        spec.rounds += 1
        spec.draft_tokens += k
        spec.accepted_tokens += accepted
        self.backend.metrics.record_round(k, accepted)
        spec.round_seconds += end - start
        spec.draft_seconds += current.proposed_at - start
        spec.verify_seconds += end - current.proposed_at
        spec.draft_step_seconds += current.exposed_draft
        spec.verify_step_seconds += verdict.step_seconds
        spec.draft_payload_bytes += proposal.ByteSize()
        spec.chained_rounds += int(current.chained)
        while len(spec.proposed_per_position) < k:
            spec.proposed_per_position.append(0)
            spec.accepted_per_position.append(0)
        for position in range(k):
            spec.proposed_per_position[position] += 1
            spec.accepted_per_position[position] += int(position < accepted)

    def _speculate(self, proposal: draft_pb2.DraftResponse | None, verifying: asyncio.Task) -> asyncio.Task | None:
        """Overlap: while the target verifies `proposal`, the draft drafts the round after it for
        each likely verdict (accepted count, and the recovered or bonus token that follows), and
        the target gets them as a plan. Only while this request is alone on its draft: otherwise
        the draft already works on another request's proposal during this verify, and branches
        would only delay it."""
        if not self.backend.overlap or proposal is None or not proposal.token_ids or self.session is None:
            return None
        if self.draft is None or self.draft.pinned > 1:  # other requests keep this draft busy: no idle time to use
            return None
        produced = len(proposal.token_ids) + 1  # the longest verdict: all accepted and the bonus token
        k = self.request.k if self.request.k != AUTO_K else self._auto_k()
        k = self._fit_k(k, len(self.history) + produced, len(self.generated) + produced)
        if k < 1:
            return None
        return asyncio.get_running_loop().create_task(
            self._draft_ahead(self.session, k, proposal, len(self.history), verifying))

    async def _draft_ahead(self, session: DraftSession, k: int, proposal: draft_pb2.DraftResponse,
                           num_tokens: int, verifying: asyncio.Task) -> draft_pb2.DraftResponse:
        """The draft's branches for the round after `proposal` (verified with `num_tokens`), offered
        to the target as that round's plan while its verdict is still to come."""
        ahead = await session.speculate(k, self.backend.overlap_width)
        branches = self._plannable(proposal, ahead) if not verifying.done() and self.verifier is not None else []
        if branches:
            try:
                await self.verifier.offer(num_tokens, branches)
            except grpc.aio.AioRpcError:  # the stream failed: the round in flight reports it
                pass
        return ahead

    def _plannable(self, proposal: draft_pb2.DraftResponse,
                   ahead: draft_pb2.DraftResponse) -> list[tuple[int, int, draft_pb2.DraftResponse]]:
        """The branches after whose verdict the request goes on: the target may chain only those."""
        request = self.request
        room = request.max_tokens - len(self.generated)
        ending = request.stop_token_ids if request.ignore_eos and not request.constrained else \
            request.stop_token_ids | self.backend.eos_token_ids
        return [(branch.num_accepted, branch.token_id, branch.proposal) for branch in ahead.branches
                if branch.proposal.token_ids and branch.num_accepted + 1 < room
                and ending.isdisjoint([*proposal.token_ids[: branch.num_accepted], branch.token_id])]

    async def _settle(self, speculation: asyncio.Task, verdict: Any) -> draft_pb2.DraftResponse | None:
        """Use the branch drafted for the verdict that came true, if there is one; otherwise the draft
        rolls back on the next request. Returns the next round's proposal, or None to draft one."""
        try:
            ahead = speculation.result() if speculation.done() else \
                await asyncio.wait_for(speculation, self._timeout(self.backend.timeouts.draft))
        except (grpc.aio.AioRpcError, Unavailable, asyncio.TimeoutError):
            if self.session is not None and self.draft is not None:
                self.backend.drafts.mark_failed(self.draft)
                self.backend.metrics.failovers.labels("draft").inc()
                self._close_draft()
                self._open_draft()
            return None
        held = matching_branch(ahead.branches, verdict)
        outcome = "missed" if held is None else "chained" if verdict.chained else "held"
        self.backend.metrics.overlap.labels(outcome).inc()
        if verdict.chained and held is None:
            raise SplitspecError(f"the target chained a round after verdict ({verdict.num_accepted}, "
                                 f"{verdict.token_id}), which no branch was drafted for")
        if held is None or (self.session is None and not verdict.chained):
            return None
        if self.session is not None:
            self.session.branch_held(held, len(self.history))
        return ahead.branches[held].proposal

    def _round_tokens(self, proposal: draft_pb2.DraftResponse | None, verdict: Any) -> tuple[list[int], list[int]]:
        if proposal is None or not proposal.token_ids:  # no proposal, or an empty one: the target's token
            return [verdict.token_id], [Origin.TOKEN_ORIGIN_TARGET]
        accepted = verdict.num_accepted
        if self.session is not None:
            self.session.accepted(accepted)
        last = Origin.TOKEN_ORIGIN_BONUS if verdict.is_bonus else Origin.TOKEN_ORIGIN_RECOVERED
        return [*proposal.token_ids[:accepted], verdict.token_id], [Origin.TOKEN_ORIGIN_ACCEPTED] * accepted + [last]

    def _append(self, token_ids: list[int]) -> int:
        """Append tokens to the history until a stop condition; returns how many were kept."""
        for kept, token in enumerate(token_ids, start=1):
            self.history.append(token)
            self.generated.append(token)
            if token in self.request.stop_token_ids or (
                token in self.backend.eos_token_ids and (not self.request.ignore_eos or self.request.constrained)
            ):
                self.finish_reason = "stop"
            elif self.text.add(token):
                self.finish_reason = "stop"
            elif len(self.generated) >= self.request.max_tokens:
                self.finish_reason = "length"
            if self.finish_reason:
                return kept
        return len(token_ids)

    def _message(self, token_ids: list[int], origins: list[int],
                 logprobs: list[common_pb2.TokenLogprobs]) -> coordinator_pb2.GenerateResponse:
        """The stream message for tokens just appended (and their logprobs, when asked for)."""
        response = coordinator_pb2.GenerateResponse(token_ids=token_ids, origins=origins, logprobs=logprobs)
        response.text = self.text.delta(final=bool(self.finish_reason))
        if self.finish_reason:
            response.finish_reason = self.finish_reason
            response.usage.prompt_tokens = len(self.request.prompt_token_ids)
            response.usage.completion_tokens = len(self.generated)
            response.usage.cached_tokens = self.cached_prompt_tokens
            response.queue_seconds = self.queue_seconds
            response.spec.CopyFrom(self.spec)
        return response
