"""Incremental detokenization with stop strings.

The streamed text always equals `tokenizer.decode` of the generated ids (decoded after a few
prompt tokens, so leading spaces of SentencePiece pieces survive), invalid UTF-8 included: it
decodes as U+FFFD, as `decode` does, and never fails a request. Each token decodes a short
window twice (the text before it and the text with it, as vLLM and TGI do) and adds the
difference. Text is held back while it could still change:
- while it ends in U+FFFD (an incomplete UTF-8 sequence that later bytes may complete);
- while the last token (special tokens aside: decode skips them) is a byte-fallback token
  (`<0xNN>`): `decode` turns a whole run of byte tokens into U+FFFD when any part of it is
  invalid, so even a valid byte ("B") may still become U+FFFD once the next byte arrives.
`finish` releases what is held at the end. Text that could still grow into a stop string is
withheld from the stream; a matched stop string is never emitted.
"""

from __future__ import annotations

import os.path
import re
from typing import Any, Sequence

_CONTEXT_TOKENS = 5
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 min_tokens: int = 0) -> None:
        self._tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)  # Rust tokenizer: no Python overhead
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))  # skipped by decode
        self._stop = tuple(stop)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._emitted = 0
        self._min_tokens = min_tokens  # stop strings are looked for once this many tokens were added (vLLM's)
        self._added = 0
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _in_byte_run(self) -> bool:
        """Whether the last token decode does not skip is a byte-fallback token."""
        last = next((t for t in reversed(self._ids) if t not in self._special_ids), None)
        return last is not None and self._is_byte_token(last)

    def _is_byte_token(self, token_id: int) -> bool:
        if self._backend is not None:
            piece = self._backend.id_to_token(token_id)
        else:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
        return piece is not None and _BYTE_TOKEN.fullmatch(piece) is not None

    def _take_window(self, final: bool) -> str | None:
        """The text the tokens after the read offset add, or None while it may still change."""
        if not final and self._in_byte_run():
            return None
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if not final and (len(full) <= len(prefix) or full.endswith(_REPLACEMENT)):
            return None
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(os.path.commonprefix([prefix, full])):]  # the prefix itself, unless decode rewrote it

    def _extend(self, piece: str | None) -> bool:
        if not piece or self.stopped:
            return self.stopped
        search_from = max(0, len(self.text) - self._holdback)
        self.text += piece
        if self._added < self._min_tokens:
            return False
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def add(self, token_id: int) -> bool:
        """Append one token; returns True when a stop string has been completed."""
        if self.stopped:
            return True
        self._ids.append(token_id)
        self._added += 1
        return self._extend(self._take_window(final=False))

    def finish(self) -> bool:
        """Release the text held back for tokens that may have changed it; returns `stopped`."""
        if self.stopped or self._read_offset == len(self._ids):
            return self.stopped
        return self._extend(self._take_window(final=True))

    def delta(self, final: bool) -> str:
        """Text not yet emitted; holds back a possible stop-string prefix unless `final` (which
        first releases everything held, see `finish`)."""
        if final:
            self.finish()
        end = len(self.text) if final or self.stopped else max(self._emitted, len(self.text) - self._holdback)
        chunk = self.text[self._emitted : end]
        self._emitted = end
        return chunk
