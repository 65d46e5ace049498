"""End-to-end fixtures: a target slow enough, and patient enough, that the coordinator's plans
reach it before each verdict."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from splitspec.v1 import target_pb2
from target_worker import servicer
from target_worker.engine import TargetEngine, VerifyItem

VERIFY_STEP_SECONDS = 0.02  # a tiny model's verify takes ~1 ms: less than the draft needs for its branches
PLAN_WAIT_SECONDS = 0.5  # the longest a verify waits for its round's plan (the last rounds get none)


@dataclass(slots=True)
class SlowVerify:
    await_plans: bool = True  # off for runs that send no plans


@pytest.fixture
def slow_verify(monkeypatch: pytest.MonkeyPatch) -> SlowVerify:
    """A verify takes at least VERIFY_STEP_SECONDS and waits, up to PLAN_WAIT_SECONDS, until the plan
    for its round has reached the target: whether a plan beats its verdict is then no longer a race
    that a loaded machine loses (in CI a fixed 20 ms let 0 of 15 plans arrive in time)."""
    control = SlowVerify()
    planned: set[tuple[str, int]] = set()  # (seq_id, num_tokens) of the rounds a plan has reached
    read_stream, step = servicer._read_stream, TargetEngine.step

    async def recording(requests: AsyncIterator[target_pb2.VerifyRequest]) -> AsyncIterator[target_pb2.VerifyRequest]:
        async for request in requests:
            if request.branches:
                planned.add((request.seq_id, request.num_tokens))
            yield request

    def slow_step(self: TargetEngine, items: list) -> tuple:
        rounds = [(item.seq_id, item.expected_num_tokens) for item in items
                  if isinstance(item, VerifyItem) and item.draft_token_ids]  # target-only rounds get no plan
        if rounds:
            start = time.monotonic()
            time.sleep(VERIFY_STEP_SECONDS)
            while control.await_plans and not planned.issuperset(rounds) and time.monotonic() - start < PLAN_WAIT_SECONDS:
                time.sleep(0.001)
        return step(self, items)

    monkeypatch.setattr(servicer, "_read_stream", lambda requests, rounds, plans: read_stream(recording(requests), rounds, plans))
    monkeypatch.setattr(TargetEngine, "step", slow_step)
    return control
