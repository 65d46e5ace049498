"""Thin client-facing servicer: validate, then stream the Generation."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import grpc

from coordinator.admission import Admission
from coordinator.backend import Backend
from coordinator.generation import Generation
from coordinator.request import Limits, validate_request
from splitspec.errors import Unavailable
from splitspec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc


NO_DEADLINE = 1e7  # seconds


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, backend: Backend, limits: Limits, target_info: common_pb2.ModelInfo,
                 draft_info: common_pb2.ModelInfo | None, admission: Admission | None = None) -> None:
        self.backend = backend
        self.admission = admission or Admission()
        self.limits = limits
        self.target_info = target_info
        self.draft_info = draft_info

    async def Generate(
        self, request: coordinator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        validated = validate_request(request, self.backend.tokenizer, self.limits, self.backend.grammars)
        if validated.params.constraint is not None:  # the grammar's own errors, naming constraint.<kind>;
            # compiled off the event loop, so that other requests' rounds go on meanwhile
            await asyncio.to_thread(self.backend.grammars.compile, validated.params.constraint)
        remaining = context.time_remaining()
        # No client deadline shows as None or as an enormous value (grpc issue #26236): no deadline then.
        deadline = time.monotonic() + remaining if remaining is not None and remaining < NO_DEADLINE else None
        arrived = time.perf_counter()
        async with self.admission.slot():
            queued = time.perf_counter() - arrived
            self.backend.metrics.queue_time.observe(queued)
            async for response in Generation(validated, self.backend, deadline, queue_seconds=queued).stream():
                yield response

    async def GetModelInfo(
        self, request: coordinator_pb2.CoordinatorInfoRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.CoordinatorInfo:
        info = coordinator_pb2.CoordinatorInfo(target=self.target_info, default_k=self.limits.default_k,
                                               max_k=self.limits.max_k)
        if self.draft_info is not None:
            info.draft.CopyFrom(self.draft_info)
        return info

    async def GetStats(
        self, request: coordinator_pb2.CoordinatorStatsRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.CoordinatorStats:
        backend = self.backend
        stats = coordinator_pb2.CoordinatorStats(running_requests=backend.running)
        for pool, slot in ((backend.targets, stats.target), (backend.drafts, stats.draft)):
            if pool is None:
                continue
            endpoint = pool.pick()
            if endpoint is None:
                raise Unavailable(f"no {pool.kind} worker is serving ({', '.join(pool.endpoints) or 'none known'})")
            try:
                slot.CopyFrom(await endpoint.client.stats())
            except grpc.aio.AioRpcError as exc:
                raise Unavailable(f"{pool.kind} worker {endpoint.address}: {exc.code().name}") from exc
        return stats
