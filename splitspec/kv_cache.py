"""Per-sequence KV cache behind a three-call interface: `extend`, `truncate`, `len`.

Both workers drive their model only through this interface, so the paged block-table cache
(batched across sequences) can replace this per-sequence Hugging Face `DynamicCache` without
touching the speculation logic.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


class SequenceKVCache:
    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self._model = model
        self._cache = DynamicCache(config=model.config)
        self._length = 0

    def __len__(self) -> int:
        return self._length

    @torch.inference_mode()
    def extend(self, token_ids: Sequence[int], logits_to_keep: int) -> torch.Tensor:
        """Run the model on `token_ids` after the cached prefix and append their KV.

        returns logits: [logits_to_keep, vocab] float32, for the last `logits_to_keep` tokens
        """
        device = self._model.device
        input_ids = torch.tensor([list(token_ids)], dtype=torch.long, device=device)
        positions = torch.arange(self._length, self._length + len(token_ids), device=device)
        out = self._model(
            input_ids=input_ids,
            past_key_values=self._cache,
            use_cache=True,
            position_ids=positions.unsqueeze(0),
            cache_position=positions,
            logits_to_keep=logits_to_keep,
        )
        self._length += len(token_ids)
        return out.logits[0, -logits_to_keep:].float().cpu()

    def truncate(self, length: int) -> None:
        """Drop cached positions at and after `length` (rollback of rejected tokens)."""
        if length < self._length:
            self._cache.crop(length - self._length)
            self._length = length
