"""How a text prompt becomes token ids: one rule for the coordinator, the gateway and /tokenize."""

from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """The tokenizer's encoding of `text`, with its special tokens (BOS for Llama-style
    tokenizers), except that a text which itself starts with the BOS token gets no second one: a
    decoded token prompt sent back as text (lm-eval's `tokenized_requests=False`) is scored as
    the tokens it was decoded from."""
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
    bos, bos_text = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
    if (add_special_tokens and bos is not None and bos_text and text.startswith(bos_text)
            and ids[:2] == [bos, bos]):
        del ids[0]
    return ids
