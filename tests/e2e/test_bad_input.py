"""Every bad input gets INVALID_ARGUMENT naming the field, and the server keeps serving."""

from __future__ import annotations

import math

import grpc
import pytest

from splitspec.v1 import coordinator_pb2
from tests.support import collect, start_stack

R = coordinator_pb2.GenerateRequest
CASES = [
    ("prompt", R(prompt="")),
    ("prompt", R(prompt="x" * 200)),                      # 201 tokens > the target's 160
    ("max_tokens", R(prompt="hi", max_tokens=-3)),
    ("max_tokens", R(prompt="hi", max_tokens=158)),       # 3 + 158 > 160
    ("temperature", R(prompt="hi", temperature=-0.5)),
    ("temperature", R(prompt="hi", temperature=math.nan)),
    ("temperature", R(prompt="hi", temperature=math.inf)),
    ("top_p", R(prompt="hi", top_p=0.0)),
    ("top_p", R(prompt="hi", top_p=1.5)),
    ("top_k", R(prompt="hi", top_k=-1)),
    ("min_p", R(prompt="hi", min_p=-0.1)),
    ("min_p", R(prompt="hi", min_p=1.1)),
    ("repetition_penalty", R(prompt="hi", repetition_penalty=0.0)),
    ("repetition_penalty", R(prompt="hi", repetition_penalty=-1.0)),
    ("stop", R(prompt="hi", stop=["ok", ""])),
    ("k", R(prompt="hi", k=-1)),
    ("k", R(prompt="hi", k=9)),                           # above --max-k 8
    ("prompt_token_ids", R(prompt_token_ids=[1, 5000])),
    ("stop_token_ids", R(prompt="hi", stop_token_ids=[-2])),
]


@pytest.fixture(scope="module")
async def stack(tiny):
    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=4, max_k=8)
    yield stack
    await stack.stop()


@pytest.mark.parametrize("field,request_message", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
async def test_invalid_argument_names_the_field(stack, field, request_message):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stack.stub, request_message)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:"), info.value.details()
    assert "Traceback" not in info.value.details()


async def test_server_still_serves_after_bad_requests(stack):
    result = await collect(stack.stub, R(prompt="hi", max_tokens=5, temperature=0.0))
    assert result["last"].usage.completion_tokens == 5 and result["last"].finish_reason == "length"


async def test_limits_at_the_edge_are_accepted(stack):
    result = await collect(stack.stub, R(prompt="hi", max_tokens=157, k=8, temperature=0.0, ignore_eos=True))
    assert len(result["token_ids"]) == 157


@pytest.mark.real_models
@pytest.mark.parametrize("temperature", [1e30, 1e-45])
async def test_extreme_temperatures_on_the_real_pair_finish_cleanly(real, temperature):
    """At temperature 1e30 the real target samples almost uniformly over its 512 tokens and emits
    byte tokens that are no valid UTF-8 (once an INTERNAL from the detokenizer); near 0 it is the
    greedy limit. Both finish with the text tokenizer.decode gives."""
    target = real["target"]
    stack = await start_stack(target, real["draft"], k=4, max_k=8)
    try:
        for seed in range(4):
            result = await collect(stack.stub, R(prompt="Once upon a time", max_tokens=64, temperature=temperature,
                                                 seed=seed, ignore_eos=True))
            assert result["last"].finish_reason == "length" and len(result["token_ids"]) == 64
            assert result["text"] == target.tokenizer.decode(result["token_ids"], skip_special_tokens=True)
        greedy = await collect(stack.stub, R(prompt="Once upon a time", max_tokens=64, temperature=0.0, ignore_eos=True))
        if temperature < 1:
            assert result["token_ids"] == greedy["token_ids"]
    finally:
        await stack.stop()
