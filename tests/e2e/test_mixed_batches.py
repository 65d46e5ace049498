"""Sixteen requests share the target's steps, each decoding its own way: target-only requests run
autonomous rounds on the target, one speculative request with overlap has its rounds chained from
the draft's plans, and --k auto requests switch between proposals and autonomous chunks. No token
changes: greedy output is the target's alone, and seeded sampled output does not depend on which
requests share the batch."""

from __future__ import annotations

import asyncio

from coordinator.adaptive import AUTO_K, AUTONOMOUS_CHUNK, EXPLORE
from splitspec.v1 import coordinator_pb2
from tests.coordinator.test_adaptive import measure
from tests.e2e.test_greedy_identity import reference
from tests.support import collect, start_stack

MAX_TOKENS = 40
CONCURRENCY = 16


def chained(stack, how: str) -> float:
    return stack.target.registry.get_sample_value("splitspec:target_chained_rounds_total", {"how": how}) or 0


def request(prompt: str, k: int | None, temperature: float = 0.0, seed: int = 0) -> coordinator_pb2.GenerateRequest:
    """`k` None: the coordinator's default."""
    message = coordinator_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, temperature=temperature,
                                              seed=seed, ignore_eos=True)
    if k is not None:
        message.k = k
    return message


def prompts() -> list[str]:
    return [f"prompt number {i} of a mixed batch" + " and more" * (i % 3) for i in range(CONCURRENCY)]


async def test_greedy_output_is_the_targets_with_autonomous_and_chained_rounds_mixed(tiny, slow_verify):
    """(slow_verify holds request 0's verifies until their plans are in: in CI, on a loaded machine,
    none of them chained without it.)"""
    target = tiny["target"]
    stack = await start_stack(target, tiny["draft_same"], k=4, max_k=4, overlap=True, overlap_width=2)
    try:
        texts = prompts()
        # request 0 speculates alone on the draft (its rounds chain from plans); the rest are target-only
        results = await asyncio.gather(*(collect(stack.stub, request(p, 4 if i == 0 else 0))
                                         for i, p in enumerate(texts)))
        for prompt, result in zip(texts, results):
            assert result["token_ids"] == reference(target, target.tokenizer(prompt).input_ids, MAX_TOKENS, False)
        assert results[0]["last"].spec.chained_rounds > 0 and chained(stack, "plan") > 0
        assert chained(stack, "autonomous") >= (CONCURRENCY - 1) * (MAX_TOKENS - 10)
        steps_by_batch = stack.target.state.stats.steps_by_batch
        assert max(i for i, n in enumerate(steps_by_batch) if n) == CONCURRENCY  # all sixteen shared steps
    finally:
        await stack.stop()


async def test_seeded_output_does_not_depend_on_the_batch_with_rounds_mixed(tiny):
    """(Whether a sampled round chains is a race here; test_chained_rounds makes it certain.)"""
    stack = await start_stack(tiny["target"], tiny["draft_same"], k=4, max_k=4, overlap=True, overlap_width=2)
    try:
        texts = prompts()
        alone = await collect(stack.stub, request(texts[0], 4, temperature=0.5, seed=7))
        together = await asyncio.gather(*(collect(stack.stub, request(p, 4 if i == 0 else 0, 0.5, 7 + i))
                                          for i, p in enumerate(texts)))
        assert together[0]["token_ids"] == alone["token_ids"]
        assert len({tuple(r["token_ids"]) for r in together}) == CONCURRENCY
    finally:
        await stack.stop()


async def test_auto_k_decodes_autonomous_chunks_when_the_target_alone_is_fastest(tiny):
    """--k auto with a poor draft: after exploring, k = 0 wins and the target decodes chunks by
    itself; greedy output stays the target's at every concurrency."""
    target = tiny["target"]
    stack = await start_stack(target, tiny["draft_noisy"], k=AUTO_K, max_k=4)
    costs = stack.coordinator.state.costs
    for sequences in (1, 4, CONCURRENCY):  # measured costs: a round with a proposal takes 10x the target's
        measure(costs, sequences, {k: 0.010 if k == 0 else 0.100 + 0.010 * k for k in EXPLORE})
    try:
        texts = prompts()[:4]
        results = await asyncio.gather(*(collect(stack.stub, request(p, None)) for p in texts))
        for prompt, result in zip(texts, results):
            assert result["token_ids"] == reference(target, target.tokenizer(prompt).input_ids, MAX_TOKENS, False)
            assert result["last"].spec.rounds == 0  # no proposal was worth its round
        # each request sends its first round; the chunks after it are extensions planned while the
        # chunk before them ran, chained on the target (one that arrived late: a round sent instead)
        sent_per_chunk = -(-(MAX_TOKENS - 1) // (AUTONOMOUS_CHUNK + 1))
        most = len(texts) * (MAX_TOKENS - 2)  # every round after each request's first
        assert len(texts) * (MAX_TOKENS - 1 - sent_per_chunk) < chained(stack, "autonomous") <= most
    finally:
        await stack.stop()
