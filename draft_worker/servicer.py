"""Thin gRPC servicer: one bidirectional stream per sequence; the sequence dies with its stream."""

from __future__ import annotations

import time
from typing import AsyncIterator

import grpc

from draft_worker.engine import CloseItem, DraftEngine, DraftSequence, ProposeItem
from draft_worker.metrics import DraftMetrics
from draft_worker.ngram import NgramEngine
from splitspec.codec import encode_sparse, encode_tensor, sparse_is_smaller
from splitspec.convert import sampling_from_proto
from splitspec.paged.step_loop import StepLoop
from splitspec.v1 import common_pb2, draft_pb2, draft_pb2_grpc


class DraftServicer(draft_pb2_grpc.DraftWorkerServicer):
    def __init__(self, engine: DraftEngine | NgramEngine, metrics: DraftMetrics, steps: StepLoop) -> None:
        self.engine = engine
        self.metrics = metrics
        self.steps = steps

    async def Propose(
        self, request_iterator: AsyncIterator[draft_pb2.DraftRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[draft_pb2.DraftResponse]:
        sequence: DraftSequence | None = None
        self.metrics.open_streams.inc()
        self.engine.open_sequences += 1
        try:
            async for request in request_iterator:
                if sequence is None:
                    sequence = self.engine.start(request.seq_id, sampling_from_proto(request.sampling))
                item = ProposeItem(sequence, request.num_accepted, list(request.new_token_ids), request.k,
                                   request.speculative, request.speculation_held, request.min_confidence)
                self.engine.check(item)
                start = time.perf_counter()
                proposal = await self.steps.submit(item)
                elapsed = time.perf_counter() - start
                self.metrics.propose_seconds.observe(elapsed)
                self.metrics.proposals.inc()
                self.metrics.draft_tokens.inc(len(proposal.token_ids))
                response = draft_pb2.DraftResponse(token_ids=proposal.token_ids, num_tokens=proposal.num_tokens,
                                                   step_seconds=elapsed)
                if proposal.guessed_token_id >= 0:
                    response.guessed_token_id = proposal.guessed_token_id
                if proposal.probs is not None:  # greedy proposals carry token ids only
                    if sparse_is_smaller(proposal.probs):
                        response.sparse_probs.CopyFrom(encode_sparse(proposal.probs))
                    else:
                        response.probs.CopyFrom(encode_tensor(proposal.probs))
                yield response
        finally:
            if sequence is not None:
                self.steps.post(CloseItem(sequence))
            self.engine.open_sequences -= 1
            self.metrics.open_streams.dec()

    async def GetModelInfo(self, request: common_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self.engine.info()

    async def GetStats(self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> common_pb2.WorkerStats:
        return self.engine.worker_stats(len(self.steps.pending))
