"""One request's life: prefill, then rounds of propose -> verify -> stream -> tell the draft.

Stop conditions are checked token by token: stop token ids and EOS (unless ignore_eos) end the
sequence with "stop" (the token is kept in token_ids, not in text); a completed stop string ends
it with "stop" and is not emitted; reaching max_tokens ends it with "length". Speculation is
skipped for a round when only one token is left, and switched off for good once the sequence
would outgrow the draft's context; the request then continues target-only on the same path.

Faults never lose a token: tokens are streamed only after a verify succeeded, and the history
held here is the truth. Failover lives with each link: `TargetLink` (re-prefill from the history
on another replica) and `DraftLink` (another draft replica, or none). The client's deadline
bounds every downstream call. `--k auto` chooses each round's k (`coordinator.adaptive`), and
`coordinator.rounds` counts the finished rounds.

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

from coordinator.adaptive import AUTO_K, AUTONOMOUS_CHUNK, EXTEND_AHEAD, choose_k
from coordinator.backend import Backend
from coordinator.detokenizer import TextStream
from coordinator.draft_link import DraftLink
from coordinator.request import GenerationRequest
from coordinator.rounds import Round, count_round
from coordinator.target_link import TargetLink
from coordinator.workers import DraftSession
from splitspec.branches import matching_branch
from splitspec.errors import DeadlineExceeded, SplitspecError, Unavailable
from splitspec.v1 import common_pb2, coordinator_pb2, draft_pb2

log = logging.getLogger(__name__)
Origin = coordinator_pb2.TokenOrigin
# Branches per drafting pass, over all requests on a draft, up to which overlap drafts them: at
# concurrency 4, k = 2 and width 3 (36) overlap gave 1.20x tok/s; at 32 requests with fixed k = 2
# (288) the draft fell behind and tokens/s halved.
OVERLAP_MAX_BRANCHES = 48


def _retrieve(task: asyncio.Task) -> None:
    """Mark the outcome of a call nobody will read as seen, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


def _drop(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        task.add_done_callback(_retrieve)


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
    seq_id: str = field(init=False)
    queue_seconds: float = 0.0     # waited for admission
    autonomy: int = 0              # target-only rounds the target may run by itself after the round in flight
    targeting: TargetLink = field(init=False)
    drafting: DraftLink = field(init=False)

    def __post_init__(self) -> None:
        self.history = list(self.request.prompt_token_ids)
        self.text = TextStream(self.backend.tokenizer, self.history, self.request.stop, self.request.min_tokens)
        self.seq_id = f"{self.request.request_id}-{uuid.uuid4().hex[:8]}"
        self.targeting = TargetLink(self.backend, self.request, self.seq_id, self._timeout)
        self.drafting = DraftLink(self.backend, self.request, self.seq_id, self._timeout)

    async def stream(self) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        request, backend = self.request, self.backend
        start = time.perf_counter()
        pending: asyncio.Task | None = None  # the next round's proposal, requested ahead of the client write
        upcoming: Round | None = None       # the next round, already verifying during the client write
        backend.metrics.running.inc()
        backend.running += 1
        try:
            prefilled = await self.targeting.prefill()
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
                self.drafting.open()
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
                        if autonomous:
                            await self._extend_autonomy()
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
            self.drafting.close()
            self.targeting.release()

    def _start_round(self, proposal: draft_pb2.DraftResponse | None, exposed_draft: float,
                     chained: bool = False) -> Round:
        """Send `proposal` to verification (`chained`: the target already verifies it) and, with
        overlap, the draft after it to speculation. `exposed_draft`: the seconds of drafting this
        round waited for."""
        budget = self._autonomous_rounds(proposal)
        self.autonomy = self.autonomy - 1 if chained and proposal is None else budget
        verifying = asyncio.get_running_loop().create_task(  # first: the critical path
            self.targeting.verify(proposal, self.history, chained, budget))
        speculation = self._speculate(proposal, verifying)
        return Round(proposal, verifying, speculation, time.perf_counter(), exposed_draft, chained)

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
            "accepted_tokens": self.spec.accepted_tokens, "failovers": self.targeting.failovers,
            "preemptions": self.targeting.preemptions, "seconds": round(elapsed, 4),
        })

    # --- deadlines -----------------------------------------------------------------------------
    def _timeout(self, cap: float) -> float:
        if self.deadline is None:
            return cap
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"the client's deadline passed after {len(self.generated)} tokens")
        return min(cap, remaining)

    # --- target ----------------------------------------------------------------------------------
    def _autonomous_rounds(self, proposal: draft_pb2.DraftResponse | None) -> int:
        """Target-only rounds the target may run by itself after this one, so that tokens stream
        with no round trip between them: all the request has left once it has no draft (none
        configured, k = 0, or its context is exhausted); AUTONOMOUS_CHUNK when --k auto found
        k = 0 fastest, after which k is chosen again."""
        if proposal is not None:
            return 0
        left = max(0, self.request.max_tokens - len(self.generated) - 1)
        if self.drafting.session is None:
            return left
        return min(left, AUTONOMOUS_CHUNK) if self.request.k == AUTO_K else 0

    async def _extend_autonomy(self) -> None:
        """With --k auto, EXTEND_AHEAD rounds before the target's budget for this sequence runs out
        and while k = 0 is still chosen: another AUTONOMOUS_CHUNK rounds, as a plan for the round in
        flight (EXTEND_AHEAD steps for it to arrive in time; a late plan is ignored). The
        sequence goes on decoding with no round trip between chunks, so no step runs without it
        (without this, each chunk's end cost a step: 0.9x target only at concurrency 4-32)."""
        verifier = self.targeting.verifier
        if (self.autonomy > EXTEND_AHEAD or self.request.k != AUTO_K or self.drafting.session is None
                or verifier is None):
            return
        rounds = min(AUTONOMOUS_CHUNK, self.request.max_tokens - len(self.generated) - 1)
        if rounds <= self.autonomy or self._round_k() != 0:
            return
        try:
            await verifier.extend(len(self.history), rounds)
        except grpc.aio.AioRpcError:
            return  # the stream failed: the round in flight reports it
        self.autonomy = rounds

    # --- draft ---------------------------------------------------------------------------------
    def _round_k(self) -> int:
        """Tokens to draft this round; closes the draft stream once its context is exhausted."""
        if self.drafting.session is None:
            return 0
        if self.drafting.max_model_len + 1 - len(self.history) < 1:
            log.info("draft context exhausted; continuing target-only", extra={"request_id": self.request.request_id})
            self.drafting.close()
            return 0
        k = self._auto_k() if self.request.k == AUTO_K else self.request.k
        return max(0, self._fit_k(k, len(self.history), len(self.generated)))

    def _auto_k(self) -> int:
        return choose_k(self.backend.acceptance, self.backend.costs, self.targeting.sequences, self.backend.max_k)

    def _fit_k(self, k: int, history_len: int, generated: int) -> int:
        """k limited so that the round never outgrows max_tokens (its last token is the target's)
        or the draft's context."""
        return min(k, self.request.max_tokens - generated - 1, self.drafting.max_model_len + 1 - history_len)

    async def _propose(self, k: int | None = None) -> draft_pb2.DraftResponse | None:
        """The next proposal, of `k` tokens (default: `_round_k()`); None for a target-only round."""
        while True:
            k = self._round_k() if k is None else k
            if k == 0 or self.drafting.session is None:
                return None
            proposal = await self.drafting.propose(self.history, k)
            if proposal is not None:
                return proposal
            k = None  # the draft failed and was replaced (or dropped): choose again

    def _learn(self, current: Round, verdict: Any) -> None:
        """Feed --k auto's acceptance estimate."""
        if current.proposal is not None and current.proposal.token_ids:
            self.backend.acceptance.observe(len(current.proposal.token_ids), verdict.num_accepted)

    def _record_round(self, current: Round, verdict: Any, start: float, end: float) -> None:
        """Count the round; with --k auto, its time (verdict to verdict) feeds the cost model."""
        proposal = current.proposal
        if self.request.k == AUTO_K and (proposal is None or proposal.token_ids):
            self.backend.costs.observe(self.targeting.sequences, current.draft_length, end - start, end)
        count_round(self.spec, self.backend.metrics, current, verdict, start, end)

    def _speculate(self, proposal: draft_pb2.DraftResponse | None, verifying: asyncio.Task) -> asyncio.Task | None:
        """Overlap: while the target verifies `proposal`, the draft drafts the round after it for
        each likely verdict (accepted count, and the recovered or bonus token that follows), and
        the target gets them as a plan. At any concurrency (the target's step loop holds its
        batches whole, so the sequences on a draft are verified together and the draft is idle
        meanwhile), as long as the branches of all of them fit OVERLAP_MAX_BRANCHES per drafting
        pass: beyond, drafting them outlasts the verify."""
        drafting = self.drafting
        if not self.backend.overlap or proposal is None or not proposal.token_ids or drafting.session is None:
            return None
        if drafting.endpoint is None:
            return None
        produced = len(proposal.token_ids) + 1  # the longest verdict: all accepted and the bonus token
        k = self.request.k if self.request.k != AUTO_K else self._auto_k()
        k = self._fit_k(k, len(self.history) + produced, len(self.generated) + produced)
        if k < 1 or drafting.endpoint.pinned * (k + 1) * self.backend.overlap_width > OVERLAP_MAX_BRANCHES:
            return None
        return asyncio.get_running_loop().create_task(
            self._draft_ahead(drafting.session, k, proposal, len(self.history), verifying))

    async def _draft_ahead(self, session: DraftSession, k: int, proposal: draft_pb2.DraftResponse,
                           num_tokens: int, verifying: asyncio.Task) -> draft_pb2.DraftResponse:
        """The draft's branches for the round after `proposal` (verified with `num_tokens`), offered
        to the target as that round's plan while its verdict is still to come."""
        ahead = await session.speculate(k, self.backend.overlap_width)
        verifier = self.targeting.verifier
        branches = self._plannable(proposal, ahead) if not verifying.done() and verifier is not None else []
        if branches:
            try:
                await verifier.offer(num_tokens, branches)
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
            if self.drafting.session is not None:
                self.drafting.replace()
            return None
        held = matching_branch(ahead.branches, verdict)
        outcome = "missed" if held is None else "chained" if verdict.chained else "held"
        self.backend.metrics.overlap.labels(outcome).inc()
        if verdict.chained and held is None:
            raise SplitspecError(f"the target chained a round after verdict ({verdict.num_accepted}, "
                                 f"{verdict.token_id}), which no branch was drafted for")
        session = self.drafting.session
        if held is None or (session is None and not verdict.chained):
            return None
        if session is not None:
            session.branch_held(held, len(self.history))
        return ahead.branches[held].proposal

    def _round_tokens(self, proposal: draft_pb2.DraftResponse | None, verdict: Any) -> tuple[list[int], list[int]]:
        if proposal is None or not proposal.token_ids:  # no proposal, or an empty one: the target's token
            return [verdict.token_id], [Origin.TOKEN_ORIGIN_TARGET]
        accepted = verdict.num_accepted
        if self.drafting.session is not None:
            self.drafting.session.accepted(accepted)
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
            response.usage.cached_tokens = self.targeting.cached_prompt_tokens
            response.queue_seconds = self.queue_seconds
            response.spec.CopyFrom(self.spec)
        return response
