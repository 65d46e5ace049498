"""Overlap with a target slow enough that the draft's branches reach it as a plan before each
verdict: the target starts the matching branch's round on its own (a chained round), and no
token changes, greedy or seeded sampled."""

from __future__ import annotations

import time

import pytest

from coordinator.generation import Generation
from splitspec.v1 import coordinator_pb2
from target_worker.engine import TargetEngine, VerifyItem
from tests.e2e.test_greedy_identity import reference
from tests.support import collect, start_stack

VERIFY_STEP_SECONDS = 0.02  # a tiny model's verify takes ~1 ms: less than the draft needs for its branches


@pytest.fixture
def slow_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    step = TargetEngine.step

    def slow_step(self: TargetEngine, items: list) -> tuple:
        if any(isinstance(item, VerifyItem) for item in items):
            time.sleep(VERIFY_STEP_SECONDS)
        return step(self, items)

    monkeypatch.setattr(TargetEngine, "step", slow_step)


def outcomes(stack) -> dict[str, float]:
    return {outcome: stack.coordinator.registry.get_sample_value(
        "splitspec:overlap_speculations_total", {"outcome": outcome}) or 0 for outcome in ("held", "chained", "missed")}


@pytest.mark.parametrize("draft_name", ["draft_same", "draft_noisy"])
async def test_chained_rounds_keep_greedy_output_identical(tiny, slow_verify, draft_name):
    stack = await start_stack(tiny["target"], tiny[draft_name], k=3, overlap=True)
    try:
        target, prompt = tiny["target"], "chained rounds"
        expected = reference(target, target.tokenizer(prompt).input_ids, 40, stop_at_eos=False)
        result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt=prompt, max_tokens=40, temperature=0.0, k=3, ignore_eos=True))
        assert result["token_ids"] == expected
        counts, spec = outcomes(stack), result["last"].spec
        assert counts["chained"] == spec.chained_rounds > 0
        if draft_name == "draft_same":  # every guess holds, and each plan is in before its verdict
            assert counts["missed"] == 0 and counts["chained"] >= 0.8 * (counts["held"] + counts["chained"])
    finally:
        await stack.stop()


async def test_chained_rounds_keep_seeded_sampled_output_identical(tiny, slow_verify, monkeypatch):
    """Which branch goes on depends only on the verdict, and the target draws its randomness in
    the same order whoever sends the round: seeded output is the same with the target chaining
    rounds and with the coordinator sending every round itself."""
    stack = await start_stack(tiny["target"], tiny["draft_close"], k=3, overlap=True)
    request = coordinator_pb2.GenerateRequest(prompt="seeded chain", max_tokens=40, temperature=1.0, top_k=20,
                                              seed=7, k=3, ignore_eos=True)
    try:
        chained = await collect(stack.stub, request)
        assert chained["last"].spec.chained_rounds > 0
        monkeypatch.setattr(Generation, "_plannable", lambda self, proposal, ahead: [])
        sent = await collect(stack.stub, request)
        assert sent["last"].spec.chained_rounds == 0
        assert sent["token_ids"] == chained["token_ids"]
    finally:
        await stack.stop()
