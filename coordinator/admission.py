"""Overload control: at most --max-running-requests run, at most --max-queued-requests wait for a
slot; anything beyond is refused at once with RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from splitspec.errors import ResourceExhausted


@dataclass(slots=True)
class Admission:
    max_running: int = 512
    max_queued: int = 1024
    waiting: int = 0
    _slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.max_running)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self.waiting >= self.max_queued:
            raise ResourceExhausted(
                f"the coordinator is at capacity: {self.max_running} requests running and {self.max_queued} "
                "queued (--max-running-requests / --max-queued-requests)")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()
