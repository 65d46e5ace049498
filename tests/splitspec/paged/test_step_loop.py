"""The step loop holds a batch for the callers that will post their next item soon, so sequences
answering their outcomes over a network (or at once, in-process) share every step; nothing
expected, no hold."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitspec.paged.step_loop import StepLoop
from splitspec.service import model_thread

STEP_SECONDS = 0.02


async def run_callers(named: bool, gap: float, callers: int = 4, rounds: int = 12,
                      late_start: float = 0.005) -> tuple[list[int], StepLoop]:
    """Each caller posts an item, awaits its outcome, waits its round trip (`gap`, a little longer
    for each next caller) and posts the next one; the last caller starts during the first step,
    out of phase. `named`: the items say who posts next (`caller`)."""
    sizes: list[int] = []

    def step(items: list) -> tuple[dict, list]:
        sizes.append(len(items))
        time.sleep(STEP_SECONDS)
        return {index: item for index, item in enumerate(items)}, []

    loop = StepLoop(step, model_thread("test-steps"))
    loop.start()

    async def caller(name: str, delay: float, round_trip: float) -> None:
        await asyncio.sleep(delay)
        try:
            for round_ in range(rounds):
                await loop.post(round_, follows=gap == 0, caller=name if named else None, chained=gap == 0 and round_ > 0)
                if round_trip:
                    await asyncio.sleep(round_trip)
        finally:
            loop.forget(name)

    round_trips = [gap * (1 + 0.2 * i) for i in range(callers)]
    try:
        await asyncio.gather(*(caller(f"s{i}", 0.0, round_trips[i]) for i in range(callers - 1)),
                             caller("late", late_start, round_trips[-1]))
    finally:
        await loop.stop()
    return sizes, loop


@pytest.mark.parametrize("gap", [0.0, 0.003], ids=["in-process", "network"])
async def test_expected_callers_share_every_step(gap):
    sizes, loop = await run_callers(named=True, gap=gap)
    assert sizes.count(4) >= 9 and len(sizes) <= 15, sizes  # after the first steps every step runs all four
    assert loop.arrivals.holds >= (1 if gap == 0 else 9)  # in-process callers come back within one event-loop turn
    assert not loop.arrivals.expected  # every caller said goodbye


@pytest.mark.parametrize("gap", [0.0, 0.003], ids=["in-process", "network"])
async def test_unnamed_callers_stay_out_of_phase(gap):
    """Without `caller` nothing is expected: the late caller runs alone every other step."""
    sizes, loop = await run_callers(named=False, gap=gap)
    assert sizes.count(4) <= 1 and sizes.count(1) >= 10, sizes
    assert loop.arrivals.holds == 0


async def test_a_caller_that_stops_posting_costs_at_most_one_hold():
    """A caller expected after its outcome that never posts again (its request ended without a
    goodbye) holds the others once, for at most a step; then it is no longer held for."""
    loop = StepLoop(lambda items: (time.sleep(STEP_SECONDS), ({i: i for i in range(len(items))}, []))[1],
                    model_thread("test-steps"))
    loop.start()
    try:
        await loop.post("last round", caller="gone")
        started = time.monotonic()
        for _ in range(5):
            await loop.post("other")
        elapsed = time.monotonic() - started
    finally:
        await loop.stop()
    assert loop.arrivals.holds == 1 and loop.arrivals.late == 1
    assert loop.arrivals.hold_seconds <= loop.step_cost * 1.5 + 0.005
    assert elapsed < 5 * STEP_SECONDS + 2 * loop.step_cost + 0.05, elapsed
