"""Paged attention gives the dense reference's logits across block boundaries, in packed batches,
with and without shared prefix blocks: through the CPU paged kernel and through gathered contexts."""

from __future__ import annotations

import pytest
import torch

from splitspec.paged.cache import CacheConfig, build_paged_cache
from splitspec.paged.runner import Chunk

TOLERANCE = 1e-4


@pytest.fixture(params=[True, False], ids=["kernel", "gather"])
def paged_kernel(request):
    return request.param


def dense(loaded, token_ids):
    with torch.inference_mode():
        return loaded.model(torch.tensor([token_ids])).logits[0].float()


def prefill_chunk(blocks, seq_id, tokens, num_logits):
    cached = blocks.allocate(seq_id, tokens)
    return cached, Chunk(tokens[cached:], cached, blocks.slots(seq_id, cached, len(tokens)),
                         list(blocks.tables[seq_id].block_ids), num_logits)


@pytest.mark.parametrize("model_name", ["target", "draft_other"])
def test_packed_prefill_and_extension_match_dense(tiny, model_name, paged_kernel):
    loaded = tiny[model_name]
    blocks, runner = build_paged_cache(loaded, CacheConfig(num_blocks=64, block_size=4), paged_kernel=paged_kernel)
    assert runner.paged_kernel == paged_kernel  # the kernel builds on this CPU
    generator = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 259, (n,), generator=generator).tolist() for n in (3, 10, 17, 30)]
    chunks = [prefill_chunk(blocks, f"s{i}", p, len(p))[1] for i, p in enumerate(prompts)]
    for prompt, logits in zip(prompts, runner.forward(chunks)):
        assert (logits - dense(loaded, prompt)).abs().max() <= TOLERANCE
    extensions = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    chunks = []
    for i, (prompt, extra) in enumerate(zip(prompts, extensions)):
        slots, copies = blocks.append_slots(f"s{i}", len(extra))
        chunks.append(Chunk(extra, len(prompt), slots, list(blocks.tables[f"s{i}"].block_ids), len(extra)))
    for prompt, extra, logits in zip(prompts, extensions, runner.forward(chunks)):
        reference = dense(loaded, prompt + extra)[-len(extra):]
        assert (logits - reference).abs().max() <= TOLERANCE


def test_single_token_steps_of_sequences_with_different_contexts(tiny, paged_kernel):
    """Decode steps of several sequences (one new token each) still mask each one's padding keys."""
    loaded = tiny["target"]
    blocks, runner = build_paged_cache(loaded, CacheConfig(num_blocks=64, block_size=4), paged_kernel=paged_kernel)
    prompts = [[1, 5, 6], [1] + list(range(30, 47)), [1, 9, 8, 7, 6, 5, 4]]
    runner.forward([prefill_chunk(blocks, f"s{i}", p, 1)[1] for i, p in enumerate(prompts)])
    chunks = []
    for i, prompt in enumerate(prompts):
        slots, _ = blocks.append_slots(f"s{i}", 1)
        chunks.append(Chunk([100 + i], len(prompt), slots, list(blocks.tables[f"s{i}"].block_ids), 1))
    for i, (prompt, logits) in enumerate(zip(prompts, runner.forward(chunks))):
        assert (logits - dense(loaded, prompt + [100 + i])[-1:]).abs().max() <= TOLERANCE


def test_shared_prefix_blocks_give_dense_logits(tiny, paged_kernel):
    loaded = tiny["target"]
    blocks, runner = build_paged_cache(loaded, CacheConfig(num_blocks=64, block_size=4), paged_kernel=paged_kernel)
    stem = [1] + list(range(100, 122))  # 23 tokens: 5 full blocks
    first = stem + [7, 8]
    _, chunk = prefill_chunk(blocks, "a", first, len(first))
    runner.forward([chunk])
    blocks.commit("a", first)
    second = stem + [9, 10, 11]
    cached, chunk = prefill_chunk(blocks, "b", second, len(second) - 20)
    assert cached == 20 and blocks.tables["b"].block_ids[:5] == blocks.tables["a"].block_ids[:5]
    (logits,) = runner.forward([chunk])
    assert (logits - dense(loaded, second)[20:]).abs().max() <= TOLERANCE
    blocks.fork("b", "c")  # c shares b's partial last block: its next write copies it first
    slots, copies = blocks.append_slots("c", 2)
    assert copies
    runner.pool.copy_blocks(copies)
    (logits,) = runner.forward([Chunk([3, 4], len(second), slots, list(blocks.tables["c"].block_ids), 2)])
    assert (logits - dense(loaded, second + [3, 4])[-2:]).abs().max() <= TOLERANCE
    slots, _ = blocks.append_slots("b", 1)
    (logits,) = runner.forward([Chunk([5], len(second), slots, list(blocks.tables["b"].block_ids), 1)])
    assert (logits - dense(loaded, second + [5])[-1:]).abs().max() <= TOLERANCE  # b unharmed by c's write


@pytest.mark.parametrize("scatter", [False, True])
def test_one_sequence_decodes_on_consecutive_or_scattered_blocks(tiny, scatter, paged_kernel):
    """A batch of one sequence attends through a view of consecutive blocks or a gather of scattered
    ones; single-token steps run without a mask. Both give the dense logits."""
    loaded = tiny["target"]
    blocks, runner = build_paged_cache(loaded, CacheConfig(num_blocks=64, block_size=4), paged_kernel=paged_kernel)
    if scatter:  # interleave another sequence so that this one's blocks are not consecutive
        blocks.allocate("other", [1, 2, 3, 4, 5])
    tokens = [1, 20, 30, 40, 50, 60]
    _, chunk = prefill_chunk(blocks, "s", tokens, 1)
    runner.forward([chunk])
    for step, token in enumerate([70, 80, 90, 100, 110, 120, 130]):
        if scatter:
            blocks.append_slots("other", 4)
        slots, _ = blocks.append_slots("s", 1)
        table = list(blocks.tables["s"].block_ids)
        (logits,) = runner.forward([Chunk([token], len(tokens), slots, table, 1)])
        tokens.append(token)
        assert (logits - dense(loaded, tokens)[-1:]).abs().max() <= TOLERANCE
    consecutive = table == list(range(table[0], table[0] + len(table)))
    assert consecutive != scatter and len(table) == 4
    slots, _ = blocks.append_slots("s", 3)  # a verify-like window of three tokens needs the mask
    (logits,) = runner.forward([Chunk([7, 8, 9], len(tokens), slots, list(blocks.tables["s"].block_ids), 3)])
    assert (logits - dense(loaded, tokens + [7, 8, 9])[-3:]).abs().max() <= TOLERANCE


@pytest.mark.real_models
def test_real_model_across_blocks(real, paged_kernel):
    loaded = real["target"]
    blocks, runner = build_paged_cache(loaded, CacheConfig(num_blocks=64, block_size=16), paged_kernel=paged_kernel)
    prompt = loaded.tokenizer("Once upon a time, there was a little girl named Lily. " * 4).input_ids
    _, chunk = prefill_chunk(blocks, "s", prompt, len(prompt))
    (logits,) = runner.forward([chunk])
    assert len(prompt) > 48 and (logits - dense(loaded, prompt)).abs().max() <= TOLERANCE
