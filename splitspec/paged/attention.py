"""Attention through block tables, plugged into Hugging Face models as an attention function.

The model keeps its own projections, RoPE and MLPs; only the attention step changes: the new
tokens' K/V are written into the pool at their slots, and each sequence's queries attend to the
keys its block table points at (causally, by absolute position): on the CPU through the paged
kernel (`kernels.py`), which reads the blocks where they lie; elsewhere by gathering each
context and running SDPA. A batch packs many sequences' new tokens into one row of T tokens;
each may have a different length and context.
Each layer's own attention settings are honoured: a sliding window (Mistral, Qwen2/3 with
`use_sliding_window`, Gemma2/3's local layers) masks keys more than `sliding_window - 1`
positions before the query, as transformers' `sliding_window_overlay` does (the pool still keeps
them); a logit soft-cap (Gemma2) runs the attention as Gemma2's eager attention computes it.
Without paged metadata the function is plain SDPA (eager math where there is a soft-cap), so the
same model object still runs `generate` (used by tests as the dense reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

from splitspec.paged.kernels import paged_attention as kernel_attention
from splitspec.paged.kv_pool import KVPool

ATTENTION_NAME = "splitspec_paged"


@dataclass(slots=True)
class PagedMetadata:
    pool: KVPool
    slot_mapping: torch.Tensor     # [T] pool slot of each new token
    max_context: int               # longest context in the batch, new tokens included
    block_tables: torch.Tensor | None = None  # [B, max_blocks] padded with 0; or
    block_range: tuple[int, int] | None = None  # one sequence on consecutive blocks: (first, count)
    query_index: torch.Tensor | None = None   # [B, max_q] index into the packed tokens (T = padding row)
    packed_index: torch.Tensor | None = None  # [T] index into the flattened [B * max_q] queries
    mask: torch.Tensor | None = None          # [B, 1, max_q, max_context] key position <= query position;
                                              # None for one sequence with one new token
    query_positions: torch.Tensor | None = None  # [B, max_q] absolute position of each query
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # sliding window -> its mask
    token_seq: torch.Tensor | None = None  # [T] row of block_tables of each new token: the CPU kernel
    token_pos: torch.Tensor | None = None  # [T] absolute position of each new token (with token_seq)

    def mask_for(self, sliding_window: int | None) -> torch.Tensor | None:
        """The causal mask, narrowed to `sliding_window` keys per query where that excludes any."""
        if not sliding_window or self.max_context <= sliding_window:
            return self.mask
        if sliding_window not in self.window_masks:
            assert self.query_positions is not None
            keys = torch.arange(self.max_context, device=self.query_positions.device).view(1, 1, -1)
            queries = self.query_positions.unsqueeze(-1)  # [B, max_q, 1]
            self.window_masks[sliding_window] = ((keys <= queries) & (keys > queries - sliding_window)).unsqueeze(1)
        return self.window_masks[sliding_window]


def _context(cache: torch.Tensor, paged: PagedMetadata) -> torch.Tensor:
    """The keys or values each sequence attends to: [B, max_context, kv_heads, head_dim]."""
    _, block_size, kv_heads, head_dim = cache.shape
    if paged.block_range is not None:
        first, count = paged.block_range
        return cache[first : first + count].view(1, -1, kv_heads, head_dim)[:, : paged.max_context]
    assert paged.block_tables is not None
    batch = paged.block_tables.shape[0]
    return cache[paged.block_tables].reshape(batch, -1, kv_heads, head_dim)[:, : paged.max_context]


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
           scale: float | None, softcap: float | None) -> torch.Tensor:
    """queries: [B, heads, Q, D]; keys/values: [B, kv_heads, K, D]; mask: bool [B, 1, Q, K] or None
    -> [B, heads, Q, D]. SDPA, or with `softcap` the eager math of Gemma2 (scores soft-capped by
    tanh before the mask and an fp32 softmax)."""
    if softcap is None:
        return scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    groups = queries.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    scores = torch.matmul(queries, keys.transpose(2, 3)) * (queries.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(queries.dtype)
    return torch.matmul(weights, values)


def _dense(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, scaling: float | None, dropout: float, **kwargs: Any) -> tuple:
    """No paged metadata (a plain `generate`): SDPA as transformers runs it, eager math with a soft-cap."""
    softcap = kwargs.pop("softcap", None)
    if softcap is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if attention_mask is None:  # causal, new queries at the end of the keys
        q_len, k_len = query.shape[2], key.shape[2]
        positions = torch.arange(k_len - q_len, k_len, device=query.device).view(-1, 1)
        attention_mask = (torch.arange(k_len, device=query.device).view(1, -1) <= positions).view(1, 1, q_len, k_len)
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    return attend(query, key, value, attention_mask, scaling, softcap).transpose(1, 2), None


def paged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged: PagedMetadata | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query: [1, heads, T, head_dim]; key/value: [1, kv_heads, T, head_dim] -> [1, T, heads, head_dim]"""
    if paged is None:
        return _dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    layer = module.layer_idx
    k_cache, v_cache = paged.pool.keys[layer], paged.pool.values[layer]
    _, _, kv_heads, head_dim = k_cache.shape
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, paged.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, paged.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))
    if paged.token_seq is not None:  # the CPU kernel reads each sequence's blocks where they lie
        assert paged.block_tables is not None and paged.token_pos is not None
        out = kernel_attention(query[0].transpose(0, 1).to(k_cache.dtype), k_cache, v_cache, paged.block_tables,
                               paged.token_seq, paged.token_pos, head_dim ** -0.5 if scaling is None else scaling,
                               kwargs.get("sliding_window"), kwargs.get("softcap"))  # [T, heads, head_dim]
        return out.to(query.dtype).unsqueeze(0), None
    keys, values = _context(k_cache, paged), _context(v_cache, paged)
    heads = query.shape[1]
    if paged.query_index is None:  # one sequence: the packed row is its batch row
        queries = query
    else:
        packed_queries = query[0].transpose(0, 1)  # [T, heads, head_dim]
        padded = torch.cat([packed_queries, packed_queries.new_zeros(1, *packed_queries.shape[1:])])
        queries = padded[paged.query_index].transpose(1, 2)  # [B, heads, max_q, head_dim]
    out = attend(
        queries,
        keys.transpose(1, 2).to(queries.dtype),
        values.transpose(1, 2).to(queries.dtype),
        paged.mask_for(kwargs.get("sliding_window")),
        scaling,
        kwargs.get("softcap"),
    )  # [B, heads, max_q, head_dim]
    if paged.packed_index is None:
        return out.transpose(1, 2), None
    out = out.transpose(1, 2).reshape(-1, heads, head_dim)[paged.packed_index]  # [T, heads, head_dim]
    return out.unsqueeze(0), None


def use_paged_attention(model: Any) -> None:
    """Register the paged attention function with transformers and switch `model` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = ATTENTION_NAME
