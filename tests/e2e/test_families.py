"""The model families people serve, each as a tiny random model over the byte tokenizer with a
noisy copy as its draft: greedy output through the whole stack is `transformers.generate` of the
target with eager attention (the reference implementation), at k = 1 and 4, over more tokens
than the sliding window where the family has one (Gemma2's attention and final soft-caps set
low enough to change the output); sampled tokens of Qwen2 and Gemma2 follow the eager model's
exact distribution."""

from __future__ import annotations

import pytest

from types import SimpleNamespace

import transformers

from splitspec.models import load_model
from splitspec.v1 import coordinator_pb2
from tests.e2e.test_sampling_distribution import assert_follows, sample_many
from tests.support import FAMILIES, SLIDING_WINDOW, collect, eager_generate, start_stack

PROMPTS = ("hello world", "The quick brown fox")
MAX_TOKENS = 3 * SLIDING_WINDOW
SLIDING = ("qwen2", "mistral", "gemma2", "gemma3")


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_family_greedy_output_is_the_target_alone(family, family_dirs):
    target_dir, draft_dir = family_dirs[family]
    target, draft = load_model(str(target_dir), "cpu", "float32"), load_model(str(draft_dir), "cpu", "float32")
    stack = await start_stack(target, draft, k=4, max_k=4)
    try:
        accepted = drafted = 0
        for prompt in PROMPTS:
            prompt_ids = target.tokenizer(prompt).input_ids
            expected = eager_generate(target_dir, prompt_ids, MAX_TOKENS)
            for k in (1, 4):
                result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
                    prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, k=k, ignore_eos=True))
                assert result["token_ids"] == expected, (family, prompt, k)
                accepted += result["last"].spec.accepted_tokens
                drafted += result["last"].spec.draft_tokens
        assert 0 < accepted < drafted, (family, accepted, drafted)  # both verdicts were exercised
    finally:
        await stack.stop()


@pytest.mark.parametrize("family,override", [*((f, {"sliding_window": 10_000}) for f in SLIDING),
                                             ("gemma2", {"attn_logit_softcapping": None})],
                         ids=[*SLIDING, "gemma2-softcap"])
def test_the_window_and_the_softcap_change_these_models_outputs(family, override, family_dirs):
    """Power of the identity test above: ignoring the window or the soft-cap gives other tokens."""
    target_dir, _ = family_dirs[family]
    prompt_ids = [1, *range(40, 45)]
    assert eager_generate(target_dir, prompt_ids, MAX_TOKENS) != eager_generate(target_dir, prompt_ids, MAX_TOKENS,
                                                                               **override)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
async def test_family_sampled_tokens_follow_the_eager_targets_distribution(family, family_dirs):
    target_dir, draft_dir = family_dirs[family]
    target, draft = load_model(str(target_dir), "cpu", "float32"), load_model(str(draft_dir), "cpu", "float32")
    results, _ = await sample_many(target, draft, k=2, max_tokens=4)
    eager = transformers.AutoModelForCausalLM.from_pretrained(target_dir, attn_implementation="eager").eval()
    assert_follows(results, SimpleNamespace(model=eager, vocab_size=target.vocab_size, tokenizer=target.tokenizer),
                   positions=(1, 2))
