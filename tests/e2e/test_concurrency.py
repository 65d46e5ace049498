"""Many requests at once: batched verification keeps every greedy output equal to the target alone;
a soak with random cancellations and a pool small enough to force preemption leaks nothing."""

from __future__ import annotations

import asyncio
import random

import pytest

from splitspec.paged.cache import CacheConfig
from splitspec.v1 import coordinator_pb2
from tests.e2e.test_greedy_identity import _prompts, reference
from tests.support import collect, soak_requests, start_stack, wait_until_idle

R = coordinator_pb2.GenerateRequest


async def test_concurrency_16_mixed_lengths_and_k_is_exact(tiny):
    target = tiny["target"]
    stack = await start_stack(target, tiny["draft_noisy"], k=4, max_k=8,
                              target_cache=CacheConfig(num_blocks=256, block_size=8))
    try:
        prompts = [f"{'abc' * (i % 7)} request {i}" for i in range(16)]
        ks = [i % 9 for i in range(16)]
        lengths = [20 + 3 * i for i in range(16)]
        results = await asyncio.gather(*(
            collect(stack.stub, R(prompt=p, max_tokens=n, temperature=0.0, k=k, ignore_eos=True))
            for p, k, n in zip(prompts, ks, lengths)))
        for prompt, n, result in zip(prompts, lengths, results):
            assert result["token_ids"] == reference(target, target.tokenizer(prompt).input_ids, n, False), prompt
        stats = stack.target.state.stats
        assert stats.max_batch_sequences > 4, "requests were not batched together"
    finally:
        await stack.stop()


@pytest.mark.real_models
async def test_real_pair_concurrency_16_is_exact(real):
    target = real["target"]
    stack = await start_stack(target, real["draft"], k=4, max_k=8)
    try:
        prompts = _prompts(16)
        ks = [(1, 2, 4, 8)[i % 4] for i in range(16)]
        results = await asyncio.gather(*(
            collect(stack.stub, R(prompt=p, max_tokens=64, temperature=0.0, k=k, ignore_eos=True))
            for p, k in zip(prompts, ks)))
        for prompt, result in zip(prompts, results):
            assert result["token_ids"] == reference(target, target.tokenizer(prompt).input_ids, 64, False)
    finally:
        await stack.stop()


async def test_soak_with_cancellations_and_preemption_leaks_nothing(tiny):
    """1,000 requests (a third by default: `soak_requests`), 32 at a time, ~20% cancelled by the
    client at a random point; the target's pool (96 blocks of 4 tokens) holds about a third of what
    32 running sequences need."""
    target = tiny["target"]
    stack = await start_stack(target, tiny["draft_noisy"], k=4, max_k=8,
                              target_cache=CacheConfig(num_blocks=96, block_size=4, max_num_seqs=64),
                              draft_cache=CacheConfig(num_blocks=2048, block_size=4))
    rng = random.Random(0)
    prompts = [f"soak {i} " + "xy" * (i % 9) for i in range(40)]
    max_tokens = 24
    expected = {p: reference(target, target.tokenizer(p).input_ids, max_tokens, False) for p in prompts}
    semaphore = asyncio.Semaphore(32)
    outcomes = {"completed": 0, "cancelled": 0}

    async def one(index: int) -> None:
        prompt = rng.choice(prompts)
        k = rng.choice([0, 1, 2, 4, 8])
        cancel_after = rng.randrange(4) if rng.random() < 0.2 else None
        async with semaphore:
            call = stack.stub.Generate(R(prompt=prompt, max_tokens=max_tokens, temperature=0.0, k=k, ignore_eos=True))
            tokens = []
            async for response in call:
                tokens += response.token_ids
                if cancel_after is not None and len(tokens) > cancel_after:
                    call.cancel()
                    outcomes["cancelled"] += 1
                    return
            assert tokens == expected[prompt], (index, prompt, k)
            outcomes["completed"] += 1

    try:
        requests = soak_requests(1000)
        await asyncio.gather(*(one(i) for i in range(requests)))
        await stack.coordinator.state.drain()
        await wait_until_idle(stack.target, stack.draft, timeout=10.0)
        target_engine, draft_engine = stack.target.state, stack.draft.state
        assert outcomes["completed"] + outcomes["cancelled"] == requests and outcomes["cancelled"] > requests // 10
        assert target_engine.stats.preemptions > 0, "the pool never ran dry: the test lost its point"
        assert target_engine.sequences == {} and target_engine.suspended == {}
        assert target_engine.blocks.num_free_blocks == target_engine.blocks.num_blocks
        assert all(b.ref_count == 0 for b in target_engine.blocks.blocks)
        assert draft_engine.blocks.num_free_blocks == draft_engine.blocks.num_blocks
        assert draft_engine.open_sequences == 0
    finally:
        await stack.stop()
