"""Structured outputs and tool calls on the HTTP routes: the OpenAI and vLLM request fields that
ask for a grammar, turned into the one `Constraint` the coordinator takes, and generated tool-call
arguments turned back into OpenAI `tool_calls`.

- `response_format`: `{"type": "json_object"}`, or `{"type": "json_schema", "json_schema": {"schema": ...}}`.
- `structured_outputs` (vLLM's): exactly one of `json` (a schema), `json_object`, `regex`,
  `choice` (a list of strings) and `grammar` (EBNF).
- `tools` with `tool_choice` a named function (its arguments follow the function's parameters
  schema) or `"required"` (a JSON list of `{"name", "parameters"}` objects, one schema per tool,
  as vLLM builds it). `"auto"` needs a model-specific parser and is refused.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from splitspec.v1 import common_pb2


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object')
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = [name for name in ("json_", "json_object", "regex", "choice", "grammar")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, json_object, regex, choice and grammar")
        return self


class FunctionDefinition(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def _schema(value: Any) -> common_pb2.Constraint:
    return common_pb2.Constraint(json_schema=value if isinstance(value, str) else json.dumps(value))


def from_response_format(value: ResponseFormat) -> common_pb2.Constraint | None:
    if value.type == "json_object":
        return common_pb2.Constraint(json_object=True)
    if value.type == "json_schema":
        assert value.json_schema is not None
        return _schema(value.json_schema.schema_)
    return None


def from_structured_outputs(value: StructuredOutputs) -> common_pb2.Constraint:
    if value.json_ is not None:
        return _schema(value.json_)
    if value.json_object:
        return common_pb2.Constraint(json_object=True)
    if value.regex is not None:
        return common_pb2.Constraint(regex=value.regex)
    if value.choice is not None:
        return common_pb2.Constraint(regex="|".join(f"({re.escape(c)})" for c in value.choice))
    return common_pb2.Constraint(grammar=value.grammar or "")


def parameters_of(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def required_tools_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """`tool_choice: "required"`: a list of calls, each one tool's name and its parameters."""
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": parameters_of(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def tool_calls(text: str, named: str | None) -> list[dict[str, Any]] | None:
    """The OpenAI tool_calls in a generated text (None when it is not complete JSON): for a named
    function the text is its arguments; for "required", the list of calls."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    calls = [(named, text)] if named is not None else [(c["name"], json.dumps(c["parameters"])) for c in value]
    return [{"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
            for name, arguments in calls]


def answer_tool_calls(request: Any, text: str, finish_reason: str | None) -> list[dict[str, Any]] | None:
    """A finished chat choice's tool_calls, when the request asked for tool calls and the grammar
    completed (`stop`); None otherwise (the text stays the content, e.g. cut by max_tokens)."""
    if not getattr(request, "calls_tools", False) or finish_reason != "stop":
        return None
    named = request.named_tool
    return tool_calls(text, named.function.name if named is not None else None)


class ToolCallStream:
    """One streamed choice's tool_calls deltas. A named function streams its arguments as they
    are generated (the first delta carries the call's id and name); "required" sends its calls
    when the list is complete."""

    def __init__(self, request: Any) -> None:
        named = request.named_tool
        self.request, self.named = request, named.function.name if named is not None else None
        self.text, self.call_id = "", new_call_id()

    def delta(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """(the chunk's delta, its finish_reason)."""
        first, self.text = not self.text, self.text + text
        if self.named is not None:
            call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
            if first:
                call.update(id=self.call_id, type="function")
                call["function"]["name"] = self.named
            return {"tool_calls": [call] if text or first else []}, "tool_calls" if finish_reason == "stop" else finish_reason
        if finish_reason is None:
            return {}, None
        calls = answer_tool_calls(self.request, self.text, finish_reason)
        if calls is None:
            return {"content": self.text}, finish_reason
        return {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}, "tool_calls"
