"""Thin gRPC servicer: checks and decodes requests, queues them for the engine's next step."""

from __future__ import annotations

import time
from typing import AsyncIterator

import grpc

from splitspec.convert import sampling_from_proto
from splitspec.paged.stats import worker_stats
from splitspec.paged.step_loop import StepLoop
from splitspec.v1 import common_pb2, target_pb2, target_pb2_grpc
from target_worker.engine import PrefillItem, ReleaseItem, TargetEngine, VerifyItem
from target_worker.metrics import TargetMetrics


class TargetServicer(target_pb2_grpc.TargetWorkerServicer):
    def __init__(self, engine: TargetEngine, metrics: TargetMetrics, steps: StepLoop) -> None:
        self.engine = engine
        self.metrics = metrics
        self.steps = steps

    async def _submit(self, kind: str, item: object) -> object:
        start = time.perf_counter()
        try:
            return await self.steps.submit(item)
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
        )
        self.engine.check_prefill(item)
        outcome = await self._submit("prefill", item)
        self.metrics.prefills.inc()
        return target_pb2.PrefillResponse(token_id=outcome.token_id, num_tokens=outcome.num_tokens,
                                          num_cached_tokens=outcome.num_cached_tokens)

    async def Verify(self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext) -> target_pb2.VerifyResponse:
        return await self._verify(request)

    async def VerifyStream(
        self, request_iterator: AsyncIterator[target_pb2.VerifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[target_pb2.VerifyResponse]:
        async for request in request_iterator:
            yield await self._verify(request)

    async def _verify(self, request: target_pb2.VerifyRequest) -> target_pb2.VerifyResponse:
        probs = request.draft_sparse_probs if request.HasField("draft_sparse_probs") else \
            request.draft_probs if request.HasField("draft_probs") else None
        item = VerifyItem(
            seq_id=request.seq_id,
            draft_token_ids=list(request.draft_token_ids),
            draft_probs=probs,
            expected_num_tokens=request.num_tokens,
        )
        start = time.perf_counter()
        outcome = await self._submit("verify", item)
        elapsed = time.perf_counter() - start
        self.metrics.verifies.inc()
        if not outcome.preempted:
            self.metrics.draft_tokens.inc(len(request.draft_token_ids))
            self.metrics.accepted_tokens.inc(outcome.num_accepted)
        return target_pb2.VerifyResponse(
            num_accepted=outcome.num_accepted,
            token_id=outcome.token_id,
            is_bonus=outcome.is_bonus,
            acceptance_probs=outcome.acceptance_probs,
            num_tokens=outcome.num_tokens,
            preempted=outcome.preempted,
            step_seconds=elapsed,
        )

    async def Release(self, request: target_pb2.ReleaseRequest, context: grpc.aio.ServicerContext) -> target_pb2.ReleaseResponse:
        released = await self._submit("release", ReleaseItem(request.seq_id))
        return target_pb2.ReleaseResponse(released=released)

    async def GetModelInfo(self, request: common_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self.engine.loaded.info()

    async def GetStats(self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> common_pb2.WorkerStats:
        engine = self.engine
        return worker_stats(engine.blocks, engine.stats, len(engine.sequences), len(self.steps.pending))
