"""Thin gRPC servicer: one bidirectional stream per sequence; the sequence dies with its stream."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import grpc

from draft_worker.engine import DraftEngine, DraftSequence
from draft_worker.metrics import DraftMetrics
from splitspec.codec import encode_tensor
from splitspec.convert import sampling_from_proto
from splitspec.v1 import common_pb2, draft_pb2, draft_pb2_grpc


class DraftServicer(draft_pb2_grpc.DraftWorkerServicer):
    def __init__(self, engine: DraftEngine, metrics: DraftMetrics, executor: ThreadPoolExecutor) -> None:
        self.engine = engine
        self.metrics = metrics
        self.executor = executor

    async def Propose(
        self, request_iterator: AsyncIterator[draft_pb2.DraftRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[draft_pb2.DraftResponse]:
        loop = asyncio.get_running_loop()
        sequence: DraftSequence | None = None
        self.metrics.open_streams.inc()
        try:
            async for request in request_iterator:
                if sequence is None:
                    sequence = self.engine.start(request.seq_id, sampling_from_proto(request.sampling))
                start = time.perf_counter()
                proposal = await loop.run_in_executor(
                    self.executor, self.engine.propose, sequence, request.num_accepted, list(request.new_token_ids), request.k
                )
                self.metrics.propose_seconds.observe(time.perf_counter() - start)
                self.metrics.proposals.inc()
                self.metrics.draft_tokens.inc(len(proposal.token_ids))
                response = draft_pb2.DraftResponse(token_ids=proposal.token_ids, num_tokens=proposal.num_tokens)
                if proposal.probs is not None:
                    response.probs.CopyFrom(encode_tensor(proposal.probs))
                yield response
        finally:
            self.metrics.open_streams.dec()

    async def GetModelInfo(self, request: common_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self.engine.loaded.info(max_k=self.engine.max_k)
