"""The CPU paged-attention kernel against attention over each sequence's gathered context:
grouped heads, runs of several tokens of a sequence (verify windows, prefill chunks), scattered
and shared blocks, a sliding window, a logit soft-cap, bfloat16, and inside a compiled graph."""

from __future__ import annotations

import pytest
import torch

from splitspec.paged.kernels import cpu_paged_attention, paged_attention, parallel_threads

pytestmark = pytest.mark.skipif(not cpu_paged_attention(), reason="the paged kernel does not build here (no C++ compiler)")

BLOCK = 4
KV_HEADS, GROUPS, DIM = 2, 3, 16  # 6 query heads; DIM below one AVX-512 vector's 16 floats is covered by 12 below


def reference(query, keys, values, tables, lengths, new, scale, window=None, softcap=None):
    """Each sequence b's last new[b] tokens attend to its positions up to their own: query
    [T, heads, D] packed in sequence order -> [T, heads, D], in float64."""
    out, offset = [], 0
    for table, length, count in zip(tables, lengths, new):
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)])
        k = keys.reshape(-1, *keys.shape[2:])[slots].double().repeat_interleave(GROUPS, dim=1)  # [L, heads, D]
        v = values.reshape(-1, *values.shape[2:])[slots].double().repeat_interleave(GROUPS, dim=1)
        q = query[offset: offset + count].double()
        scores = torch.einsum("thd,lhd->htl", q, k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        positions = torch.arange(length - count, length).view(1, -1, 1)
        keys_at = torch.arange(length).view(1, 1, -1)
        allowed = keys_at <= positions
        if window:
            allowed &= keys_at > positions - window
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out.append(torch.einsum("htl,lhd->thd", weights, v))
        offset += count
    return torch.cat(out)


def case(dtype=torch.float32, dim=DIM, seed=0):
    generator = torch.Generator().manual_seed(seed)
    blocks = 40
    keys = torch.randn(blocks, BLOCK, KV_HEADS, dim, generator=generator).to(dtype)
    values = torch.randn(blocks, BLOCK, KV_HEADS, dim, generator=generator).to(dtype)
    order = torch.randperm(blocks - 1, generator=generator) + 1  # scattered blocks; 0 is the padding block
    lengths, new = [13, 1, 22, 7], [1, 1, 5, 7]  # decode steps, a verify window, a prefill chunk
    tables, used = [], 0
    for length in lengths:
        count = -(-length // BLOCK)
        tables.append(order[used: used + count].tolist())
        used += count
    tables[1] = tables[0][:1]  # a one-token sequence shares the first block of the first (a cached prefix)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    query = torch.randn(sum(new), KV_HEADS * GROUPS, dim, generator=generator).to(dtype)
    token_seq = torch.tensor([b for b, count in enumerate(new) for _ in range(count)])
    token_pos = torch.cat([torch.arange(length - count, length) for length, count in zip(lengths, new)])
    return query, keys, values, padded, token_seq, token_pos, tables, lengths, new


@pytest.mark.parametrize("window, softcap", [(None, None), (5, None), (None, 2.0), (3, 1.5)])
@pytest.mark.parametrize("dim", [DIM, 12, 32, 40, 64, 128])  # 32, 64, 128: the unrolled head sizes
def test_kernel_matches_attention_over_gathered_contexts(window, softcap, dim):
    query, keys, values, padded, token_seq, token_pos, tables, lengths, new = case(dim=dim)
    scale = dim ** -0.5
    out = paged_attention(query, keys, values, padded, token_seq, token_pos, scale, window, softcap)
    expected = reference(query, keys, values, tables, lengths, new, scale, window, softcap)
    assert out.shape == query.shape and out.dtype == query.dtype
    assert (out.double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("dim", [DIM, 32])
def test_kernel_in_bfloat16_matches_within_its_precision(dim):
    query, keys, values, padded, token_seq, token_pos, tables, lengths, new = case(dtype=torch.bfloat16, dim=dim)
    out = paged_attention(query, keys, values, padded, token_seq, token_pos, dim ** -0.5, None, None)
    expected = reference(query, keys, values, tables, lengths, new, dim ** -0.5)
    assert out.dtype == torch.bfloat16 and (out.double() - expected).abs().max() < 2e-2


def test_kernel_splits_its_runs_over_torchs_threads():
    """Built with OpenMP, so its at::parallel_for uses every torch thread, with the same result."""
    query, keys, values, padded, token_seq, token_pos, *_ = case(seed=3)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = paged_attention(query, keys, values, padded, token_seq, token_pos, DIM ** -0.5, None, None)
        torch.set_num_threads(2)
        assert parallel_threads("paged_attention") == 2
        shared = paged_attention(query, keys, values, padded, token_seq, token_pos, DIM ** -0.5, None, None)
        assert torch.equal(shared, alone)
    finally:
        torch.set_num_threads(previous)


def test_kernel_runs_inside_a_compiled_graph():
    query, keys, values, padded, token_seq, token_pos, tables, lengths, new = case()

    def step(query, keys, values, padded, token_seq, token_pos):
        return paged_attention(query * 2, keys, values, padded, token_seq, token_pos, DIM ** -0.5, None, None) + 1

    compiled = torch.compile(step, dynamic=True, fullgraph=True)
    out = compiled(query, keys, values, padded, token_seq, token_pos)
    expected = reference(query * 2, keys, values, tables, lengths, new, DIM ** -0.5) + 1
    assert (out.double() - expected).abs().max() < 1e-5
