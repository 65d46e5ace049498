"""Thin gRPC servicer: decodes requests, runs the engine on the model thread, encodes replies."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import grpc

from splitspec.convert import sampling_from_proto
from splitspec.v1 import common_pb2, target_pb2, target_pb2_grpc
from target_worker.engine import TargetEngine
from target_worker.metrics import TargetMetrics


class TargetServicer(target_pb2_grpc.TargetWorkerServicer):
    def __init__(self, engine: TargetEngine, metrics: TargetMetrics, executor: ThreadPoolExecutor) -> None:
        self.engine = engine
        self.metrics = metrics
        self.executor = executor  # one thread: the model runs one step at a time

    async def _run(self, kind: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.metrics.step_seconds.labels(kind).observe(time.perf_counter() - start)
            self.metrics.running_sequences.set(len(self.engine.sequences))

    async def Prefill(self, request: target_pb2.PrefillRequest, context: grpc.aio.ServicerContext) -> target_pb2.PrefillResponse:
        params = sampling_from_proto(request.sampling)
        token, num_tokens = await self._run("prefill", self.engine.prefill, request.seq_id, list(request.token_ids), params)
        self.metrics.prefills.inc()
        return target_pb2.PrefillResponse(token_id=token, num_tokens=num_tokens)

    async def Verify(self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext) -> target_pb2.VerifyResponse:
        probs = request.draft_probs if request.HasField("draft_probs") else None
        outcome = await self._run(
            "verify", self.engine.verify, request.seq_id, list(request.draft_token_ids), probs, request.num_tokens
        )
        self.metrics.verifies.inc()
        self.metrics.draft_tokens.inc(len(request.draft_token_ids))
        self.metrics.accepted_tokens.inc(outcome.num_accepted)
        return target_pb2.VerifyResponse(
            num_accepted=outcome.num_accepted,
            token_id=outcome.token_id,
            is_bonus=outcome.is_bonus,
            acceptance_probs=outcome.acceptance_probs,
            num_tokens=outcome.num_tokens,
        )

    async def Release(self, request: target_pb2.ReleaseRequest, context: grpc.aio.ServicerContext) -> target_pb2.ReleaseResponse:
        released = await self._run("release", self.engine.release, request.seq_id)
        return target_pb2.ReleaseResponse(released=released)

    async def GetModelInfo(self, request: common_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self.engine.loaded.info()
