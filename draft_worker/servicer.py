"""Thin gRPC servicer: one bidirectional stream per sequence; the sequence dies with its stream."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import grpc

from draft_worker.engine import CloseItem, DraftEngine, DraftSequence, Proposal, ProposeItem
from draft_worker.metrics import DraftMetrics
from draft_worker.ngram import NgramEngine
from splitspec.codec import encode_sparse, encode_tensor, sparse_is_smaller
from splitspec.convert import sampling_from_proto
from splitspec.paged.step_loop import StepLoop
from splitspec.v1 import common_pb2, draft_pb2, draft_pb2_grpc


def encode_proposal(proposal: Proposal, step_seconds: float) -> draft_pb2.DraftResponse:
    """Greedy proposals carry token ids only; sampled ones their q, as its support when smaller."""
    response = draft_pb2.DraftResponse(token_ids=proposal.token_ids, num_tokens=proposal.num_tokens,
                                       step_seconds=step_seconds)
    if proposal.probs is not None:
        if sparse_is_smaller(proposal.probs):
            response.sparse_probs.CopyFrom(encode_sparse(proposal.probs))
        else:
            response.probs.CopyFrom(encode_tensor(proposal.probs))
    for branch in proposal.branches:
        response.branches.add(num_accepted=branch.num_accepted, token_id=branch.token_id,
                              proposal=encode_proposal(branch.proposal, step_seconds))
    return response


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
                    params = sampling_from_proto(request.sampling)
                    # a grammar compiles off the event loop: other streams keep being served meanwhile
                    sequence = (await asyncio.to_thread(self.engine.start, request.seq_id, params)
                                if params.constraint is not None else self.engine.start(request.seq_id, params))
                held = request.held_branch if request.HasField("held_branch") else None
                item = ProposeItem(sequence, request.num_accepted, list(request.new_token_ids), request.k,
                                   request.speculative, held, request.min_confidence,
                                   max(1, request.branch_width))  # 0 (unset) counts as 1
                self.engine.check(item)
                start = time.perf_counter()
                proposal = await self.steps.submit(item)
                elapsed = time.perf_counter() - start
                self.metrics.propose_seconds.observe(elapsed)
                self.metrics.proposals.inc()
                self.metrics.draft_tokens.inc(len(proposal.token_ids))
                yield encode_proposal(proposal, elapsed)
        finally:
            if sequence is not None:
                self.steps.post(CloseItem(sequence))
            self.engine.open_sequences -= 1
            self.metrics.open_streams.dec()

    async def GetModelInfo(self, request: common_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self.engine.info()

    async def GetStats(self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> common_pb2.WorkerStats:
        return self.engine.worker_stats(len(self.steps.pending))
