"""Every OpenAI field the README's table lists: its effect, or its 400 naming it. Through the
official `openai` client where it can send the field, raw HTTP otherwise."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import splitspec
from gateway.protocol import UNSUPPORTED_CHAT, UNSUPPORTED_COMMON, UNSUPPORTED_COMPLETIONS
from splitspec.v1 import coordinator_pb2
from tests.gateway.conftest import API_KEY, MODEL, start_gateway, stop_gateway
from tests.support import collect, start_stack

R = coordinator_pb2.GenerateRequest
CHAT = [{"role": "user", "content": "Say something."}]
NOT_NEUTRAL = {"asks": "for something"}  # no refused field's neutral value


@pytest.fixture(scope="module")
async def api(tiny):
    """A stack and a gateway that knows the target's context, as `splitspec up` starts it."""
    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=4, max_k=8)
    server, task, url = await start_gateway(stack.coordinator.address, tiny["target"].tokenizer,
                                            max_model_len=tiny["target"].max_model_len, root="/models/tiny")
    yield stack, url
    await stop_gateway(server, task)
    await stack.stop()


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


async def post(url: str, route: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        return await http.post(route, json=body)


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hello world", "max_tokens": 8, "temperature": 0, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0, **fields}


REFUSED = ([("/v1/completions", f) for f in {**UNSUPPORTED_COMMON, **UNSUPPORTED_COMPLETIONS}]
           + [("/v1/chat/completions", f) for f in {**UNSUPPORTED_COMMON, **UNSUPPORTED_CHAT}])


@pytest.mark.parametrize("route,field", REFUSED, ids=[f"{r.split('/')[-1]}-{f}" for r, f in REFUSED])
async def test_a_refused_field_is_a_400_naming_it_and_its_neutral_values_pass(api, route, field):
    _, url = api
    base = completion if route == "/v1/completions" else chat
    reply = await post(url, route, base(**{field: NOT_NEUTRAL}))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter" and field in error["message"]
    allowed = {**UNSUPPORTED_COMMON, **UNSUPPORTED_COMPLETIONS, **UNSUPPORTED_CHAT}
    table = {**UNSUPPORTED_COMMON, **(UNSUPPORTED_COMPLETIONS if route == "/v1/completions" else UNSUPPORTED_CHAT)}
    assert table[field] == allowed[field] or field in ("logprobs",)
    for neutral in table[field]:
        reply = await post(url, route, base(**{field: neutral}))
        assert reply.status_code == 200, (field, neutral, reply.text)


@pytest.mark.parametrize("body,param", [
    (completion(best_of=2), "best_of"),
    (completion(n=2, best_of=3, temperature=1), "best_of"),
    (completion(stream_options={"include_usage": True}), "stream_options"),
    (completion(stream=True, stream_options={"include_usage": True, "sparkle": True}), "stream_options.sparkle"),
    (completion(n=129), "n"),
    (completion(presence_penalty=2.5), "presence_penalty"),
    (completion(frequency_penalty=-2.01), "frequency_penalty"),
    (completion(logit_bias={"abc": 1}), "logit_bias"),
    (completion(logit_bias={"5": 101}), "logit_bias.5"),
    (completion(logit_bias={"100000": 1}), "logit_bias"),  # outside the vocabulary
    (completion(min_tokens=9), "min_tokens"),  # more than max_tokens
    (completion(stop_token_ids=[100000]), "stop_token_ids"),
    (completion(prompt=[[1, 2], []]), "prompt"),
    (completion(prompt=[[1, 2], [100000]]), "prompt"),
    (chat(top_logprobs=3), "top_logprobs"),  # without logprobs: true
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (completion(logprobs=21), "logprobs"),
    (completion(max_tokens=-1), "max_tokens"),
    (chat(max_tokens=0), "max_tokens"),  # scoring (max_tokens 0) is a completions request
])
async def test_bad_values_are_a_400_naming_the_field(api, body, param):
    _, url = api
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = await post(url, route, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.text


async def test_fields_outside_the_openai_schema_are_ignored(api):
    _, url = api
    plain = await post(url, "/v1/completions", completion())
    extra = await post(url, "/v1/completions", completion(until=["\n\n"], do_sample=False, some_harness_kwarg=3))
    assert extra.status_code == 200 and extra.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


async def coordinator_text(stack, **fields) -> dict:
    return await collect(stack.stub, R(**fields))


async def test_penalties_and_bias_reach_both_routes_and_change_the_output(api, tiny):
    stack, url = api
    prompt_ids = tiny["target"].tokenizer("hello world").input_ids
    plain = await coordinator_text(stack, prompt="hello world", max_tokens=30, temperature=0.0, ignore_eos=True)
    first = plain["token_ids"][0]
    fields = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "logit_bias": {first: -100.0}}
    expected = await coordinator_text(stack, prompt="hello world", max_tokens=30, temperature=0.0, ignore_eos=True,
                                      **fields)
    assert expected["token_ids"] != plain["token_ids"] and expected["token_ids"][0] != first
    reply = await client(url).completions.create(
        model=MODEL, prompt="hello world", max_tokens=30, temperature=0, presence_penalty=1.5, frequency_penalty=0.5,
        logit_bias={str(first): -100}, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected["text"]
    assert reply.usage.prompt_tokens == len(prompt_ids)


async def test_min_tokens_and_stop_token_ids(api):
    stack, url = api
    plain = await coordinator_text(stack, prompt="hello world", max_tokens=30, temperature=0.0, ignore_eos=True)
    stop = plain["token_ids"][3]
    cut = await client(url).completions.create(
        model=MODEL, prompt="hello world", max_tokens=30, temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop]})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == plain["token_ids"].index(stop) + 1
    held = await client(url).completions.create(
        model=MODEL, prompt="hello world", max_tokens=30, temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop], "min_tokens": 10})
    assert held.usage.completion_tokens >= 10


async def test_token_id_batches_keep_their_order_and_are_used_as_given(api, tiny):
    stack, url = api
    tokenizer = tiny["target"].tokenizer
    prompts = [tokenizer("once upon", add_special_tokens=False).input_ids, tokenizer("the dog").input_ids]
    expected = [await coordinator_text(stack, prompt_token_ids=p, max_tokens=6, temperature=0.0, ignore_eos=True)
                for p in prompts]
    reply = await client(url).completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2,
                                                 extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [e["text"] for e in expected for _ in range(2)]
    assert reply.usage.prompt_tokens == sum(map(len, prompts))  # no BOS added to the first
    strings = await client(url).completions.create(model=MODEL, prompt=["once upon", "the dog"], max_tokens=6,
                                                   temperature=0, extra_body={"ignore_eos": True})
    assert strings.choices[1].text == expected[1]["text"]


async def test_echo_prepends_the_prompt(api):
    _, url = api
    plain = await client(url).completions.create(model=MODEL, prompt="echo this", max_tokens=5, temperature=0)
    echoed = await client(url).completions.create(model=MODEL, prompt="echo this", max_tokens=5, temperature=0,
                                                  echo=True)
    assert echoed.choices[0].text == "echo this" + plain.choices[0].text
    stream = await client(url).completions.create(model=MODEL, prompt="echo this", max_tokens=5, temperature=0,
                                                  echo=True, stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == echoed.choices[0].text


async def chunks(url: str, body: dict) -> list:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        reply = await http.post("/v1/completions", json=body)
    events = [line[6:] for line in reply.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_include_usage_is_one_usage_only_chunk_before_done(api):
    _, url = api
    got = await chunks(url, completion(max_tokens=12, n=2, stream=True, stream_options={"include_usage": True},
                                       ignore_eos=True))
    with_usage = [c for c in got if c.get("usage")]
    assert len(with_usage) == 1 and with_usage[0] is got[-1] and with_usage[0]["choices"] == []
    assert with_usage[0]["usage"]["completion_tokens"] == 24
    assert "usage" not in got[0] or got[0]["usage"] is None


async def test_continuous_usage_stats_count_up_on_every_chunk(api):
    _, url = api
    got = await chunks(url, completion(max_tokens=12, stream=True, ignore_eos=True,
                                       stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c["usage"]["completion_tokens"] for c in got if c["choices"]]
    assert len(counts) == len([c for c in got if c["choices"]]) and counts == sorted(counts) and counts[-1] == 12
    assert all(c["usage"]["prompt_tokens"] > 0 for c in got)


async def test_usage_reports_prefix_cache_hits(api):
    _, url = api
    prompt = "the same long prompt, " * 3
    first = await client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = await client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


async def test_n_up_to_128(api):
    _, url = api
    reply = await client(url).completions.create(model=MODEL, prompt="many", max_tokens=1, temperature=1, n=128,
                                                 seed=1)
    assert sorted(c.index for c in reply.choices) == list(range(128))


async def test_tokenize_detokenize_version_and_models(api, tiny):
    _, url = api
    tokenizer = tiny["target"].tokenizer
    reply = (await post(url, "/tokenize", {"model": MODEL, "prompt": "hello world"})).json()
    assert reply["tokens"] == tokenizer("hello world").input_ids and reply["count"] == len(reply["tokens"])
    assert reply["max_model_len"] == tiny["target"].max_model_len
    bare = (await post(url, "/tokenize", {"prompt": "hello world", "add_special_tokens": False})).json()
    assert bare["tokens"] == tokenizer("hello world", add_special_tokens=False).input_ids
    chat_ids = (await post(url, "/tokenize", {"messages": CHAT})).json()["tokens"]
    assert tokenizer.decode(chat_ids).endswith("assistant:")
    text = (await post(url, "/detokenize", {"tokens": bare["tokens"]})).json()["prompt"]
    assert text == tokenizer.decode(bare["tokens"])
    for route, body, param in (("/tokenize", {}, None), ("/tokenize", {"prompt": "a", "messages": CHAT}, None),
                               ("/detokenize", {"tokens": [10**6]}, "tokens"), ("/detokenize", {}, "tokens")):
        reply = await post(url, route, body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        assert (await http.get("/version")).json() == {"version": splitspec.__version__}
        model = (await http.get("/v1/models")).json()["data"][0]
    assert model["root"] == "/models/tiny" and model["max_model_len"] == tiny["target"].max_model_len


async def test_metrics_parse_and_count_tokens_latency_and_queue_time(api):
    _, url = api
    await client(url).completions.create(model=MODEL, prompt="measure me", max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True})
    async with httpx.AsyncClient(base_url=url) as http:
        exposition = (await http.get("/metrics")).text
    samples = {s.name: s.value for family in text_string_to_metric_families(exposition) for s in family.samples}
    assert samples["splitspec:generation_tokens_total"] >= 10
    assert samples["splitspec:prompt_tokens_total"] >= 2
    assert samples["splitspec:inter_token_latency_seconds_count"] >= 1
    assert samples["splitspec:request_queue_time_seconds_count"] >= 1


def reference_logprobs(loaded, prompt_ids: list[int], generated: list[int]):
    import torch

    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt_ids + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1: -1], dim=-1)


async def test_completion_logprobs_are_the_targets_and_stream_alike(api, tiny):
    _, url = api
    target = tiny["target"]
    reply = await client(url).completions.create(model=MODEL, prompt="hello world", max_tokens=20, temperature=0,
                                                 logprobs=3, extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    text = reply.choices[0].text
    ids = target.tokenizer(text, add_special_tokens=False).input_ids
    expected = reference_logprobs(target, target.tokenizer("hello world").input_ids, ids)
    assert len(logprobs.tokens) == 20 == len(ids)
    for i, token in enumerate(ids):
        assert logprobs.token_logprobs[i] == pytest.approx(float(expected[i, token]), abs=1e-4)
        # greedy: the sampled token is the most likely (byte tokens that decode alike share a key)
        assert 1 <= len(logprobs.top_logprobs[i]) <= 3 and logprobs.tokens[i] in logprobs.top_logprobs[i]
        assert max(logprobs.top_logprobs[i].values()) == pytest.approx(logprobs.token_logprobs[i], abs=1e-6)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert "".join(logprobs.tokens) == text
    stream = await client(url).completions.create(model=MODEL, prompt="hello world", max_tokens=20, temperature=0,
                                                  logprobs=3, stream=True, extra_body={"ignore_eos": True})
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None:
                for key in streamed:
                    streamed[key] += getattr(choice.logprobs, key)
    assert streamed["tokens"] == logprobs.tokens and streamed["text_offset"] == logprobs.text_offset
    assert streamed["token_logprobs"] == pytest.approx(logprobs.token_logprobs, abs=1e-6)


def stream_logprobs(chunks: list) -> dict:
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.logprobs is not None:
                for key in merged:
                    merged[key] += getattr(choice.logprobs, key)
    return merged


@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token-ids"])
async def test_echo_with_logprobs_scores_the_prompt_and_max_tokens_0_only_scores(api, tiny, as_ids):
    """lm-eval's loglikelihood request: echo, logprobs, max_tokens 1; and the scoring-only one."""
    import torch

    _, url = api
    target, text = tiny["target"], "hello world, once more"
    prompt_ids = target.tokenizer(text).input_ids
    prompt, echoed = (prompt_ids, target.tokenizer.decode(prompt_ids, skip_special_tokens=True)) if as_ids else (text, text)
    n = len(prompt_ids)
    with torch.inference_mode():
        logits = target.model(torch.tensor([prompt_ids])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)  # row i: the distribution of token i + 1
    greedy = int(expected[-1].argmax())
    for max_tokens in (1, 0):
        reply = await client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                     temperature=0, logprobs=2, echo=True)
        choice, lp = reply.choices[0], reply.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        scored = [*prompt_ids[1:], greedy][: n - 1 + max_tokens]
        for position, token in enumerate(scored, start=1):
            assert lp.token_logprobs[position] == pytest.approx(float(expected[position - 1, token]), abs=1e-4)
            assert lp.top_logprobs[position][lp.tokens[position]] == pytest.approx(lp.token_logprobs[position])
            assert len(lp.top_logprobs[position]) <= 3
        assert choice.text.startswith(echoed) and (max_tokens or choice.text == echoed)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        assert lp.text_offset[n:] == [len(echoed)][:max_tokens]
        assert "".join(lp.tokens[n:]) == choice.text[len(echoed):]
        if max_tokens == 0:
            assert choice.finish_reason == "length" and reply.usage.completion_tokens == 0
        assert reply.usage.prompt_tokens == n
        chunks = [c async for c in await client(url).completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=2, echo=True, stream=True)]
        streamed = stream_logprobs(chunks)
        assert streamed["tokens"] == lp.tokens and streamed["text_offset"] == lp.text_offset
        assert streamed["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


async def test_max_tokens_0_without_echo_is_empty(api):
    _, url = api
    reply = await client(url).completions.create(model=MODEL, prompt="hello", max_tokens=0, temperature=0)
    assert reply.choices[0].text == "" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 0


async def test_chat_logprobs_carry_tokens_bytes_and_top_logprobs(api):
    _, url = api
    reply = await client(url).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                                      logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert entry.token == "\ufffd" or entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    # the tokens' own bytes decode to the message text (the byte-fallback runs included)
    text = bytes(b for entry in content for b in entry.bytes).decode("utf-8", errors="replace")
    assert text == reply.choices[0].message.content
    plain = await client(url).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None
