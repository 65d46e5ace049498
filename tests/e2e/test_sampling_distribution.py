"""End to end, sampled tokens produced by speculation follow the target's exact distribution.

With max_tokens=4 and k=2, token 1 comes from prefill and tokens 2 and 3 from one speculative
round (accepted draft token, recovered token or bonus token), token 4 from the next round.
We compare the empirical marginals of tokens 2 and 3 over N fixed seeds with the *exact*
marginals of the target alone, computed by enumerating every context (top-k keeps that small).

Tolerance: a chi-square goodness-of-fit test at p > 1e-3. Seeds are fixed, so the test is
deterministic; a correct sampler fails it with probability 1e-3 per marginal over the choice of
seed set, and the power check below shows that a sampler emitting the draft's distribution
instead would fail it by a huge margin.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from splitspec.sampling import SamplingParams, logits_context, process_logits
from splitspec.v1 import coordinator_pb2
from tests.support import collect, start_stack

N = 1000
PARAMS = SamplingParams(temperature=0.8, top_k=5, repetition_penalty=1.2)
# OpenAI's penalties and a logit bias, applied by draft and target alike (the bias favours a token
# the noisy draft rarely proposes, so acceptance and the residual both matter)
PENALISED = SamplingParams(temperature=0.9, top_k=6, presence_penalty=1.2, frequency_penalty=0.7,
                           logit_bias=((5, 2.0), (7, -1.5)))
PROMPT = "abc"


def next_probs(loaded, contexts: list[list[int]], params: SamplingParams = PARAMS) -> torch.Tensor:
    """Processed next-token distributions for each context: [len(contexts), vocab]."""
    with torch.inference_mode():
        logits = loaded.model(torch.tensor(contexts)).logits[:, -1].float()
    rows = [process_logits(logits[i : i + 1], params, logits_context(params, c, [], loaded.vocab_size)) for i, c in
            enumerate(contexts)]
    return torch.cat(rows).double()


def exact_marginals(loaded, prompt: list[int], depth: int, params: SamplingParams = PARAMS) -> list[dict[int, float]]:
    """Exact marginal distribution of generated tokens 1..depth under `params`."""
    params = dataclasses.replace(params, num_prompt_tokens=len(prompt))  # as the coordinator sets it
    paths: dict[tuple[int, ...], float] = {(): 1.0}
    marginals = []
    for _ in range(depth):
        contexts = list(paths)
        probs = next_probs(loaded, [prompt + list(c) for c in contexts], params)
        new_paths: dict[tuple[int, ...], float] = {}
        marginal: dict[int, float] = {}
        for context, row in zip(contexts, probs):
            for token in torch.nonzero(row).flatten().tolist():
                mass = paths[context] * float(row[token])
                new_paths[context + (token,)] = mass
                marginal[token] = marginal.get(token, 0.0) + mass
        paths = new_paths
        marginals.append(marginal)
    return marginals


def pvalue(samples: list[int], marginal: dict[int, float]) -> float:
    support = sorted(marginal)
    assert set(samples) <= set(support), "a token outside the target's top-k support was emitted"
    observed = np.array([samples.count(t) for t in support], dtype=float)
    expected = np.array([marginal[t] for t in support]) * len(samples)
    expected *= observed.sum() / expected.sum()
    return float(chisquare(observed, expected).pvalue)


async def sample_many(target, draft, k: int, max_tokens: int, overlap: bool = False,
                      params: SamplingParams = PARAMS, stack=None) -> tuple[list[dict], float]:
    """N seeded requests through a whole stack (`stack`, or one started for them); returns the
    results and how many overlap branches held."""
    own = stack is None
    if own:
        stack = await start_stack(target, draft, k=k, overlap=overlap, overlap_width=2)
    try:
        async def one(seed: int) -> dict:
            return await collect(stack.stub, coordinator_pb2.GenerateRequest(
                prompt=PROMPT, max_tokens=max_tokens, k=k, seed=seed, ignore_eos=True, temperature=params.temperature,
                top_k=params.top_k, repetition_penalty=params.repetition_penalty,
                presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                logit_bias=dict(params.logit_bias)))

        results = []
        batch = 1 if overlap else 50  # overlap drafts branches for a few requests per draft only (OVERLAP_MAX_BRANCHES)
        for start in range(0, N, batch):
            results += await asyncio.gather(*(one(seed) for seed in range(start, min(N, start + batch))))
        held = stack.coordinator.registry.get_sample_value("splitspec:overlap_speculations_total",
                                                           {"outcome": "held"}) or 0
    finally:
        if own:
            await stack.stop()
    return results, held


def assert_follows(results: list[dict], reference, positions: tuple[int, ...], check_acceptance: bool = True,
                   params: SamplingParams = PARAMS) -> dict[int, dict[int, float]]:
    """Tokens at `positions` came from speculative rounds and follow the exact marginals of
    `reference` (.model, .vocab_size, .tokenizer); returns those marginals."""
    origins = [r["origins"] for r in results]
    assert all(o[0] == coordinator_pb2.TOKEN_ORIGIN_TARGET for o in origins)
    speculative = {coordinator_pb2.TOKEN_ORIGIN_ACCEPTED, coordinator_pb2.TOKEN_ORIGIN_RECOVERED,
                   coordinator_pb2.TOKEN_ORIGIN_BONUS}
    assert all(o[1] in speculative for o in origins)
    if check_acceptance:
        accepted = sum(o[1] == coordinator_pb2.TOKEN_ORIGIN_ACCEPTED for o in origins)
        assert 0.05 * N < accepted < 0.95 * N, "the test needs both accepted and rejected draft tokens"
    exact = exact_marginals(reference, reference.tokenizer(PROMPT).input_ids, depth=max(positions) + 1, params=params)
    for position in positions:
        samples = [r["token_ids"][position] for r in results]
        assert pvalue(samples, exact[position]) > 1e-3, f"token {position + 1}"
    return exact


@pytest.mark.parametrize("overlap,draft_name,k,max_tokens,positions",
                         [(False, "draft_noisy", 2, 4, (1, 2)), (True, "draft_close", 1, 5, (1, 2, 3))],
                         ids=["plain", "overlap"])
async def test_speculative_tokens_follow_the_target_distribution(tiny, overlap, draft_name, k, max_tokens, positions):
    """Plain: the noisy draft exercises acceptance and the residual. Overlap: with k=1 and 5 tokens,
    round 2's proposal is drafted during round 1's verification from an assumed verdict (accepted
    or not, then one of the draft's 2 most likely tokens there). A branch holds only when the
    sampled verdict is the one it assumed; using one whose assumption failed would draw the next
    tokens from the wrong context and distort their marginals."""
    results, held = await sample_many(tiny["target"], tiny[draft_name], k, max_tokens, overlap)
    if overlap:
        assert 0.2 * N < held < 0.9 * N, f"{held} speculative rounds held: the test needs both outcomes"
    check_distribution(tiny, results, positions, check_acceptance=not overlap)


async def test_penalised_tokens_follow_the_target_distribution(tiny):
    """Presence and frequency penalties and a logit bias: draft and target process their logits
    identically, and the tokens follow the exact marginals of the target under those settings."""
    results, _ = await sample_many(tiny["target"], tiny["draft_noisy"], 2, 4, params=PENALISED)
    assert_follows(results, tiny["target"], (1, 2), params=PENALISED)


@pytest.mark.xdist_group("compiled_stack")  # one worker compiles the shared stack
async def test_compiled_tokens_follow_the_target_distribution(tiny, compiled_stack):
    """Both workers compiled (its draft is draft_noisy): the plain case's check."""
    results, _ = await sample_many(tiny["target"], tiny["draft_noisy"], 2, 4, stack=compiled_stack)
    check_distribution(tiny, results, (1, 2))


def check_distribution(tiny, results: list[dict], positions: tuple[int, ...], check_acceptance: bool = True) -> None:
    """The tokens follow the target's exact marginals, and this N has the power to reject the
    noisy draft's own marginal for token 2."""
    target = tiny["target"]
    exact = assert_follows(results, target, positions, check_acceptance=check_acceptance)
    prompt = target.tokenizer(PROMPT).input_ids
    draft_exact = exact_marginals(tiny["draft_noisy"], prompt, depth=2)[1]
    draft_like = np.random.default_rng(0).choice(
        list(draft_exact), size=N, p=np.array(list(draft_exact.values())) / sum(draft_exact.values()))
    target_support = exact[1]
    merged = {t: target_support.get(t, 1e-12) for t in set(target_support) | set(draft_exact)}
    assert pvalue(draft_like.tolist(), merged) < 1e-12
