"""Logprobs through the whole stack are the target's raw log-softmax at each emitted position,
whether the token came from prefill, a target-only round, an accepted draft token, a recovered
or a bonus token, with and without overlap."""

from __future__ import annotations

import pytest
import torch

from splitspec.v1 import coordinator_pb2
from tests.support import collect, start_stack

TOP = 5


def reference_logprobs(loaded, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """transformers' log-softmax of the target at each generated position: [len(generated), vocab]."""
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt_ids + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1: -1], dim=-1)


def check(result: dict, expected: torch.Tensor) -> None:
    responses = result["responses"]
    logprobs = [entry for r in responses for entry in r.logprobs]
    assert len(logprobs) == len(result["token_ids"])
    for position, (token, entry) in enumerate(zip(result["token_ids"], logprobs)):
        row = expected[position]
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4), position
        values, ids = row.topk(TOP)
        assert len(entry.top_token_ids) == TOP
        torch.testing.assert_close(torch.tensor(list(entry.top_logprobs)), values, atol=1e-4, rtol=0)
        assert set(entry.top_token_ids) == set(ids.tolist()) or values[-1] == values[-2]  # ties may swap


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
async def test_logprobs_are_the_targets_log_softmax_under_speculation(tiny, overlap, temperature):
    target = tiny["target"]
    stack = await start_stack(target, tiny["draft_noisy"], k=4, max_k=8, overlap=overlap)
    try:
        for k in (0, 1, 4):
            prompt_ids = target.tokenizer("hello world").input_ids
            responses = [r async for r in stack.stub.Generate(coordinator_pb2.GenerateRequest(
                prompt_token_ids=prompt_ids, max_tokens=30, temperature=temperature, k=k, ignore_eos=True,
                logprobs=TOP, seed=3, presence_penalty=0.5), timeout=120)]
            token_ids = [t for r in responses for t in r.token_ids]
            origins = {o for r in responses for o in r.origins}
            if k:
                assert coordinator_pb2.TOKEN_ORIGIN_ACCEPTED in origins
            check({"responses": responses, "token_ids": token_ids}, reference_logprobs(target, prompt_ids, token_ids))
    finally:
        await stack.stop()


async def test_no_logprobs_unless_asked_and_the_limit(tiny):
    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=4)
    try:
        result = await collect(stack.stub, coordinator_pb2.GenerateRequest(prompt="hi", max_tokens=5, temperature=0.0))
        assert not result["last"].logprobs
        zero = [r async for r in stack.stub.Generate(coordinator_pb2.GenerateRequest(
            prompt="hi", max_tokens=5, temperature=0.0, logprobs=0))]
        assert all(len(r.logprobs) == len(r.token_ids) and not any(e.top_token_ids for e in r.logprobs) for r in zero)
        import grpc
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stack.stub, coordinator_pb2.GenerateRequest(prompt="hi", max_tokens=5, logprobs=21))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("logprobs")
    finally:
        await stack.stop()


def prompt_reference(loaded, prompt_ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax of the target at the prompt's positions 0..n-2: [n - 1, vocab]."""
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt_ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)


def check_prompt(first: coordinator_pb2.GenerateResponse, prompt_ids: list[int], expected: torch.Tensor) -> None:
    assert list(first.prompt_token_ids) == prompt_ids
    assert len(first.prompt_logprobs) == len(prompt_ids) - 1
    for position, (token, entry) in enumerate(zip(prompt_ids[1:], first.prompt_logprobs)):
        assert entry.logprob == pytest.approx(float(expected[position, token]), abs=1e-4), position
        torch.testing.assert_close(torch.tensor(list(entry.top_logprobs)), expected[position].topk(TOP).values,
                                   atol=1e-4, rtol=0)


async def test_prompt_logprobs_score_the_prompt_also_from_a_warm_prefix_cache(tiny):
    target = tiny["target"]
    stack = await start_stack(target, tiny["draft_noisy"], k=4)
    try:
        prompt_ids = target.tokenizer("the quick brown fox jumps over the lazy dog " * 3).input_ids
        expected = prompt_reference(target, prompt_ids)
        plain = await collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt_token_ids=prompt_ids, max_tokens=6, temperature=0.0, ignore_eos=True))
        assert not plain["responses"][0].prompt_logprobs
        again = await collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt_token_ids=prompt_ids, max_tokens=1, temperature=0.0))
        assert again["last"].usage.cached_tokens > 0
        # the prompt's blocks are now in the prefix cache: scoring must compute them, not reuse them
        scored = await collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt_token_ids=prompt_ids, max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=TOP))
        check_prompt(scored["responses"][0], prompt_ids, expected)
        assert scored["last"].usage.cached_tokens == 0
        assert scored["token_ids"] == plain["token_ids"]  # and generation goes on as it would have
        only = await collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt_token_ids=prompt_ids, max_tokens=0, prompt_logprobs=TOP))
        assert len(only["responses"]) == 1 and not only["token_ids"]
        assert only["last"].finish_reason == "length" and only["last"].usage.completion_tokens == 0
        assert only["last"].usage.prompt_tokens == len(prompt_ids)
        check_prompt(only["responses"][0], prompt_ids, expected)
        single = await collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt_token_ids=prompt_ids[:1], max_tokens=0, prompt_logprobs=0))
        assert list(single["responses"][0].prompt_token_ids) == prompt_ids[:1]
        assert not single["responses"][0].prompt_logprobs  # the first token has nothing before it
    finally:
        await stack.stop()


@pytest.mark.parametrize("field,request_fields", [
    ("prompt_logprobs", {"prompt_logprobs": 21}),
    ("prompt_logprobs", {"prompt_logprobs": -1}),
    ("max_tokens", {"max_tokens": -1}),
])
async def test_prompt_logprobs_limits_name_the_field(tiny, field, request_fields):
    import grpc

    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=4)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stack.stub, coordinator_pb2.GenerateRequest(prompt="hi", **request_fields))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(field)
    finally:
        await stack.stop()
