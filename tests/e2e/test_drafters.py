"""The self-speculative (layerskip) and n-gram drafters through the whole gRPC path: greedy output
is `transformers.generate` of the target, sampled tokens follow the target's exact distribution,
and n-gram lookup proposes on repeated text and nothing on repeat-free text."""

from __future__ import annotations

import asyncio

import pytest

from splitspec.sampling import SamplingParams
from splitspec.v1 import coordinator_pb2
from tests.e2e.test_greedy_identity import K_VALUES, _prompts, reference
from tests.e2e.test_sampling_distribution import exact_marginals, pvalue
from tests.support import collect, layerskip_draft, real_model_dir, start_stack

SKIP_TINY = [1]   # of the tiny target's 2 layers
SKIP_REAL = [3]   # of tinystories-260k's 5: the best greedy set `splitspec search-skip` found (README)
SAMPLING = SamplingParams(temperature=0.8, top_k=5)  # no repetition penalty: it would punish every repeat
N = 1000


async def _stack(method: str, target, target_dir, skip, k: int, ngram: tuple[int, int] = (1, 4)):
    if method == "layerskip":
        return await start_stack(target, layerskip_draft(target_dir, skip), k=k, max_k=8)
    return await start_stack(target, None, k=k, max_k=8, ngram=ngram)


@pytest.fixture
def models(request, tiny, tiny_dirs):
    """(target, its directory, the layers a layerskip draft skips) for 'tiny' or 'real'."""
    if request.param == "tiny":
        return tiny["target"], tiny_dirs["target"], SKIP_TINY
    real = request.getfixturevalue("real")
    return real["target"], real_model_dir() / "tinystories-260k", SKIP_REAL


@pytest.mark.parametrize("models", ["tiny", pytest.param("real", marks=pytest.mark.real_models)], indirect=True)
@pytest.mark.parametrize("method", ["layerskip", "ngram"])
async def test_greedy_output_is_the_target_alone(models, method):
    target, target_dir, skip = models
    stack = await _stack(method, target, target_dir, skip, k=4)
    prompts = ["hello world", "The quick brown fox"] if target.vocab_size != 512 else _prompts(2)
    try:
        for prompt in prompts:
            expected = reference(target, target.tokenizer(prompt).input_ids, 120, stop_at_eos=False)
            for k in K_VALUES:
                result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
                    prompt=prompt, max_tokens=120, temperature=0.0, k=k, ignore_eos=True))
                assert result["token_ids"] == expected, (method, prompt, k)
                spec = result["last"].spec
                assert spec.draft_tokens >= spec.accepted_tokens
                if method == "layerskip":
                    assert spec.rounds > 0 and spec.empty_proposals == 0
    finally:
        await stack.stop()


@pytest.mark.real_models
async def test_ngram_accepts_tokens_of_a_repeated_phrase(real):
    """Greedy TinyStories falls into a loop ("He liked to play with his toys. He liked ..."): once
    the phrase has occurred, lookup proposes its continuation and the target accepts it."""
    target = real["target"]
    stack = await start_stack(target, None, k=4, ngram=(1, 4))
    try:
        prompt = "Tom had a red ball"
        expected = reference(target, target.tokenizer(prompt).input_ids, 80, stop_at_eos=False)
        result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt=prompt, max_tokens=80, temperature=0.0, k=4, ignore_eos=True))
        assert result["token_ids"] == expected
        spec = result["last"].spec
        assert spec.accepted_tokens >= 30, spec  # most of the loop's 60 tokens come from accepted proposals
        assert spec.accepted_tokens / spec.draft_tokens > 0.5
        assert coordinator_pb2.TOKEN_ORIGIN_ACCEPTED in result["origins"]
    finally:
        await stack.stop()


@pytest.mark.real_models
async def test_ngram_proposes_nothing_without_repeats_and_output_is_unchanged(real):
    """'Once upon a time' and its first 24 greedy tokens repeat no bigram: every proposal is empty,
    every token is the target's, and the output is still `generate`'s."""
    target = real["target"]
    stack = await start_stack(target, None, k=4, ngram=(2, 4))
    try:
        prompt = "Once upon a time"
        expected = reference(target, target.tokenizer(prompt).input_ids, 24, stop_at_eos=False)
        result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt=prompt, max_tokens=24, temperature=0.0, k=4, ignore_eos=True))
        assert result["token_ids"] == expected
        spec = result["last"].spec
        assert spec.rounds == 0 and spec.draft_tokens == 0
        assert spec.empty_proposals == 22  # rounds 1..22; the 23rd has one token left and asks no draft
        assert spec.target_rounds == 23
        assert set(result["origins"]) == {coordinator_pb2.TOKEN_ORIGIN_TARGET}
    finally:
        await stack.stop()


def _sampling_prompt(method: str, target) -> list[int]:
    """layerskip: a short prompt. ngram: a prompt that repeats the target's own greedy
    continuation, so lookup proposes tokens the target is likely to sample after token 1."""
    if target.vocab_size != 512:
        base = target.tokenizer("abc").input_ids
        if method == "layerskip":
            return base
        loop = reference(target, base, 3, stop_at_eos=False)
        return base + loop * 3
    text = "Once upon a time" if method == "layerskip" else \
        "Once upon a time, there was a little girl named Lily. Once upon a time, there was a"
    return target.tokenizer(text).input_ids


@pytest.mark.parametrize("models", ["tiny", pytest.param("real", marks=pytest.mark.real_models)], indirect=True)
@pytest.mark.parametrize("method", ["layerskip", "ngram"])
async def test_sampled_tokens_follow_the_target_distribution(models, method):
    """k=2, 4 tokens: token 1 from prefill, tokens 2 and 3 from one verified round. Their empirical
    marginals over N seeds must fit the target's exact marginals (chi-square, p > 1e-3), as in
    test_sampling_distribution; n-gram proposals are one-hot q, so a rejection resamples p without
    the proposed token."""
    target, target_dir, skip = models
    prompt = _sampling_prompt(method, target)
    stack = await _stack(method, target, target_dir, skip, k=2)
    try:
        async def one(seed: int) -> dict:
            return await collect(stack.stub, coordinator_pb2.GenerateRequest(
                prompt_token_ids=prompt, max_tokens=4, k=2, seed=seed, ignore_eos=True,
                temperature=SAMPLING.temperature, top_k=SAMPLING.top_k))

        results = []
        for start in range(0, N, 50):
            results += await asyncio.gather(*(one(seed) for seed in range(start, min(N, start + 50))))
    finally:
        await stack.stop()
    second = [r["origins"][1] for r in results]
    accepted = second.count(coordinator_pb2.TOKEN_ORIGIN_ACCEPTED)
    recovered = second.count(coordinator_pb2.TOKEN_ORIGIN_RECOVERED)
    assert accepted > 0.02 * N and recovered > 0.02 * N, \
        f"the test needs accepted and rejected proposals ({accepted} accepted, {recovered} recovered)"
    exact = exact_marginals(target, prompt, depth=3, params=SAMPLING)
    for position in (1, 2):
        samples = [r["token_ids"][position] for r in results]
        assert pvalue(samples, exact[position]) > 1e-3, f"{method}: token {position + 1}"
