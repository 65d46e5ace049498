"""Thin gRPC servicer: checks and decodes requests, queues them for the engine's next step.

On a VerifyStream the coordinator may send, while a round is verified, a plan: the next round's
request for each likely verdict. A verdict that matches a branch starts that branch's verify at
once, before the verdict is written back, so a round whose draft guessed right costs no network
round trip between verdict and next verify. A target-only round may carry a budget of
autonomous rounds: the target then decodes that sequence by itself, one chained round after
another, so every sequence decoding this way is in each step's batch (no round trip splits it).
A plan with `extends_autonomy` raises that budget before it runs out, so a sequence that goes on
decoding target-only never waits a round trip between two chunks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from splitspec.branches import matching_branch
from splitspec.convert import logprobs_to_proto, sampling_from_proto
from splitspec.errors import InvalidArgument
from splitspec.paged.stats import worker_stats
from splitspec.paged.step_loop import StepLoop
from splitspec.v1 import common_pb2, target_pb2, target_pb2_grpc
from target_worker.engine import PrefillItem, ReleaseItem, TargetEngine, VerifyItem
from target_worker.metrics import TargetMetrics


@dataclass(slots=True)
class _Verifying:
    request: target_pb2.VerifyRequest
    outcome: asyncio.Future
    start: float


class TargetServicer(target_pb2_grpc.TargetWorkerServicer):
    def __init__(self, engine: TargetEngine, metrics: TargetMetrics, steps: StepLoop) -> None:
        self.engine = engine
        self.metrics = metrics
        self.steps = steps

    async def _submit(self, kind: str, item: object) -> object:
        return await self._outcome(kind, self.steps.post(item), time.perf_counter())

    async def _outcome(self, kind: str, outcome: asyncio.Future, start: float) -> object:
        try:
            return await outcome
        finally:
            self.metrics.step_seconds.labels(kind).observe(time.perf_counter() - start)
            pool = self.engine.blocks.stats()
            self.metrics.running_sequences.set(len(self.engine.sequences))
            self.metrics.kv_blocks_used.set(pool.num_used)
            self.metrics.kv_blocks_total.set(pool.num_blocks)
            self.metrics.preemptions.set(self.engine.stats.preemptions)
            self.metrics.prefix_cache_hit_rate.set(pool.prefix_hit_rate)

    async def Prefill(self, request: target_pb2.PrefillRequest, context: grpc.aio.ServicerContext) -> target_pb2.PrefillResponse:
        item = PrefillItem(
            seq_id=request.seq_id,
            token_ids=list(request.token_ids),
            params=sampling_from_proto(request.sampling),
            max_new_tokens=request.max_new_tokens,
            num_lookahead_slots=request.num_lookahead_slots or 1,
            resume=request.resume,
            num_prompt_logprobs=request.num_prompt_logprobs if request.HasField("num_prompt_logprobs") else None,
        )
        self.engine.check_prefill(item)
        if item.params.constraint is not None:  # compiled off the event loop; its errors are the request's
            await asyncio.to_thread(self.engine.grammars.compile, item.params.constraint)
        outcome = await self._submit("prefill", item)
        self.metrics.prefills.inc()
        response = target_pb2.PrefillResponse(token_id=outcome.token_id, num_tokens=outcome.num_tokens,
                                              num_cached_tokens=outcome.num_cached_tokens)
        if outcome.logprobs:
            response.logprobs.CopyFrom(logprobs_to_proto(outcome.logprobs[0]))
        response.prompt_logprobs.extend(logprobs_to_proto(entry) for entry in outcome.prompt_logprobs)
        return response

    async def Verify(self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext) -> target_pb2.VerifyResponse:
        if request.branches:
            raise InvalidArgument("branches", "a plan of branches is only accepted on VerifyStream")
        if request.extends_autonomy:
            raise InvalidArgument("extends_autonomy", "a plan is only accepted on VerifyStream")
        if request.autonomous_rounds:
            raise InvalidArgument("autonomous_rounds", "autonomous rounds are only run on VerifyStream")
        return await self._finish_verify(self._start_verify(request))

    async def VerifyStream(
        self, request_iterator: AsyncIterator[target_pb2.VerifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[target_pb2.VerifyResponse]:
        rounds: asyncio.Queue[target_pb2.VerifyRequest | None] = asyncio.Queue()
        plans: dict[int, target_pb2.VerifyRequest] = {}  # num_tokens of a round -> its plan
        reader = asyncio.get_running_loop().create_task(_read_stream(request_iterator, rounds, plans))
        reader.add_done_callback(_retrieve)
        chained: _Verifying | None = None
        verifying: _Verifying | None = None
        try:
            while True:
                if chained is None:
                    request = await rounds.get()
                    if request is None:
                        return
                    verifying = self._start_verify(request, plans=plans)
                else:
                    verifying, chained = chained, None
                response = await self._finish_verify(verifying)
                plan = _take_plan(verifying.request, plans)
                following, how = _matching_branch(verifying.request, response, plan), "plan"
                if following is None and rounds.empty():  # no request waits: an autonomous round may go on
                    following, how = _autonomous_round(verifying.request, response, plan), "autonomous"
                if following is not None:  # the next round starts before this verdict is written back
                    chained = self._start_verify(following, chained=True, plans=plans)
                    response.chained = True
                    self.metrics.chained_rounds.labels(how).inc()
                yield response
        finally:
            reader.cancel()
            if verifying is not None:
                self.steps.forget(verifying.request.seq_id)
            if chained is not None:
                chained.outcome.cancel()

    def _start_verify(self, request: target_pb2.VerifyRequest, chained: bool = False,
                      plans: dict[int, target_pb2.VerifyRequest] | None = None) -> _Verifying:
        """Queue a round. `plans` (a VerifyStream's): its stream answers the verdict with the next
        round, and the next batch is held for it, as for a round this worker starts itself when
        an autonomous budget or a plan (in `plans` when the verdict is in) says it may;
        `chained`: this worker started this round itself."""
        if request.autonomous_rounds < 0:
            raise InvalidArgument("autonomous_rounds", f"must be >= 0, got {request.autonomous_rounds}")
        if request.autonomous_rounds and request.draft_token_ids:
            raise InvalidArgument("autonomous_rounds", "only a target-only round (no draft tokens) goes on by itself")
        probs = request.draft_sparse_probs if request.HasField("draft_sparse_probs") else \
            request.draft_probs if request.HasField("draft_probs") else None
        item = VerifyItem(
            seq_id=request.seq_id,
            draft_token_ids=list(request.draft_token_ids),
            draft_probs=probs,
            expected_num_tokens=request.num_tokens,
        )
        num_tokens, autonomous = request.num_tokens, request.autonomous_rounds > 0

        def follows() -> bool:
            return autonomous or (plans is not None and num_tokens in plans)

        outcome = self.steps.post(item, follows=follows, caller=request.seq_id if plans is not None else None,
                                  chained=chained)
        return _Verifying(request, outcome, time.perf_counter())

    async def _finish_verify(self, verifying: _Verifying) -> target_pb2.VerifyResponse:
        outcome = await self._outcome("verify", verifying.outcome, verifying.start)
        elapsed = time.perf_counter() - verifying.start
        self.metrics.verifies.inc()
        if not outcome.preempted:
            self.metrics.draft_tokens.inc(len(verifying.request.draft_token_ids))
            self.metrics.accepted_tokens.inc(outcome.num_accepted)
        return target_pb2.VerifyResponse(
            num_accepted=outcome.num_accepted,
            token_id=outcome.token_id,
            is_bonus=outcome.is_bonus,
            acceptance_probs=outcome.acceptance_probs,
            num_tokens=outcome.num_tokens,
            preempted=outcome.preempted,
            step_seconds=elapsed,
            logprobs=[logprobs_to_proto(entry) for entry in outcome.logprobs],
        )

    async def Release(self, request: target_pb2.ReleaseRequest, context: grpc.aio.ServicerContext) -> target_pb2.ReleaseResponse:
        released = await self._submit("release", ReleaseItem(request.seq_id))
        return target_pb2.ReleaseResponse(released=released)

    async def GetModelInfo(self, request: common_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self.engine.loaded.info()

    async def GetStats(self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> common_pb2.WorkerStats:
        engine = self.engine
        return worker_stats(engine.blocks, engine.stats, len(engine.sequences), len(self.steps.pending),
                            self.steps.arrivals)


def _retrieve(task: asyncio.Task) -> None:
    """A reader ends with the stream (often by cancellation); its outcome needs no reader."""
    if not task.cancelled():
        task.exception()


async def _read_stream(request_iterator: AsyncIterator[target_pb2.VerifyRequest],
                       rounds: asyncio.Queue, plans: dict[int, target_pb2.VerifyRequest]) -> None:
    """Rounds go to the queue in order; plans are filed under the round they are for."""
    try:
        async for request in request_iterator:
            if request.branches or request.extends_autonomy:
                plans[request.num_tokens] = request
            else:
                rounds.put_nowait(request)
    finally:
        rounds.put_nowait(None)


def _take_plan(request: target_pb2.VerifyRequest,
               plans: dict[int, target_pb2.VerifyRequest]) -> target_pb2.VerifyRequest | None:
    """This round's plan, if one came. Plans for this round and earlier ones are used up either way.
    An `extends_autonomy` plan is refused, naming the field, unless it and its round are target-only."""
    plan = plans.pop(request.num_tokens, None) if request.num_tokens else None
    for stale in [n for n in plans if n < request.num_tokens]:
        del plans[stale]
    if plan is not None and plan.extends_autonomy and (
            request.draft_token_ids or plan.draft_token_ids or plan.branches):
        raise InvalidArgument("extends_autonomy", "only a target-only round goes on by itself, "
                              "and the plan that extends it carries no proposal or branches")
    return plan


def _autonomous_round(request: target_pb2.VerifyRequest, response: target_pb2.VerifyResponse,
                      plan: target_pb2.VerifyRequest | None) -> target_pb2.VerifyRequest | None:
    """The next target-only round of a sequence decoding by itself, while its budget (raised by
    an `extends_autonomy` plan) lasts."""
    budget = request.autonomous_rounds
    if plan is not None and plan.extends_autonomy:
        budget = max(budget, plan.autonomous_rounds)
    if budget < 1 or response.preempted:
        return None
    return target_pb2.VerifyRequest(seq_id=request.seq_id, num_tokens=response.num_tokens,
                                    autonomous_rounds=budget - 1)


def _matching_branch(request: target_pb2.VerifyRequest, response: target_pb2.VerifyResponse,
                     plan: target_pb2.VerifyRequest | None) -> target_pb2.VerifyRequest | None:
    """The next round's request if this round's plan has a branch for its verdict."""
    held = matching_branch(plan.branches, response) if plan is not None and not response.preempted else None
    if held is None:
        return None
    following = plan.branches[held].next
    if following.branches:
        raise InvalidArgument("branches.next.branches", "a branch's round cannot carry a plan of its own")
    expected = request.num_tokens + response.num_accepted + 1
    if following.num_tokens not in (0, expected):
        raise InvalidArgument("branches.next.num_tokens",
                              f"{following.num_tokens} after this verdict; the sequence has {expected}")
    chained = target_pb2.VerifyRequest()
    chained.CopyFrom(following)
    chained.seq_id, chained.num_tokens = request.seq_id, expected
    return chained
