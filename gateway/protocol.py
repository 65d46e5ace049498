"""OpenAI request bodies (validated with pydantic) and the responses built from coordinator output.

Every response carries a `splitspec` object that OpenAI clients ignore: speculation stats, and in
streams the per-token ids, text pieces and origins (accepted / recovered / bonus / target).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT32_MAX = 2**31 - 1  # the coordinator's int32 fields (max_tokens, top_k, k, token ids)
NonNegative = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # checked against the vocabulary by the coordinator


class Speculative(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: NonNegative | None = None
    draft_confidence: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, logit_bias=null, ...) are accepted

    model: str
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None  # -1 or 0: off (vLLM and HF spellings)
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    speculative: Speculative | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        return value


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, str]] | None = None  # content parts: text ones only

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """A text model takes text parts only: an image, audio or file part is refused, not dropped."""
        if not isinstance(value, list):
            return value
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                    and set(part) == {"type", "text"}):
                raise ValueError('content parts must be {"type": "text", "text": "..."}; '
                                 f"this model takes text only, got {_describe(part)}")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""


def _describe(part: Any) -> str:
    if isinstance(part, dict):
        return f"a part of type {str(part.get('type'))[:40]!r} with keys {sorted(map(str, part))[:6]}"
    return repr(part)[:40]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def spec_report(spec: Any) -> dict[str, Any]:
    """A finished choice's speculation figures: every SpecStats field (the time split,
    per-position acceptance, payload bytes), plus its acceptance rate."""
    from google.protobuf.json_format import MessageToDict

    fields = MessageToDict(spec, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    fields["draft_payload_bytes"] = spec.draft_payload_bytes  # int64: a number, not a string
    return {**fields, **spec_stats(spec.draft_tokens, spec.accepted_tokens, spec.rounds)}


def spec_stats(draft_tokens: int, accepted_tokens: int, rounds: int) -> dict[str, Any]:
    return {
        "rounds": rounds,
        "draft_tokens": draft_tokens,
        "accepted_tokens": accepted_tokens,
        "acceptance_rate": round(accepted_tokens / draft_tokens, 4) if draft_tokens else None,
    }
