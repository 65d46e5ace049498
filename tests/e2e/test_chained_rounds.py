"""Overlap with a target slow enough that the draft's branches reach it as a plan before each
verdict: the target starts the matching branch's round on its own (a chained round), and no
token changes, greedy or seeded sampled."""

from __future__ import annotations

import pytest

from coordinator.generation import Generation
from coordinator.server import CoordinatorConfig, start_coordinator
from draft_worker.server import start_draft
from splitspec.paged.cache import CacheConfig
from splitspec.service import make_channel
from splitspec.v1 import coordinator_pb2, coordinator_pb2_grpc
from target_worker.server import start_target
from tests.e2e.test_faults import pinned
from tests.e2e.test_greedy_identity import reference
from tests.support import collect, start_stack


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
        if draft_name == "draft_same":  # every guess holds, and every plan is in before its verdict
            assert counts["missed"] == 0 and counts["chained"] > counts["held"]
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
        slow_verify.await_plans = False
        sent = await collect(stack.stub, request)
        assert sent["last"].spec.chained_rounds == 0
        assert sent["token_ids"] == chained["token_ids"]
    finally:
        await stack.stop()


async def test_target_lost_during_a_chained_round_fails_over(tiny, slow_verify):
    """The pinned target goes away while it verifies a round it chained: the coordinator resumes
    the request on the other target and sends that round itself; nothing is lost or repeated."""
    targets = [await start_target(tiny["target"], cache=CacheConfig(num_blocks=512)) for _ in range(2)]
    draft = await start_draft(tiny["draft_same"], cache=CacheConfig(num_blocks=512))
    running = await start_coordinator(CoordinatorConfig(
        target=[t.address for t in targets], draft=[draft.address], port=0, host="127.0.0.1", k=3,
        connect_timeout=10, overlap=True))
    stub = coordinator_pb2_grpc.CoordinatorStub(make_channel(running.address))
    prompt, max_tokens = "chained failover", 60
    expected = reference(tiny["target"], tiny["target"].tokenizer(prompt).input_ids, max_tokens, stop_at_eos=False)
    registry = running.registry

    def count(name: str, labels: dict[str, str]) -> float:
        return registry.get_sample_value(name, labels) or 0

    try:
        call = stub.Generate(coordinator_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                                             k=3, ignore_eos=True), timeout=60)
        tokens: list[int] = []
        stopped = False
        async for message in call:
            tokens.extend(message.token_ids)
            if not stopped and count("splitspec:overlap_speculations_total", {"outcome": "chained"}) >= 2:
                # the verdict just streamed was chained: its successor is being verified on the target
                (lost,) = [t for t in targets if t.address == pinned(running.state.targets)]
                await lost.stop(0)
                stopped = True
        assert stopped and tokens == expected
        assert count("splitspec:worker_failovers_total", {"kind": "target"}) >= 1
    finally:
        await running.stop(0)
        await draft.stop(0)
        for target in targets:
            await target.stop(0)
