"""Validation of a client's GenerateRequest into a GenerationRequest; errors name the field."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from coordinator.adaptive import AUTO_K
from splitspec.constraints import GrammarCompiler
from splitspec.convert import constraint_from_proto
from splitspec.errors import InvalidArgument, check_token_ids
from splitspec.limits import MAX_LOGPROBS
from splitspec.prompts import encode_prompt
from splitspec.sampling import SamplingParams, check_confidence
from splitspec.v1 import coordinator_pb2

DEFAULT_MAX_TOKENS = 16


@dataclass(slots=True, frozen=True)
class Limits:
    max_model_len: int   # the target's context
    vocab_size: int
    default_k: int   # AUTO_K with --k auto
    max_k: int
    default_draft_confidence: float = 0.0  # --draft-confidence
    eos_token_ids: frozenset[int] = frozenset()  # the target's, masked until min_tokens


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    k: int
    draft_confidence: float = 0.0  # proposals stop after a draft token less likely than this
    min_tokens: int = 0            # output tokens before a stop (token or string) may end the request
    num_prompt_logprobs: int | None = None  # the prompt tokens' logprobs, with this many top ones

    @property
    def constrained(self) -> bool:
        """A structured output: EOS, the only token a complete grammar allows, always ends it."""
        return self.params.constraint is not None


def _optional(message: Any, name: str, default: Any) -> Any:
    return getattr(message, name) if message.HasField(name) else default


def validate_request(message: coordinator_pb2.GenerateRequest, tokenizer: Any, limits: Limits,
                     grammars: GrammarCompiler | None = None) -> GenerationRequest:
    if message.prompt_token_ids:
        prompt = list(message.prompt_token_ids)
        check_token_ids("prompt_token_ids", prompt, limits.vocab_size)
    elif message.prompt:
        prompt = encode_prompt(tokenizer, message.prompt)
    else:
        raise InvalidArgument("prompt", "must not be empty")
    if len(prompt) >= limits.max_model_len:
        raise InvalidArgument(
            "prompt", f"is {len(prompt)} tokens; the target's context is {limits.max_model_len} tokens"
        )
    room = limits.max_model_len - len(prompt)
    if message.HasField("max_tokens"):
        max_tokens = message.max_tokens
        if max_tokens < 0:
            raise InvalidArgument("max_tokens", f"must be >= 0 (0: score the prompt only), got {max_tokens}")
        if max_tokens > room:
            raise InvalidArgument(
                "max_tokens",
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the target's "
                f"{limits.max_model_len}-token context",
            )
    else:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    if any(s == "" for s in message.stop):
        raise InvalidArgument("stop", "stop strings must not be empty")
    check_token_ids("stop_token_ids", message.stop_token_ids, limits.vocab_size)
    min_tokens = _optional(message, "min_tokens", 0)
    if not 0 <= min_tokens <= max_tokens:
        raise InvalidArgument("min_tokens", f"must be in [0, max_tokens = {max_tokens}], got {min_tokens}")
    ending = set(message.stop_token_ids) | (set() if message.ignore_eos else set(limits.eos_token_ids))
    params = SamplingParams(
        temperature=_optional(message, "temperature", 1.0),
        top_k=_optional(message, "top_k", 0),
        top_p=_optional(message, "top_p", 1.0),
        min_p=_optional(message, "min_p", 0.0),
        repetition_penalty=_optional(message, "repetition_penalty", 1.0),
        seed=_optional(message, "seed", secrets.randbits(63)),
        presence_penalty=_optional(message, "presence_penalty", 0.0),
        frequency_penalty=_optional(message, "frequency_penalty", 0.0),
        logit_bias=tuple(sorted(message.logit_bias.items())),
        min_tokens=min_tokens,
        min_tokens_banned=tuple(sorted(ending)) if min_tokens else (),
        num_prompt_tokens=len(prompt),
        num_logprobs=message.logprobs if message.HasField("logprobs") else None,
        constraint=constraint_from_proto(message.constraint),
    ).validate(limits.vocab_size)
    constraint = constraint_from_proto(message.constraint)
    if constraint is not None:
        if grammars is None:
            raise InvalidArgument("constraint", "structured outputs are not enabled on this coordinator")
    num_prompt_logprobs = _optional(message, "prompt_logprobs", None)
    if num_prompt_logprobs is not None and not 0 <= num_prompt_logprobs <= MAX_LOGPROBS:
        raise InvalidArgument("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {num_prompt_logprobs}")
    k = _optional(message, "k", limits.default_k)
    if k != AUTO_K or message.HasField("k"):
        _check_k(k, limits)
    draft_confidence = _optional(message, "draft_confidence", limits.default_draft_confidence)
    check_confidence("draft_confidence", draft_confidence)
    return GenerationRequest(
        request_id=message.request_id or uuid.uuid4().hex,
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        params=params,
        stop=tuple(message.stop),
        stop_token_ids=frozenset(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        k=k,
        draft_confidence=draft_confidence,
        min_tokens=min_tokens,
        num_prompt_logprobs=num_prompt_logprobs,
    )


def _check_k(k: int, limits: Limits) -> None:
    if not 0 <= k <= limits.max_k:
        raise InvalidArgument("k", f"must be in [0, {limits.max_k}] (0 = target only), got {k}")
