"""Structured-output constraints, on xgrammar: a request's grammar (JSON schema, any JSON object,
regex, EBNF), compiled once per vocabulary, and each sequence's matcher, which says which tokens may
follow a given output.

A `Matcher` follows whatever output it is asked about: it rolls back to the common prefix with the
tokens it last consumed and accepts the rest. So a worker asks for the mask at any position (a
draft position, an overlap branch, each of a verify's k + 1 positions) without tracking state, and
a rejected proposal rolls back by itself on the next question. The mask is applied in
`splitspec.sampling.process_logits`, by draft and target alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from splitspec.errors import InvalidArgument

KINDS = ("json_schema", "json_object", "regex", "grammar")
MAX_CONSTRAINT_CHARS = 65536
MAX_REPETITION = 10000  # a{n} compiles in time linear in n (nested: their product): larger ones stall a worker
_REPETITION = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+: ")  # xgrammar's "[time] file.cc:line: " before its message


@dataclass(slots=True, frozen=True)
class ConstraintSpec:
    """kind: one of KINDS; value: the schema (JSON text), the regex or the EBNF grammar."""

    kind: str
    value: str = ""

    @property
    def field(self) -> str:
        return f"constraint.{self.kind}"


@dataclass(slots=True)
class GrammarCompiler:
    """Compiles constraints for one vocabulary (the worker's served width), with xgrammar's cache."""

    tokenizer: Any
    vocab_size: int
    stop_token_ids: tuple[int, ...]
    _compiler: Any = None

    def compile(self, spec: ConstraintSpec) -> Any:
        import xgrammar as xgr

        if len(spec.value) > MAX_CONSTRAINT_CHARS:
            raise InvalidArgument(spec.field, f"is {len(spec.value)} characters; at most {MAX_CONSTRAINT_CHARS}")
        repeats = sum(int(n) for match in _REPETITION.finditer(spec.value) for n in match.groups() if n)
        if repeats > MAX_REPETITION:  # summed: nested counts multiply
            raise InvalidArgument(spec.field, f"has repetition counts summing to {repeats}; at most {MAX_REPETITION}")
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=list(self.stop_token_ids) or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        try:
            if spec.kind == "json_schema":
                json.loads(spec.value)
                return self._compiler.compile_json_schema(spec.value, any_whitespace=False)
            if spec.kind == "json_object":  # an object (the builtin JSON grammar allows any value)
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.value)
            if spec.kind == "grammar":
                return self._compiler.compile_grammar(spec.value)
        except Exception as exc:  # noqa: BLE001 - xgrammar reports bad input as several exception types
            reason = _LOG_PREFIX.sub("", str(exc).strip())
            raise InvalidArgument(spec.field, f"cannot be compiled: {reason[:400]}") from exc
        raise InvalidArgument("constraint", f"kind must be one of {KINDS}, got {spec.kind!r}")

    def matcher(self, spec: ConstraintSpec) -> "Matcher":
        return Matcher(self.compile(spec), self.vocab_size)

    @classmethod
    def for_model(cls, loaded: Any) -> "GrammarCompiler":
        """For a worker's LoadedModel: its tokenizer, served width and EOS ids."""
        return cls(loaded.tokenizer, loaded.vocab_size, tuple(loaded.eos_token_ids))


def output_of(token_ids: Sequence[int], num_prompt_tokens: int) -> list[int]:
    """The output part of a sequence, which the grammar constrains."""
    return list(token_ids[num_prompt_tokens:])


@dataclass(slots=True)
class Matcher:
    """One sequence's grammar state, following the output it is asked about."""

    compiled: Any
    vocab_size: int
    consumed: list[int] = field(default_factory=list)
    _matcher: Any = None
    _bitmask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(self.compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)

    def _follow(self, output: Sequence[int]) -> bool:
        """Bring the matcher to the state after `output`; False when the grammar refuses it."""
        common = 0
        limit = min(len(self.consumed), len(output))
        while common < limit and self.consumed[common] == output[common]:
            common += 1
        if common < len(self.consumed):
            self._matcher.rollback(len(self.consumed) - common)
            del self.consumed[common:]
        for token in output[common:]:
            if self._matcher.is_terminated() or not self._matcher.accept_token(int(token)):
                return False
            self.consumed.append(int(token))
        return True

    def allowed(self, output: Sequence[int]) -> torch.Tensor | None:
        """[vocab] bool: the tokens that may follow `output`; None when the grammar refuses `output`
        itself or has ended with it (no valid sequence goes on from there)."""
        if not self._follow(output) or self._matcher.is_terminated():
            return None
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bits = self._bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)
        return (bits & 1).bool().view(-1)[: self.vocab_size]

    def allowed_rows(self, output: Sequence[int], proposal: Sequence[int]) -> torch.Tensor:
        """[len(proposal) + 1, vocab] bool: row i after output + proposal[:i]. Rows past a proposed
        token the grammar refuses allow everything: that token has probability 0 under the masked
        target, so it is rejected and no later row is ever used."""
        rows = torch.ones(len(proposal) + 1, self.vocab_size, dtype=torch.bool)
        prefix = list(output)
        for i in range(len(proposal) + 1):
            row = self.allowed(prefix)
            if row is None:
                break
            rows[i] = row
            if i < len(proposal):
                prefix.append(proposal[i])
        return rows

    def is_complete(self, output: Sequence[int]) -> bool:
        """Whether `output` ends the grammar (its stop token accepted)."""
        return self._follow(output) and self._matcher.is_terminated()
