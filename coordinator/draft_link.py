"""A request's pinned draft and its proposal stream. Speculation is an optimisation: a draft that
fails or misses --draft-timeout is replaced by another draft replica (which gets the whole history
with the next proposal) or by none, and the request goes on target-only."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

import grpc

from coordinator.backend import Backend
from coordinator.pool import Endpoint
from coordinator.request import GenerationRequest
from coordinator.workers import DraftSession
from splitspec.errors import Unavailable
from splitspec.v1 import draft_pb2

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DraftLink:
    backend: Backend
    request: GenerationRequest
    seq_id: str
    timeout: Callable[[float], float]  # the call's timeout under the client's deadline (raises once it passed)
    endpoint: Endpoint | None = None
    session: DraftSession | None = None
    tried: set[str] = field(default_factory=set)

    @property
    def max_model_len(self) -> int:
        assert self.endpoint is not None
        return self.endpoint.info.max_model_len

    def open(self) -> None:
        """Pin a draft replica not tried yet, if there is one."""
        pool = self.backend.drafts
        endpoint = pool.pin(self.tried) if pool is not None else None
        if endpoint is None:
            return
        self.endpoint = endpoint
        self.session = endpoint.client.open(self.seq_id, self.request.params, self.request.draft_confidence)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.endpoint is not None:
            self.endpoint.pinned -= 1
            self.endpoint = None

    def replace(self, mark_failed: bool = True) -> None:
        """The draft failed: count it (`mark_failed`: and take it out of the pool for a while), and
        move to another replica, or to none."""
        if mark_failed and self.endpoint is not None:
            self.backend.drafts.mark_failed(self.endpoint)
        self.backend.metrics.failovers.labels("draft").inc()
        self.close()
        self.open()

    async def propose(self, history: list[int], k: int) -> draft_pb2.DraftResponse | None:
        """`k` tokens after `history`; None when the draft failed (it is replaced: choose k again)."""
        assert self.session is not None and self.endpoint is not None
        timeout = self.timeout(self.backend.timeouts.draft)  # may raise: before the coroutine exists
        try:
            async with asyncio.timeout(timeout):  # no wrapper task: the request goes out in this step
                return await self.session.propose(history, k)
        except (grpc.aio.AioRpcError, Unavailable, asyncio.TimeoutError) as exc:
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
            log.warning("draft failed; moving on", extra={
                "request_id": self.request.request_id, "address": self.endpoint.address, "code": code})
            busy = isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            self.replace(mark_failed=not busy)
            return None
