"""The gateway through the official `openai` client and raw HTTP, against a real running stack."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from gateway.completions import PLAIN_CHAT_SUFFIX
from splitspec.v1 import coordinator_pb2
from tests.gateway.conftest import API_KEY, MODEL, start_gateway, stop_gateway
from tests.support import collect, start_stack

R = coordinator_pb2.GenerateRequest


def client(url: str, key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


async def coordinator_tokens(stack, **fields) -> dict:
    return await collect(stack.stub, R(**fields))


async def test_completion_equals_the_coordinators_greedy_output(web, tiny):
    stack, url = web
    expected = await coordinator_tokens(stack, prompt="hello world", max_tokens=30, temperature=0.0, ignore_eos=True)
    reply = await client(url).completions.create(model=MODEL, prompt="hello world", max_tokens=30, temperature=0,
                                                 extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected["text"]
    assert reply.choices[0].finish_reason == "length"
    prompt_tokens = len(tiny["target"].tokenizer("hello world").input_ids)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 30)
    assert reply.usage.total_tokens == prompt_tokens + 30
    stats = reply.model_extra["splitspec"]
    assert stats["draft_tokens"] > 0 and 0 <= stats["accepted_tokens"] <= stats["draft_tokens"]
    assert stats["acceptance_rate"] == pytest.approx(stats["accepted_tokens"] / stats["draft_tokens"], abs=1e-4)


async def test_speculative_draft_confidence_reaches_the_coordinator(web):
    stack, url = web
    expected = await coordinator_tokens(stack, prompt="sure?", max_tokens=20, temperature=0.0, ignore_eos=True)
    reply = await client(url).completions.create(
        model=MODEL, prompt="sure?", max_tokens=20, temperature=0,
        extra_body={"ignore_eos": True, "speculative": {"k": 4, "draft_confidence": 1.0}})
    stats = reply.model_extra["splitspec"]
    assert reply.choices[0].text == expected["text"]
    assert stats["rounds"] > 0 and stats["draft_tokens"] == stats["rounds"]  # one-token proposals


async def test_streamed_completion_matches_and_reports_usage(web):
    stack, url = web
    expected = await coordinator_tokens(stack, prompt="stream me", max_tokens=25, temperature=0.0, ignore_eos=True)
    stream = await client(url).completions.create(model=MODEL, prompt="stream me", max_tokens=25, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    text, finish, usage, token_ids, origins, pieces = "", None, None, [], [], []
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
            token_ids += choice.model_extra["splitspec"]["token_ids"]
            origins += choice.model_extra["splitspec"]["origins"]
            pieces += choice.model_extra["splitspec"]["pieces"]
    assert text == expected["text"] and finish == "length"
    assert "".join(pieces) == text and len(pieces) == len(token_ids)
    assert token_ids == expected["token_ids"]
    assert set(origins) <= {"target", "accepted", "recovered", "bonus"} and "accepted" in origins
    assert usage.completion_tokens == 25 == len(token_ids)


async def test_chat_uses_the_plain_fallback_and_matches_the_coordinator(web, tiny):
    stack, url = web
    tokenizer = tiny["target"].tokenizer
    assert not getattr(tokenizer, "chat_template", None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = "system: Be brief.\nuser: Hi!\n" + PLAIN_CHAT_SUFFIX
    expected = await coordinator_tokens(stack, prompt_token_ids=tokenizer(rendered).input_ids, max_tokens=20,
                                        temperature=0.0, ignore_eos=True)
    reply = await client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.prompt_tokens == len(tokenizer(rendered).input_ids) and reply.usage.completion_tokens == 20
    stream = await client(url).chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    content, roles = "", []
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            roles.append(choice.delta.role)
    assert content == expected["text"] and roles[0] == "assistant"


async def test_n_2_runs_two_sequences(web):
    _, url = web
    reply = await client(url).completions.create(model=MODEL, prompt="twice", max_tokens=12, temperature=1.0, n=2,
                                                 seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.choices[0].text != reply.choices[1].text
    assert reply.usage.completion_tokens == 24
    again = await client(url).completions.create(model=MODEL, prompt="twice", max_tokens=12, temperature=1.0, n=2,
                                                 seed=7, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]


async def test_stop_sequence_is_not_emitted(web):
    _, url = web
    full = await client(url).completions.create(model=MODEL, prompt="stop here", max_tokens=30, temperature=0,
                                                extra_body={"ignore_eos": True})
    stop = full.choices[0].text[8:11]
    cut = await client(url).completions.create(model=MODEL, prompt="stop here", max_tokens=30, temperature=0,
                                               stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


async def test_models_health_and_metrics(web):
    _, url = web
    models = await client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/health")).json()["status"] == "ok"
        metrics = (await http.get("/metrics")).text
    for name in ("splitspec:spec_decode_num_drafts_total", "splitspec:spec_decode_num_draft_tokens_total",
                 "splitspec:spec_decode_num_accepted_tokens_total", "splitspec:spec_decode_num_accepted_tokens_per_pos",
                 "splitspec:time_to_first_token_seconds", "splitspec:e2e_request_latency_seconds",
                 "splitspec:time_per_output_token_seconds", 'splitspec:kv_blocks_total{worker="target"}',
                 'splitspec:request_success_total{finished_reason="length"}', "splitspec:num_requests_running"):
        assert name in metrics, name


BAD = [
    # (body or raw bytes, headers override, status, param)
    (b"{not json", None, 400, None),
    (b"[1, 2]", None, 400, None),
    (b"[" * 20_000, None, 400, None),  # a RecursionError (500) before the long fuzz campaign found it
    ({"model": MODEL}, None, 400, "prompt"),
    ({"model": MODEL, "prompt": "a", "temperature": "hot"}, None, 400, "temperature"),
    ({"model": MODEL, "prompt": "a", "temperature": -1}, None, 400, "temperature"),
    ({"model": MODEL, "prompt": "a", "top_p": 1.5}, None, 400, "top_p"),
    ({"model": MODEL, "prompt": "a", "top_k": -5}, None, 400, "top_k"),
    ({"model": MODEL, "prompt": "a", "min_p": 2}, None, 400, "min_p"),
    ({"model": MODEL, "prompt": "a", "repetition_penalty": 0}, None, 400, "repetition_penalty"),
    ({"model": MODEL, "prompt": "a", "max_tokens": -1}, None, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 1000}, None, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "n": 0}, None, 400, "n"),
    ({"model": MODEL, "prompt": "a", "stop": [""]}, None, 400, "stop"),
    ({"model": MODEL, "prompt": "a", "seed": -1}, None, 400, "seed"),
    ({"model": MODEL, "prompt": "a", "speculative": {"k": -1}}, None, 400, "speculative.k"),
    ({"model": MODEL, "prompt": "a", "speculative": {"k": 99}}, None, 400, "speculative.k"),
    ({"model": MODEL, "prompt": "a", "speculative": {"draft_confidence": 1.5}}, None, 400,
     "speculative.draft_confidence"),
    ({"model": MODEL, "prompt": ""}, None, 400, "prompt"),
    # past int32 (the coordinator's field width): a 500 before the fuzz suite found them
    ({"model": MODEL, "prompt": "a", "max_tokens": 2**63}, None, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_completion_tokens": 2**31}, None, 400, "max_completion_tokens"),
    ({"model": MODEL, "prompt": "a", "top_k": 9223372036854775808}, None, 400, "top_k"),
    ({"model": MODEL, "prompt": "a", "speculative": {"k": 2**40}}, None, 400, "speculative.k"),
    ({"model": MODEL, "prompt": [1, 2**31]}, None, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, 5000]}, None, 400, "prompt"),  # in int32, out of the vocabulary
    ({"model": "gpt-4", "prompt": "a"}, None, 404, "model"),
    ({"model": MODEL, "prompt": "a"}, {}, 401, None),
    ({"model": MODEL, "prompt": "a"}, {"Authorization": "Bearer wrong"}, 401, None),
    ({"model": MODEL, "prompt": "a" * 70_000}, None, 413, None),
]


@pytest.mark.parametrize("body,headers,status,param", BAD, ids=[f"{s}-{p}-{i}" for i, (_, _, s, p) in enumerate(BAD)])
async def test_bad_requests_get_openai_errors(web, body, headers, status, param):
    _, url = web
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"} if headers is None else \
        {"Content-Type": "application/json", **headers}
    async with httpx.AsyncClient(base_url=url) as http:
        reply = await http.post("/v1/completions", content=content, headers=sent)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


async def test_chat_errors_name_nested_params(web):
    _, url = web
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        reply = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard"}]})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages.0.role"
        reply = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
        # found by the long fuzz campaign: a non-string text part was a 500, an image part was dropped
        for part in ({"type": "text", "text": 5}, {"type": "image_url", "image_url": {"url": "x"}}, "hi"):
            reply = await http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, part]}]})
            assert reply.status_code == 400, reply.text
            assert reply.json()["error"]["param"] == "messages.0.content", reply.text
        reply = await http.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]})
        assert reply.status_code == 200, reply.text


async def test_disconnect_frees_the_sequence_within_a_round(web):
    stack, url = web
    engine = stack.target.state
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        async with http.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": "long story", "max_tokens": 140, "stream": True,
                "extra": None, "ignore_eos": True}) as reply:
            events = reply.aiter_lines()
            seen = 0
            async for line in events:
                if line.startswith("data: {"):
                    seen += 1
                if seen == 2:
                    break
            assert len(engine.sequences) == 1 and engine.blocks.num_free_blocks < engine.blocks.num_blocks
    for _ in range(100):  # a round takes a few ms here; allow scheduling slack
        if not engine.sequences and engine.blocks.num_free_blocks == engine.blocks.num_blocks:
            break
        await asyncio.sleep(0.02)
    assert engine.sequences == {} and engine.blocks.num_free_blocks == engine.blocks.num_blocks


async def test_mid_stream_failure_sends_an_error_event_then_done(tiny):
    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=4)
    server, task, url = await start_gateway(stack.coordinator.address, tiny["target"].tokenizer)
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            async with http.stream("POST", "/v1/completions", json={
                    "model": MODEL, "prompt": "doomed", "max_tokens": 140, "stream": True, "ignore_eos": True}) as reply:
                assert reply.status_code == 200
                lines = []
                async for line in reply.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        if len(lines) == 1:
                            await stack.target.stop(0)  # the target dies mid-generation
        assert lines[-1] == "[DONE]"
        error = json.loads(lines[-2])["error"]
        assert error["code"] == "unavailable" and error["message"]
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/health")).status_code == 503
    finally:
        await stop_gateway(server, task)
        await stack.coordinator.stop(0)
        if stack.draft:
            await stack.draft.stop(0)


async def test_health_is_503_when_the_coordinator_is_down(tiny):
    from tests.support import free_port

    server, task, url = await start_gateway(f"127.0.0.1:{free_port()}", tiny["target"].tokenizer)
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            assert (await http.get("/health")).status_code == 503
            reply = await http.post("/v1/completions", json={"model": MODEL, "prompt": "a"})
        assert reply.status_code == 503 and reply.json()["error"]["type"] == "service_unavailable"
    finally:
        await stop_gateway(server, task)
