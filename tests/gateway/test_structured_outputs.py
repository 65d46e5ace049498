"""Structured outputs and tool calls on the HTTP routes, through the `openai` client: each field
gives output that follows its grammar, the same tokens as the gRPC API with that grammar, and a
malformed grammar or a tool choice the server cannot honour is a 400 naming the field."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from splitspec.v1 import common_pb2, coordinator_pb2
from tests.gateway.conftest import API_KEY, MODEL, start_gateway, stop_gateway
from tests.support import collect, start_stack

SCHEMA = {"type": "object", "properties": {
    "mood": {"enum": ["happy", "sad"]}, "age": {"type": "integer", "minimum": 0, "maximum": 9},
    "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"],
            "additionalProperties": False}},
    "required": ["mood", "age", "pet"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                                    "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
CHAT = [{"role": "user", "content": "Tell me."}]


@pytest.fixture(scope="module")
async def api(tiny):
    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=4, max_k=8, overlap=True)
    server, task, url = await start_gateway(stack.coordinator.address, tiny["target"].tokenizer)
    yield stack, url
    await stop_gateway(server, task)
    await stack.stop()


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


def valid(value: dict) -> bool:
    return (set(value) == {"mood", "age", "pet"} and value["mood"] in ("happy", "sad") and 0 <= value["age"] <= 9
            and value["pet"] == {"kind": value["pet"]["kind"]} and value["pet"]["kind"] in ("cat", "dog"))


async def test_json_schema_response_format_on_both_routes_is_the_grpc_apis_output(api, tiny):
    stack, url = api
    schema_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    reply = await client(url).completions.create(model=MODEL, prompt="hello", max_tokens=60, temperature=0,
                                                 extra_body={"response_format": schema_format})
    assert reply.choices[0].finish_reason == "stop" and valid(json.loads(reply.choices[0].text))
    direct = await collect(stack.stub, coordinator_pb2.GenerateRequest(
        prompt="hello", max_tokens=60, temperature=0.0, constraint=common_pb2.Constraint(json_schema=json.dumps(SCHEMA))))
    assert direct["text"] == reply.choices[0].text
    chat = await client(url).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=60, temperature=0.7,
                                                     seed=1, response_format=schema_format, n=3)
    assert all(c.finish_reason == "stop" and valid(json.loads(c.message.content)) for c in chat.choices)


async def test_json_object_regex_choice_and_grammar(api):
    _, url = api
    reply = await client(url).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=80, temperature=0,
                                                      response_format={"type": "json_object"})
    text = reply.choices[0].message.content
    assert text.startswith("{") and (reply.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    cases = [({"regex": r"[a-c]{3}-[0-9]{2}"}, lambda t: re.fullmatch(r"[a-c]{3}-[0-9]{2}", t)),
             ({"choice": ["yes", "no", "maybe (later)"]}, lambda t: t in ("yes", "no", "maybe (later)")),
             ({"grammar": 'root ::= "x" ("ab" | "cd")+ "!"'}, lambda t: re.fullmatch(r"x(ab|cd)+!", t))]
    for constraint, check in cases:
        for temperature in (0, 1.0):
            reply = await client(url).completions.create(
                model=MODEL, prompt="hello", max_tokens=40, temperature=temperature, seed=3,
                extra_body={"structured_outputs": constraint})
            choice = reply.choices[0]
            assert choice.finish_reason == "stop" and check(choice.text), (constraint, choice.text)


async def test_a_named_tool_gives_tool_calls_streamed_and_not(api):
    _, url = api
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = await client(url).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=60, temperature=0,
                                                      tools=[WEATHER, TIME], tool_choice=choice)
    answer = reply.choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    (call,) = answer.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "Oslo") and 1 <= arguments["days"] <= 7
    stream = await client(url).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=60, temperature=0,
                                                       tools=[WEATHER, TIME], tool_choice=choice, stream=True)
    pieces, names, finish = [], [], None
    async for chunk in stream:
        for c in chunk.choices:
            assert not c.delta.content
            for delta in c.delta.tool_calls or []:
                names += [delta.function.name] if delta.function.name else []
                pieces.append(delta.function.arguments or "")
            finish = c.finish_reason or finish
    assert names == ["get_weather"] and "".join(pieces) == call.function.arguments and finish == "tool_calls"


async def test_required_tool_choice_gives_calls_to_the_given_tools(api):
    _, url = api
    for stream in (False, True):
        for temperature in (0, 1.0):
            request = dict(model=MODEL, messages=CHAT, max_tokens=120, temperature=temperature, seed=5,
                           tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
            if stream:
                calls, finish = [], None
                async for chunk in await client(url).chat.completions.create(**request, stream=True):
                    for c in chunk.choices:
                        calls += c.delta.tool_calls or []
                        finish = c.finish_reason or finish
            else:
                reply = await client(url).chat.completions.create(**request)
                calls, finish = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
            assert finish == "tool_calls" and len(calls) == 1  # parallel_tool_calls false: one call
            arguments = json.loads(calls[0].function.arguments)
            assert calls[0].function.name in ("get_weather", "get_time")
            assert set(arguments) == ({"city", "days"} if calls[0].function.name == "get_weather" else {"zone"})


async def post(url: str, route: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        return await http.post(route, json=body)


@pytest.mark.parametrize("route,fields,param", [
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}},
     "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/completions", {"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"sparkle": "a"}}, "structured_outputs.sparkle"),
    ("/v1/completions", {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "structured_outputs"),
    ("/v1/chat/completions", {"tools": [WEATHER]}, "tool_choice"),  # "auto", the default
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("/v1/chat/completions", {"tools": [{**WEATHER, "function": {"name": "bad", "parameters": {"type": "wat"}}}],
                              "tool_choice": "required"}, "tools"),
])
async def test_bad_constraints_are_400s_naming_the_field(api, route, fields, param):
    stack, url = api
    base = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    body = {**base, **({"prompt": "hi"} if route == "/v1/completions" else {"messages": CHAT}), **fields}
    reply = await post(url, route, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.text
    assert not stack.target.state.sequences  # nothing reached the target


async def test_tools_with_tool_choice_none_answer_in_text(api):
    _, url = api
    reply = await client(url).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                                      tools=[WEATHER], tool_choice="none")
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")
