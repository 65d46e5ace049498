"""OpenAI `logprobs` objects built from the coordinator's per-token TokenLogprobs.

Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, the sampled token always
among the top ones. Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}. Token
strings are each token decoded alone, as vLLM shows them; a chat entry's `bytes` are the token's
own (byte-fallback and byte-level pieces included, which decode alone to U+FFFD).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from coordinator.detokenizer import TextStream

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte fallback


@dataclass(slots=True)
class LogprobsBuilder:
    """One choice's logprobs, delta by delta; `text_offset` runs on across a stream's chunks."""

    tokenizer: Any
    chat: bool
    offset: int = 0
    _names: dict[int, str] = field(default_factory=dict)
    _byte_level: dict[str, int] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and type(backend.decoder).__name__ == "ByteLevel":  # GPT-2 style pieces
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_level = {char: byte for byte, char in bytes_to_unicode().items()}

    def name(self, token_id: int) -> str:
        if token_id not in self._names:
            self._names[token_id] = self.tokenizer.decode([token_id])
        return self._names[token_id]

    def build(self, token_ids: Sequence[int], entries: Sequence[Any], pieces: Sequence[str]) -> dict[str, Any]:
        """entries: one TokenLogprobs per token; pieces: each token's text in the choice."""
        if self.chat:
            return {"content": [self._chat_entry(t, e) for t, e in zip(token_ids, entries)]}
        offsets = []
        for piece in pieces:
            offsets.append(self.offset)
            self.offset += len(piece)
        return {
            "tokens": [self.name(t) for t in token_ids],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [self._top(t, e) for t, e in zip(token_ids, entries)],
            "text_offset": offsets,
        }

    def prompt(self, token_ids: Sequence[int], entries: Sequence[Any], echo: str) -> dict[str, Any]:
        """Completions' echo: the prompt's tokens, `null` for the first (nothing before it scores
        it), then one entry per later token; the output's offsets go on after the echoed `echo`."""
        text, pieces = TextStream(self.tokenizer, []), []
        for token in token_ids:
            text.add(token)
            pieces.append(text.delta(final=False))
        if pieces:
            pieces[-1] += text.delta(final=True)
        start, offsets = self.offset, []
        for piece in pieces:
            offsets.append(self.offset)
            self.offset += len(piece)
        self.offset = start + len(echo)
        return {
            "tokens": [self.name(t) for t in token_ids],
            "token_logprobs": [None, *(e.logprob for e in entries)],
            "top_logprobs": [None, *(self._top(t, e) for t, e in zip(token_ids[1:], entries))],
            "text_offset": offsets,
        }

    def _top(self, token_id: int, entry: Any) -> dict[str, float]:
        top = {self.name(t): v for t, v in zip(entry.top_token_ids, entry.top_logprobs)}
        top.setdefault(self.name(token_id), entry.logprob)
        return top

    def _chat_entry(self, token_id: int, entry: Any) -> dict[str, Any]:
        return {**self._chat_token(token_id, entry.logprob),
                "top_logprobs": [self._chat_token(t, v) for t, v in zip(entry.top_token_ids, entry.top_logprobs)]}

    def _chat_token(self, token_id: int, logprob: float) -> dict[str, Any]:
        name = self.name(token_id)
        return {"token": name, "logprob": logprob, "bytes": self._bytes(token_id, name)}

    def _bytes(self, token_id: int, name: str) -> list[int]:
        """The token's own bytes, also where they are part of a character and decode alone to U+FFFD."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and token_id not in self.tokenizer.all_special_ids:
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                return [int(match.group(1), 16)]
            if self._byte_level is not None and all(char in self._byte_level for char in piece):
                return [self._byte_level[char] for char in piece]
        return list(name.encode("utf-8", errors="replace"))


def merge(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The logprobs of a whole choice from its deltas' (None when none were asked for)."""
    if not parts:
        return None
    merged: dict[str, Any] = {key: [] for key in parts[0]}
    for part in parts:
        for key, values in part.items():
            merged[key].extend(values)
    return merged
