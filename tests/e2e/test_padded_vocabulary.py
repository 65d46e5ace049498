"""A padded pair over one tokenizer (the Qwen2.5 case: 7B pads its embedding to 152064 rows, 0.5B
to 151936): the target's rows past the tokenizer's vocabulary score far above every real token,
yet greedy output equals the unpadded target alone and sampled tokens follow its exact
distribution, because those rows get probability 0 on both sides."""

from __future__ import annotations

import pytest

from splitspec.models import load_model
from splitspec.v1 import coordinator_pb2
from tests.e2e.test_greedy_identity import reference
from tests.e2e.test_sampling_distribution import assert_follows, sample_many
from tests.support import collect, real_model_dir, save_padded_copy, start_stack


def test_padded_rows_are_dropped_at_load(tiny):
    padded = tiny["target_padded"]
    assert padded.vocab_size == 259 and padded.info().vocab_size == 259
    assert padded.model.get_output_embeddings().weight.shape[0] == 259
    assert padded.model.get_input_embeddings().weight.shape[0] == 320  # the embedding is left as it is


async def test_padded_target_with_unpadded_draft_matches_the_unpadded_target(tiny):
    stack = await start_stack(tiny["target_padded"], tiny["draft_noisy"], k=4)
    try:
        for prompt in ("hello world", "padded rows"):
            expected = reference(tiny["target"], tiny["target"].tokenizer(prompt).input_ids, 40, stop_at_eos=False)
            for k in (1, 4):
                result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
                    prompt=prompt, max_tokens=40, temperature=0.0, k=k, ignore_eos=True))
                assert result["token_ids"] == expected, (prompt, k)
                assert result["last"].spec.accepted_tokens > 0
    finally:
        await stack.stop()


async def test_padded_pair_samples_the_unpadded_targets_distribution(tiny):
    results, _ = await sample_many(tiny["target_padded"], tiny["draft_noisy"], k=2, max_tokens=4)
    assert_follows(results, tiny["target"], positions=(1, 2))


@pytest.fixture(scope="module")
def real_padded(real, tmp_path_factory):
    """tinystories-260k padded to 576 rows, beside tinystories-xs at 512."""
    directory = save_padded_copy(real_model_dir() / "tinystories-260k", tmp_path_factory.mktemp("padded") / "t", 576)
    return load_model(str(directory), "cpu", "float32")


@pytest.mark.real_models
async def test_real_target_padded_to_576_rows_with_the_512_row_draft(real, real_padded):
    stack = await start_stack(real_padded, real["draft"], k=4)
    try:
        prompt = "Once upon a time"
        expected = reference(real["target"], real["target"].tokenizer(prompt).input_ids, 64, stop_at_eos=False)
        for k in (1, 4):
            result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
                prompt=prompt, max_tokens=64, temperature=0.0, k=k, ignore_eos=True))
            assert result["token_ids"] == expected, k
    finally:
        await stack.stop()
    results, _ = await sample_many(real_padded, real["draft"], k=2, max_tokens=4)
    assert_follows(results, real["target"], positions=(1, 2))
