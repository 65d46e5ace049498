"""Target-only requests decode on the target by themselves (autonomous rounds): the coordinator
sends one round, the target chains every later one. Concurrent sequences then share each step,
and no token changes: greedy output is the target's alone, seeded output does not depend on
which other requests share the batch."""

from __future__ import annotations

import asyncio

from splitspec.v1 import coordinator_pb2
from tests.e2e.test_greedy_identity import reference
from tests.support import collect, start_stack

PROMPTS = ("autonomous one", "a second prompt", "three", "and the fourth of them")
MAX_TOKENS = 24


def autonomous_rounds(stack) -> float:
    return stack.target.registry.get_sample_value("splitspec:target_chained_rounds_total", {"how": "autonomous"}) or 0


async def test_concurrent_target_only_requests_decode_autonomously_and_match_target_alone(tiny):
    target = tiny["target"]
    stack = await start_stack(target, None)
    try:
        results = await asyncio.gather(*(collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)) for prompt in PROMPTS))
        for prompt, result in zip(PROMPTS, results):
            assert result["token_ids"] == reference(target, target.tokenizer(prompt).input_ids, MAX_TOKENS, False)
        # per request: the prefill's token, one round sent by the coordinator, the rest chained
        assert autonomous_rounds(stack) == len(PROMPTS) * (MAX_TOKENS - 2)
        assert all(r["last"].spec.target_rounds == MAX_TOKENS - 1 for r in results)
        # batches stay whole: apart from the first few steps (prefills, first rounds) every step
        # runs all four (before the step loop let callers answer, they ran in batches of 1 and 3)
        steps_by_batch = stack.target.state.stats.steps_by_batch
        assert len(steps_by_batch) == len(PROMPTS) + 1 and steps_by_batch[len(PROMPTS)] >= MAX_TOKENS - 5
    finally:
        await stack.stop()


async def test_seeded_target_only_output_does_not_depend_on_the_batch(tiny):
    stack = await start_stack(tiny["target"], None)

    def seeded(prompt: str, seed: int) -> coordinator_pb2.GenerateRequest:
        return coordinator_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                                               ignore_eos=True)

    try:
        alone = await collect(stack.stub, seeded(PROMPTS[0], 11))
        together = await asyncio.gather(*(collect(stack.stub, seeded(prompt, 11 + i))
                                          for i, prompt in enumerate(PROMPTS)))
        assert together[0]["token_ids"] == alone["token_ids"]
        assert len({tuple(r["token_ids"]) for r in together}) == len(PROMPTS)
    finally:
        await stack.stop()
