"""Iteration-level batching: requests queue up while a step runs; each step takes all of them.

`step(items)` runs on the model thread and returns (outcomes, waiting): an outcome (a result
or an exception) for every item it finished, and the items it could not run yet (admission
control); those are offered again next step, ahead of newer arrivals.

An item posted for a `caller` (a sequence's verify stream) makes that caller expected once its
outcome is out; the next batch is held for expected callers (`Arrivals`), so sequences whose
rounds cross the network stay in one batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from splitspec.paged.arrivals import Arrivals

log = logging.getLogger(__name__)
Item = TypeVar("Item")
STEP_COST_SMOOTHING = 0.2  # weight of the newest step in the step-cost average (the longest hold)


@dataclass(slots=True, eq=False)
class Pending(Generic[Item]):
    item: Item
    future: asyncio.Future
    follows: bool | Callable[[], bool] = False  # the caller posts its next item as soon as this one's outcome is in (asked then)
    caller: str | None = None  # who posts the next item after this one's outcome (None: nobody says)


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
    step_cost: float = 0.0  # seconds, a moving average over recent steps
    arrivals: Arrivals = field(default_factory=Arrivals)

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

    def post(self, item: Any, follows: bool | Callable[[], bool] = False, caller: str | None = None,
             chained: bool = False) -> asyncio.Future:
        """Queue `item` without waiting (clean-up from a `finally` of a cancelled call). `caller`:
        who will post its next item after this outcome; the next batch is held for it. `follows`:
        the next item will be posted at once, in this process (a callable is asked when the
        outcome is in: a plan may have come meanwhile); `chained`: this item was (its gap is timed
        apart from those of items that crossed the network)."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        if caller is not None:
            self.arrivals.arrived(caller, time.monotonic(), quick=chained)
        self.pending.append(Pending(item, future, follows, caller))
        self.wake.set()
        return future

    def forget(self, caller: str) -> None:
        """`caller` posts nothing more: no batch is held for it."""
        self.arrivals.forget(caller)

    def _present_callers(self) -> set[str]:
        return {entry.caller for entry in self.pending if entry.caller is not None}

    async def _hold_for_expected(self) -> None:
        """Hold the next batch while expected callers are likely to join it (at most a step)."""
        started = time.monotonic()
        held = False
        while self.pending:
            present = self._present_callers()
            now = time.monotonic()
            until = self.arrivals.hold_until(present, len(self.pending), now, self.step_cost,
                                             self.step_cost - (now - started))
            if until is None:
                break
            held = True
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), max(until - now, 0.0))
            except TimeoutError:
                self.arrivals.give_up(self._present_callers())
                break
        if held:
            self.arrivals.holds += 1
            self.arrivals.hold_seconds += time.monotonic() - started

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            await self._hold_for_expected()
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
            now = time.monotonic()
            elapsed = now - self.running_since
            self.step_cost += (elapsed - self.step_cost) * (1.0 if self.steps == 1 else STEP_COST_SMOOTHING)
            self.last_step_at, self.running_since = now, None
            waiting_ids = {id(item) for item in waiting}
            kept = []
            for index, entry in enumerate(batch):
                if index in outcomes:
                    if entry.caller is not None and not isinstance(outcomes[index], BaseException):
                        follows = entry.follows() if callable(entry.follows) else entry.follows
                        self.arrivals.expect(entry.caller, follows, now)
                    _resolve(entry.future, outcomes[index])
                elif id(entry.item) in waiting_ids:
                    kept.append(entry)
                else:
                    _resolve(entry.future, RuntimeError("the step neither ran nor kept this item"))
            self.pending = kept + self.pending
            if outcomes and self.pending:
                self.wake.set()  # progress was made: the waiting items may fit now


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
