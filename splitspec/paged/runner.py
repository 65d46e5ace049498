"""Packed variable-length forward passes over the paged pool: one call runs many sequences'
new tokens (prefill chunks, verification windows, draft steps) together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from splitspec.paged.attention import PagedMetadata, use_paged_attention
from splitspec.paged.kv_pool import KVPool


@dataclass(slots=True)
class Chunk:
    """One sequence's part of a batch."""

    token_ids: list[int]    # new tokens, written at positions start .. start + len - 1
    start: int              # tokens already in the cache
    slots: list[int]        # pool slot of each new token
    block_table: list[int]  # the sequence's blocks, covering start + len tokens
    num_logits: int         # logits wanted for the last num_logits new tokens


class PagedRunner:
    def __init__(self, model: Any, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        self.device = next(model.parameters()).device
        use_paged_attention(model)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of whole blocks (src, dst) before they are written."""
        self.pool.copy_blocks(copies)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """Returns, per chunk, logits [num_logits, vocab] (float32, on the CPU)."""
        device, lengths = self.device, [len(c.token_ids) for c in chunks]
        total, max_q = sum(lengths), max(lengths)
        max_context = max(c.start + length for c, length in zip(chunks, lengths))
        positions = [torch.arange(c.start, c.start + length) for c, length in zip(chunks, lengths)]
        metadata = PagedMetadata(
            pool=self.pool,
            slot_mapping=torch.tensor([s for c in chunks for s in c.slots], dtype=torch.long, device=device),
            max_context=max_context,
        )
        if len(chunks) == 1:  # one sequence: its queries are the packed row as they are
            table = chunks[0].block_table
            if table == list(range(table[0], table[0] + len(table))):
                metadata.block_range = (table[0], len(table))  # consecutive blocks: a view, no gather
            else:
                metadata.block_tables = torch.tensor([table], dtype=torch.long, device=device)
            query_positions = positions[0].view(1, -1)
        else:
            query_positions = self._pack(metadata, positions, total, max_q)
            max_blocks = max(len(c.block_table) for c in chunks)
            metadata.block_tables = torch.tensor(
                [c.block_table + [0] * (max_blocks - len(c.block_table)) for c in chunks],
                dtype=torch.long, device=device)
        metadata.query_positions = query_positions.to(device)
        if max_q > 1 or len(chunks) > 1:  # one sequence's single new token sees all its keys: no mask
            mask = torch.arange(max_context).view(1, 1, -1) <= query_positions.unsqueeze(-1)
            metadata.mask = mask.unsqueeze(1).to(device)
        logit_rows: list[int] = []
        offset = 0
        for chunk, length in zip(chunks, lengths):
            logit_rows.extend(range(offset + length - chunk.num_logits, offset + length))
            offset += length
        input_ids = torch.tensor([[t for c in chunks for t in c.token_ids]], dtype=torch.long, device=device)
        out = self.model(
            input_ids=input_ids,
            position_ids=torch.cat(positions).unsqueeze(0).to(device),  # packed order
            attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device),  # unused: no dense mask built
            use_cache=False,
            paged=metadata,
            logits_to_keep=torch.tensor(logit_rows, dtype=torch.long, device=device),
        )
        logits = out.logits[0].float().cpu()
        return list(torch.split(logits, [c.num_logits for c in chunks]))

    def _pack(self, metadata: PagedMetadata, positions: list[torch.Tensor], total: int, max_q: int) -> torch.Tensor:
        """Index maps between the packed row [T] and the padded batch [B, max_q]; returns the
        padded query positions [B, max_q] (positions: each sequence's new token positions)."""
        query_index = torch.full((len(positions), max_q), total, dtype=torch.long)
        query_positions = torch.zeros((len(positions), max_q), dtype=torch.long)  # padding rows: position 0
        packed_index = torch.empty(total, dtype=torch.long)
        offset = 0
        for b, sequence_positions in enumerate(positions):
            length = len(sequence_positions)
            query_index[b, :length] = torch.arange(offset, offset + length)
            query_positions[b, :length] = sequence_positions
            packed_index[offset : offset + length] = torch.arange(b * max_q, b * max_q + length)
            offset += length
        metadata.query_index = query_index.to(self.device)
        metadata.packed_index = packed_index.to(self.device)
        return query_positions
