"""OpenAI request bodies (validated with pydantic) and the responses built from coordinator output.

Every response carries a `splitspec` object that OpenAI clients ignore: speculation stats, and in
streams the per-token ids, text pieces and origins (accepted / recovered / bonus / target).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from gateway.structured import (
    NamedToolChoice,
    ResponseFormat,
    StructuredOutputs,
    Tool,
    ToolChoice,
    from_response_format,
    from_structured_outputs,
    required_tools_schema,
)
from splitspec.limits import MAX_LOGPROBS
from splitspec.v1 import common_pb2

INT32_MAX = 2**31 - 1  # the coordinator's int32 fields (max_tokens, top_k, k, token ids)
NonNegative = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # checked against the vocabulary by the coordinator


class Speculative(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: NonNegative | None = None
    draft_confidence: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False            # one usage-only chunk (choices: []) before [DONE]
    continuous_usage_stats: bool = False   # usage on every chunk (vLLM's)


Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
MAX_N = 128

# OpenAI (and common vLLM) fields splitspec does not implement, with the values that ask for
# nothing: any other value is a 400 naming the field, never silently ignored.
UNSUPPORTED_COMMON: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "prompt_logprobs": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False),
    "priority": (None, 0),
}
UNSUPPORTED_COMPLETIONS: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
}
UNSUPPORTED_CHAT: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
    "metadata": (None, {}),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "echo": (None, False),
    "continue_final_message": (None, False),
    "add_generation_prompt": (None, True),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None,),
}


def _neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    return any(value == a and type(value) is type(a) for a in allowed)


def _with_refused(base: type[BaseModel], name: str, fields: dict[str, tuple[Any, ...]]) -> type[BaseModel]:
    """`base` with each refused field declared (any value, default None), so `unsupported` sees it."""
    return create_model(name, __base__=base, **{field: (Any, None) for field in fields})


class SamplingFields(_with_refused(BaseModel, "_RefusedCommon", UNSUPPORTED_COMMON)):
    """Fields shared by /v1/completions and /v1/chat/completions. Every OpenAI field is declared:
    implemented, or listed in UNSUPPORTED_* and refused unless it asks for nothing. A field outside
    the OpenAI schema (an evaluation harness's extra generation kwargs) is ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None  # -1 or 0: off (vLLM and HF spellings)
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None  # token id (as a string) -> bias
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None  # only = n (every sequence is returned)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    speculative: Speculative | None = None
    user: Annotated[str, Field(max_length=256)] | None = None  # an end-user id: logged with the request
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None  # the same, OpenAI's newer name
    prompt_cache_key: Annotated[str, Field(max_length=1024)] | None = None  # a hint: prefix caching is automatic
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not (key.isascii() and key.isdigit() and int(key) <= INT32_MAX):
                raise ValueError(f"keys must be token ids (decimal strings), got {key[:40]!r}")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        """The first field asking for something not implemented: (param, message), or None."""
        for name, allowed in self.unsupported_fields().items():
            value = getattr(self, name, None)
            if not _neutral(value, allowed):
                return name, f"{name} is not supported by this server (accepted values: {list(allowed)})"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", f"best_of must equal n ({self.n}): every generated sequence is returned"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed with stream: true"
        asking = [name for name, constraint in self.constraints() if constraint is not None]
        if len(asking) > 1:
            return asking[1], f"one structured output per request: {asking[0]} and {asking[1]} both ask for one"
        return self._unsupported_combination()

    def constraints(self) -> list[tuple[str, common_pb2.Constraint | None]]:
        """(field, its constraint) for each field that can ask for a structured output."""
        return [("response_format", from_response_format(self.response_format) if self.response_format else None),
                ("structured_outputs", from_structured_outputs(self.structured_outputs)
                 if self.structured_outputs else None)]

    def constraint(self) -> tuple[str, common_pb2.Constraint] | None:
        """The request's structured output: the field that asks for it, and the grammar."""
        return next(((name, c) for name, c in self.constraints() if c is not None), None)

    def _unsupported_combination(self) -> tuple[str, str] | None:
        return None

    @property
    def num_logprobs(self) -> int | None:
        """Top logprobs per token the request asks for (None: no logprobs)."""
        return None

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Top logprobs per prompt token the request asks for (None: none)."""
        return None

    @classmethod
    def unsupported_fields(cls) -> dict[str, tuple[Any, ...]]:
        return UNSUPPORTED_COMMON


class CompletionRequest(_with_refused(SamplingFields, "_RefusedCompletions", UNSUPPORTED_COMPLETIONS)):
    prompt: str | list[str] | list[TokenId] | list[Annotated[list[TokenId], Field(min_length=1)]]
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None  # 0 with echo: score the prompt only
    echo: bool = False  # prepend the prompt text (and with logprobs its tokens' logprobs) to each choice
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        return value

    @classmethod
    def unsupported_fields(cls) -> dict[str, tuple[Any, ...]]:
        return {**UNSUPPORTED_COMMON, **UNSUPPORTED_COMPLETIONS}


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


class ChatCompletionRequest(_with_refused(SamplingFields, "_RefusedChat", UNSUPPORTED_CHAT)):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def _unsupported_combination(self) -> tuple[str, str] | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        choice = self.tool_choice
        if self.tools and choice in (None, "auto"):
            return "tool_choice", ('tool_choice "auto" (the default with tools) needs a model-specific tool '
                                   'parser this server does not have: use "required", a named function, or "none"')
        if choice not in (None, "none", "auto") and not self.tools:
            return "tool_choice", "tool_choice names a tool, but the request has no tools"
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools}:
            return "tool_choice", f"tool_choice names {choice.function.name!r}, which is not among the tools"
        return None

    @property
    def named_tool(self) -> Tool | None:
        if not isinstance(self.tool_choice, NamedToolChoice) or not self.tools:
            return None
        return next((t for t in self.tools if t.function.name == self.tool_choice.function.name), None)

    @property
    def calls_tools(self) -> bool:
        """The answer is tool calls: a named function, or "required"."""
        return bool(self.tools) and (self.named_tool is not None or self.tool_choice == "required")

    def constraints(self) -> list[tuple[str, common_pb2.Constraint | None]]:
        tools = None
        if self.calls_tools:
            named = self.named_tool
            if named is not None:
                schema = named.function.parameters or {"type": "object"}
            else:
                schema = required_tools_schema(self.tools, self.parallel_tool_calls is not False)
            tools = common_pb2.Constraint(json_schema=json.dumps(schema))
        return [*super().constraints(), ("tools", tools)]

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @classmethod
    def unsupported_fields(cls) -> dict[str, tuple[Any, ...]]:
        return {**UNSUPPORTED_COMMON, **UNSUPPORTED_CHAT}


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered as /v1/chat/completions renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[TokenId]


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
