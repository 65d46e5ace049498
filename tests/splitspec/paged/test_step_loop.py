"""The step loop keeps sequences that answer their outcome at once (`follows`) in one batch."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitspec.service import model_thread
from splitspec.paged.step_loop import StepLoop


async def batch_sizes(follows: bool, callers: int = 4, rounds: int = 12) -> list[int]:
    """Each caller posts an item, awaits its outcome and posts the next one at once; the last
    caller starts during the first step, so without `follows` it stays a step out of phase."""
    sizes: list[int] = []

    def step(items: list) -> tuple[dict, list]:
        sizes.append(len(items))
        time.sleep(0.01)
        return {index: item for index, item in enumerate(items)}, []

    loop = StepLoop(step, model_thread("test-steps"))
    loop.start()

    async def caller(delay: float) -> None:
        await asyncio.sleep(delay)
        for round_ in range(rounds):
            await loop.post(round_, follows=follows)

    try:
        await asyncio.gather(*(caller(0.0) for _ in range(callers - 1)), caller(0.005))
    finally:
        await loop.stop()
    return sizes


@pytest.mark.parametrize("follows", [True, False])
async def test_callers_that_follow_at_once_share_every_step(follows):
    sizes = await batch_sizes(follows)
    whole = sizes.count(4)
    if follows:  # after the first two steps every step runs all four
        assert whole >= 11 and len(sizes) <= 14, sizes
    else:  # the late caller runs alone every other step
        assert whole <= 1 and sizes.count(1) >= 10, sizes
