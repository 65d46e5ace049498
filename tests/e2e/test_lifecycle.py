"""Stop conditions, target-only mode, cancellation freeing memory, and startup checks."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coordinator.server import CoordinatorConfig, start_coordinator
from draft_worker.server import start_draft
from splitspec.errors import IncompatibleModels
from splitspec.v1 import coordinator_pb2
from target_worker.server import start_target
from tests.support import collect, start_stack

R = coordinator_pb2.GenerateRequest


@pytest.fixture(scope="module")
async def stack(tiny):
    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=4, max_k=8)
    yield stack
    await stack.stop()


def draft_proposals(stack) -> float:
    return stack.draft.registry.get_sample_value("splitspec:draft_proposals_total") or 0.0


async def test_stop_string_is_not_emitted(stack):
    full = await collect(stack.stub, R(prompt="hello", max_tokens=40, temperature=0.0, ignore_eos=True))
    text = full["text"]
    stop = text[10:13]
    assert stop and text.find(stop) >= 1
    cut = await collect(stack.stub, R(prompt="hello", max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert cut["text"] == text[: text.find(stop)]
    assert cut["last"].finish_reason == "stop"
    assert full["token_ids"][: len(cut["token_ids"])] == cut["token_ids"]


async def test_streamed_text_never_shows_a_partial_stop_string(stack):
    full = await collect(stack.stub, R(prompt="hello", max_tokens=40, temperature=0.0, ignore_eos=True))
    stop = full["text"][20:26]
    responses = [r async for r in stack.stub.Generate(
        R(prompt="hello", max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]))]
    streamed = ""
    for response in responses:
        streamed += response.text
        assert stop not in streamed
    assert streamed == full["text"][: full["text"].find(stop)]


async def test_eos_ends_with_stop_unless_ignored(stack, tiny):
    eos = tiny["target"].eos_token_ids[0]
    for seed in range(40):
        result = await collect(stack.stub, R(prompt="a", max_tokens=150, temperature=1.5, seed=seed))
        if result["last"].finish_reason == "stop":
            break
    else:
        pytest.fail("no sampled run reached EOS")
    assert result["token_ids"][-1] == eos and eos not in result["token_ids"][:-1]
    ignored = await collect(stack.stub, R(prompt="a", max_tokens=150, temperature=1.5, seed=seed, ignore_eos=True))
    assert ignored["last"].finish_reason == "length" and len(ignored["token_ids"]) == 150
    assert ignored["token_ids"][: len(result["token_ids"])] == result["token_ids"]


async def test_k_zero_runs_target_only_without_draft_calls(stack):
    before = draft_proposals(stack)
    result = await collect(stack.stub, R(prompt="hello", max_tokens=20, temperature=0.0, k=0))
    assert draft_proposals(stack) == before
    assert set(result["origins"]) == {coordinator_pb2.TOKEN_ORIGIN_TARGET}
    assert result["last"].spec.rounds == 0
    speculative = await collect(stack.stub, R(prompt="hello", max_tokens=20, temperature=0.0, k=4))
    assert speculative["token_ids"] == result["token_ids"]
    assert draft_proposals(stack) > before


async def test_cancelled_request_frees_both_workers(stack):
    call = stack.stub.Generate(R(prompt="hello", max_tokens=150, temperature=1.0, ignore_eos=True))
    await call.read()
    target_engine = stack.target.state
    assert len(target_engine.sequences) == 1
    call.cancel()
    for _ in range(100):
        open_streams = stack.draft.registry.get_sample_value("splitspec:draft_open_sequences")
        if not target_engine.sequences and open_streams == 0:
            break
        await asyncio.sleep(0.05)
    assert target_engine.sequences == {}
    assert open_streams == 0


async def test_finished_requests_leave_no_state(stack):
    await asyncio.gather(*(collect(stack.stub, R(prompt=f"p{i}", max_tokens=12)) for i in range(8)))
    await stack.coordinator.state.drain()
    assert stack.target.state.sequences == {}
    registry = stack.target.registry
    assert registry.get_sample_value("splitspec:kv_blocks_used") == 0
    assert registry.get_sample_value("splitspec:kv_blocks_total") == stack.target.state.blocks.num_blocks


async def test_incompatible_pair_is_refused_at_startup(tiny):
    target = await start_target(tiny["target"])
    draft = await start_draft(tiny["draft_wide"])
    try:
        with pytest.raises(IncompatibleModels) as info:
            await start_coordinator(CoordinatorConfig(target=target.address, draft=draft.address, port=0,
                                                      connect_timeout=5))
        message = str(info.value)
        assert "vocab_size 300" in message and "vocab_size 259" in message
        assert tiny["draft_wide"].fingerprint in message and tiny["target"].fingerprint in message
        assert "first differing token: id 0: '<unk>' vs '<|endoftext|>'" in message
    finally:
        await draft.stop(0)
        await target.stop(0)


async def test_model_info_reports_both_models(stack):
    info = await stack.stub.GetModelInfo(coordinator_pb2.CoordinatorInfoRequest())
    assert info.target.max_model_len == 160 and info.draft.vocab_size == 259
    assert info.target.tokenizer_fingerprint == info.draft.tokenizer_fingerprint
    assert (info.default_k, info.max_k) == (4, 8)


async def test_unknown_sequence_on_target_is_not_found(stack):
    from splitspec.service import make_channel
    from splitspec.v1 import target_pb2, target_pb2_grpc

    async with make_channel(stack.target.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await target_pb2_grpc.TargetWorkerStub(channel).Verify(target_pb2.VerifyRequest(seq_id="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_request_that_could_never_fit_is_refused_at_once(tiny):
    from splitspec.paged.cache import CacheConfig

    small = await start_stack(tiny["target"], tiny["draft_noisy"], k=4,
                              target_cache=CacheConfig(num_blocks=6, block_size=8))  # 48 slots
    try:
        fits = await collect(small.stub, R(prompt="hi", max_tokens=30, temperature=0.0, ignore_eos=True))
        assert len(fits["token_ids"]) == 30
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(small.stub, R(prompt="hi", max_tokens=60, temperature=0.0))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the pool has 6" in info.value.details() and "max_tokens (60)" in info.value.details()
    finally:
        await small.stop()
