"""Iteration-level batching: requests queue up while a step runs; each step takes all of them.

`step(items)` runs on the model thread and returns (outcomes, waiting): an outcome (a result
or an exception) for every item it finished, and the items it could not run yet (admission
control); those are offered again next step, ahead of newer arrivals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

log = logging.getLogger(__name__)
Item = TypeVar("Item")
# Event-loop turns between a step's outcomes and the next batch when a caller said it answers its
# outcome with the next item at once (an autonomous round): it then joins the next step instead of
# items that came in during the step running alone. Without them four autonomously decoding
# sequences ran in alternating batches of 1 and 3. Other steps start at once, as before: with the
# turns on every step, speculative rounds measured 58-62 tok/s at concurrency 1 where one run
# without them gave 71 (not reproduced since: run-to-run spread on this VM is that large).
FOLLOW_UP_TICKS = 2


@dataclass(slots=True, eq=False)
class Pending(Generic[Item]):
    item: Item
    future: asyncio.Future
    follows: bool = False  # the caller posts its next item as soon as this one's outcome is in


StepFn = Callable[[list[Any]], tuple[dict[int, Any], list[Any]]]


@dataclass(slots=True)
class StepLoop:
    step: StepFn                 # (items) -> ({index: result | BaseException}, still-waiting items)
    executor: ThreadPoolExecutor
    pending: list[Pending] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    steps: int = 0
    running_since: float | None = None  # monotonic start of the step in flight
    last_step_at: float = field(default_factory=time.monotonic)

    def stalled_for(self) -> float:
        """Seconds without a finished step while there is work (0 when idle or progressing)."""
        if self.running_since is None and not self.pending:
            return 0.0
        return time.monotonic() - max(self.last_step_at, self.running_since or self.last_step_at)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for entry in self.pending:
            if not entry.future.done():
                entry.future.set_exception(RuntimeError("worker stopped"))

    async def submit(self, item: Any) -> Any:
        """Queue `item` for the next step and wait for its outcome."""
        return await self.post(item)

    def post(self, item: Any, follows: bool = False) -> asyncio.Future:
        """Queue `item` without waiting (clean-up from a `finally` of a cancelled call). `follows`:
        the caller answers the outcome with its next item at once; the next batch waits for it."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        self.pending.append(Pending(item, future, follows))
        self.wake.set()
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch = [entry for entry in self.pending if not entry.future.done()]  # drop cancelled callers
            self.pending = []
            if not batch:
                continue
            self.running_since = time.monotonic()
            try:
                outcomes, waiting = await loop.run_in_executor(self.executor, self.step, [e.item for e in batch])
            except Exception as exc:  # noqa: BLE001 - a broken step fails its batch, not the loop
                log.exception("step failed")
                outcomes, waiting = {i: exc for i in range(len(batch))}, []
            self.steps += 1
            self.last_step_at, self.running_since = time.monotonic(), None
            waiting_ids = {id(item) for item in waiting}
            kept = []
            for index, entry in enumerate(batch):
                if index in outcomes:
                    _resolve(entry.future, outcomes[index])
                elif id(entry.item) in waiting_ids:
                    kept.append(entry)
                else:
                    _resolve(entry.future, RuntimeError("the step neither ran nor kept this item"))
            self.pending = kept + self.pending
            if outcomes and self.pending:
                self.wake.set()  # progress was made: the waiting items may fit now
            if any(entry.follows for entry in batch):
                for _ in range(FOLLOW_UP_TICKS):
                    await asyncio.sleep(0)  # those callers queue their next items before the next batch forms


def _consume(future: asyncio.Future) -> None:
    """Mark an outcome nobody awaits as retrieved, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()


def _resolve(future: asyncio.Future, outcome: Any) -> None:
    if future.done():  # the caller went away
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
