"""Incremental detokenization with stop strings.

Text is decoded with a few prompt tokens as context (so leading spaces of SentencePiece pieces
survive) and held back while it ends in an incomplete UTF-8 sequence. Fast (Rust) tokenizers
decode through `tokenizers`' own DecodeStream, one call per token (about 4x cheaper); others
decode the context window twice per token. Text that could still grow into a stop string is
withheld from the stream; a matched stop string is never emitted.
"""

from __future__ import annotations

from typing import Any, Sequence

from tokenizers.decoders import DecodeStream

_CONTEXT_TOKENS = 5


class TextStream:
    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(stop)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._emitted = 0
        self.stopped = False
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream: DecodeStream | None = None
        if self._backend is not None:
            self._stream = DecodeStream(skip_special_tokens=True)
            for context_id in self._ids:  # context only: its text is not ours
                self._stream.step(self._backend, context_id)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _next_piece(self, token_id: int) -> str | None:
        """The text `token_id` completes, or None while it ends in an incomplete character."""
        if self._stream is not None:
            return self._stream.step(self._backend, token_id)
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]

    def add(self, token_id: int) -> bool:
        """Append one token; returns True when a stop string has been completed."""
        if self.stopped:
            return True
        piece = self._next_piece(token_id)
        if not piece:
            return False
        search_from = max(0, len(self.text) - self._holdback)
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def delta(self, final: bool) -> str:
        """Text not yet emitted; holds back a possible stop-string prefix unless `final`."""
        end = len(self.text) if final or self.stopped else max(self._emitted, len(self.text) - self._holdback)
        chunk = self.text[self._emitted : end]
        self._emitted = end
        return chunk
