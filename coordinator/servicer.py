"""Thin client-facing servicer: validate, then stream the Generation."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from coordinator.generation import Backend, Generation
from coordinator.request import Limits, validate_request
from splitspec.errors import Unavailable
from splitspec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, backend: Backend, limits: Limits, target_info: common_pb2.ModelInfo,
                 draft_info: common_pb2.ModelInfo | None) -> None:
        self.backend = backend
        self.limits = limits
        self.target_info = target_info
        self.draft_info = draft_info

    async def Generate(
        self, request: coordinator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        generation = Generation(validate_request(request, self.backend.tokenizer, self.limits), self.backend)
        async for response in generation.stream():
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
        try:
            stats.target.CopyFrom(await backend.target.stats())
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"target worker {backend.target.address}: {exc.code().name}") from exc
        if backend.draft is not None:
            try:
                stats.draft.CopyFrom(await backend.draft.stats())
            except grpc.aio.AioRpcError as exc:
                raise Unavailable(f"draft worker {backend.draft.address}: {exc.code().name}") from exc
        return stats
