"""Fault injection on loopback with real worker processes: kill -9 and SIGSTOP of drafts and
targets mid-stream, client cancel and deadline, overload. Greedy output must equal the
fault-free run token for token; every test is bounded in time."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from coordinator.server import CoordinatorConfig, start_coordinator
from splitspec.service import make_channel
from splitspec.v1 import coordinator_pb2, coordinator_pb2_grpc
from target_worker.server import start_target
from draft_worker.server import start_draft
from splitspec.paged.cache import CacheConfig
from tests.e2e.test_greedy_identity import reference
from tests.support import soak_requests, spawn_worker, wait_until_idle

R = coordinator_pb2.GenerateRequest
PROMPT = "fault tolerance"
MAX_TOKENS = 140


def request(**overrides) -> coordinator_pb2.GenerateRequest:
    return R(**{"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, "k": 2,
                **overrides})


@pytest.fixture(scope="module")
def expected(tiny):
    target = tiny["target"]
    return reference(target, target.tokenizer(PROMPT).input_ids, MAX_TOKENS, False)


async def coordinator_for(targets: list[str], drafts: list[str], **overrides):
    settings = {"connect_timeout": 30, "health_interval": 0.2, "draft_timeout": 1.0, "target_timeout": 2.0,
                **overrides}
    config = CoordinatorConfig(target=targets, draft=drafts or None, port=0, host="127.0.0.1", k=2, **settings)
    running = await start_coordinator(config)
    return running, coordinator_pb2_grpc.CoordinatorStub(make_channel(running.address))


def pinned(pool) -> str:
    return next(e.address for e in pool.endpoints.values() if e.pinned)


async def pinned_draft(pool, timeout: float = 10.0) -> str:
    """The draft a request is pinned to: it pins one after sending its first token, so a client
    that has read that token can be there first (seen with two test processes on two cores)."""
    deadline = time.monotonic() + timeout
    while not any(e.pinned for e in pool.endpoints.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return pinned(pool)


def failovers(running, kind: str) -> float:
    return running.registry.get_sample_value("splitspec:worker_failovers_total", {"kind": kind}) or 0.0


async def run_with_fault(stub, fault, **overrides) -> list[int]:
    """Start a greedy request, inject `fault` after the first streamed message, return all tokens."""
    call = stub.Generate(request(**overrides), timeout=60)
    first = await call.read()
    await fault()
    tokens = list(first.token_ids)
    while (message := await call.read()) != grpc.aio.EOF:
        tokens += message.token_ids
    return tokens


def kill(processes: dict[str, object], address: str, sig: int = signal.SIGKILL) -> None:
    os.kill(processes[address].pid, sig)


def stop_all(processes) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.wait()


@pytest.mark.parametrize("spare,overlap", [(True, False), (False, False), (True, True)],
                         ids=["second-draft", "only-draft", "second-draft-overlap"])
async def test_draft_killed_mid_stream(tiny, tiny_dirs, expected, spare, overlap):
    """With overlap the draft is the target's twin, so its branches hold and the kill lands
    while it drafts the next round during verification."""
    target = await start_target(tiny["target"], cache=CacheConfig(num_blocks=512))
    draft_dir = tiny_dirs["draft_same" if overlap else "draft_noisy"]
    drafts = dict(spawn_worker("draft", draft_dir)[::-1] for _ in range(2 if spare else 1))
    running, stub = await coordinator_for([target.address], list(drafts), overlap=overlap)
    try:
        pool = running.state.drafts

        async def fault() -> None:
            kill(drafts, await pinned_draft(pool))

        started = time.monotonic()
        tokens = await run_with_fault(stub, fault)
        assert tokens == expected
        assert failovers(running, "draft") >= 1
        assert time.monotonic() - started < 30
    finally:
        await running.stop(0)
        await target.stop(0)
        stop_all(drafts)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
async def test_target_killed_mid_stream_fails_over(tiny, tiny_dirs, expected, overlap):
    """With overlap (and a draft whose branches hold) the next verify is in flight while a round's
    tokens are written to the client: the kill lands on it."""
    targets = dict(spawn_worker("target", tiny_dirs["target"])[::-1] for _ in range(2))
    draft = await start_draft(tiny["draft_same" if overlap else "draft_noisy"], cache=CacheConfig(num_blocks=512))
    running, stub = await coordinator_for(list(targets), [draft.address], overlap=overlap)
    try:
        pool = running.state.targets

        async def fault() -> None:
            kill(targets, pinned(pool))

        tokens = await run_with_fault(stub, fault)
        assert tokens == expected  # nothing duplicated, nothing dropped
        assert failovers(running, "target") >= 1
    finally:
        await running.stop(0)
        await draft.stop(0)
        stop_all(targets)


async def test_target_killed_while_it_decodes_autonomously_fails_over(tiny_dirs, expected):
    """Target-only: after its first round the target decodes the sequence by itself (autonomous
    rounds); killed then, the request resumes on the other target with nothing lost or repeated."""
    targets = dict(spawn_worker("target", tiny_dirs["target"])[::-1] for _ in range(2))
    running, stub = await coordinator_for(list(targets), [])
    try:
        async def fault() -> None:
            kill(targets, pinned(running.state.targets))

        tokens = await run_with_fault(stub, fault, k=0)
        assert tokens == expected
        assert failovers(running, "target") >= 1
    finally:
        await running.stop(0)
        stop_all(targets)


async def test_last_target_killed_gives_a_prompt_unavailable(tiny, tiny_dirs):
    targets = dict([spawn_worker("target", tiny_dirs["target"])[::-1]])
    running, stub = await coordinator_for(list(targets), [])
    try:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await run_with_fault(stub, lambda: asyncio.sleep(0, kill(targets, next(iter(targets)))), k=0)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no target worker can serve this request" in info.value.details()
        assert time.monotonic() - started < 10
    finally:
        await running.stop(0)
        stop_all(targets)


async def test_stopped_draft_misses_its_deadline_and_the_request_goes_on(tiny, tiny_dirs, expected):
    target = await start_target(tiny["target"], cache=CacheConfig(num_blocks=512))
    drafts = dict([spawn_worker("draft", tiny_dirs["draft_noisy"])[::-1]])
    running, stub = await coordinator_for([target.address], list(drafts))
    try:
        started = time.monotonic()
        tokens = await run_with_fault(stub, lambda: asyncio.sleep(0, kill(drafts, next(iter(drafts)), signal.SIGSTOP)))
        assert tokens == expected
        assert time.monotonic() - started < 15  # one --draft-timeout (1 s), not a hang
        assert failovers(running, "draft") >= 1
    finally:
        await running.stop(0)
        await target.stop(0)
        stop_all(drafts)


async def test_stopped_target_is_detected_and_the_request_completes_elsewhere(tiny, tiny_dirs, expected):
    targets = dict(spawn_worker("target", tiny_dirs["target"])[::-1] for _ in range(2))
    running, stub = await coordinator_for(list(targets), [])
    try:
        pool = running.state.targets
        started = time.monotonic()
        tokens = await run_with_fault(stub, lambda: asyncio.sleep(0, kill(targets, pinned(pool), signal.SIGSTOP)),
                                      k=0)
        assert tokens == expected
        assert time.monotonic() - started < 15  # one --target-timeout (2 s), not a hang
        assert failovers(running, "target") >= 1
    finally:
        await running.stop(0)
        stop_all(targets)


@pytest.fixture
async def local_stack(tiny):
    target = await start_target(tiny["target"], cache=CacheConfig(num_blocks=512))
    draft = await start_draft(tiny["draft_noisy"], cache=CacheConfig(num_blocks=512))
    running, stub = await coordinator_for([target.address], [draft.address], max_running_requests=1,
                                          max_queued_requests=1)
    yield target, draft, running, stub
    await running.stop(0)
    await draft.stop(0)
    await target.stop(0)


async def test_client_cancel_and_deadline_return_workers_to_baseline(local_stack):
    target, draft, _, stub = local_stack
    call = stub.Generate(request())
    await call.read()
    assert target.state.sequences
    call.cancel()
    await wait_until_idle(target, draft)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(request(), timeout=0.15):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until_idle(target, draft)


async def test_full_queue_refuses_at_once(local_stack):
    _, _, _, stub = local_stack
    running = stub.Generate(request(max_tokens=MAX_TOKENS))
    await running.read()                    # holds the only running slot
    queued = stub.Generate(request())       # waits in the only queue place
    await asyncio.sleep(0.2)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(request()):
            pass
    elapsed = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queued-requests" in info.value.details()
    assert elapsed < 0.1, f"refused after {elapsed * 1000:.0f} ms"
    running.cancel()
    queued.cancel()


async def test_soak_2000_requests_with_cancellations_and_a_draft_restart(tiny, tiny_dirs):
    """2,000 greedy requests (a third by default: `soak_requests`), 32 at a time, ~15% cancelled by
    the client, two draft workers of which one is killed and restarted on the same port halfway.
    Nothing lost, nothing leaked."""
    import json
    import random
    from pathlib import Path

    target_model = tiny["target"]
    target = await start_target(target_model, cache=CacheConfig(num_blocks=400, block_size=8))
    drafts = dict(spawn_worker("draft", tiny_dirs["draft_noisy"])[::-1] for _ in range(2))
    running, stub = await coordinator_for([target.address], list(drafts), draft_timeout=2.0, target_timeout=10.0)
    rng = random.Random(1)
    prompts = [f"soak {i}: " + "ab" * (i % 7) for i in range(30)]
    max_tokens = 16
    expected = {p: reference(target_model, target_model.tokenizer(p).input_ids, max_tokens, False) for p in prompts}
    semaphore = asyncio.Semaphore(32)
    latencies, outcome = [], {"completed": 0, "cancelled": 0}
    restarted = asyncio.Event()
    requests = soak_requests(2000)

    async def restart_a_draft() -> None:
        address = next(iter(drafts))
        drafts[address].kill()
        drafts[address].wait()
        process, _ = await asyncio.to_thread(spawn_worker, "draft", tiny_dirs["draft_noisy"], int(address.split(":")[1]))
        drafts[address] = process
        restarted.set()

    async def one(index: int) -> None:
        prompt = rng.choice(prompts)
        cancel_after = rng.randrange(3) if rng.random() < 0.15 else None
        async with semaphore:
            if index == requests // 2:
                asyncio.get_running_loop().create_task(restart_a_draft())
            started = time.monotonic()
            call = stub.Generate(R(prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                   k=rng.choice([1, 2, 4])), timeout=120)
            tokens = []
            async for message in call:
                tokens += message.token_ids
                if cancel_after is not None and len(tokens) > cancel_after:
                    call.cancel()
                    outcome["cancelled"] += 1
                    return
            assert len(tokens) == max_tokens and tokens == expected[prompt], index
            latencies.append(time.monotonic() - started)
            outcome["completed"] += 1

    started = time.monotonic()
    try:
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.monotonic() - started
        await asyncio.wait_for(restarted.wait(), 60)
        assert outcome["completed"] + outcome["cancelled"] == requests and outcome["cancelled"] > requests * 3 // 40
        await running.state.drain()
        engine = target.state
        for _ in range(100):
            if not engine.sequences and engine.blocks.num_free_blocks == engine.blocks.num_blocks:
                break
            await asyncio.sleep(0.05)
        assert engine.sequences == {} and engine.suspended == {}
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        for endpoint in running.state.drafts.endpoints.values():
            for _ in range(100):
                try:
                    stats = await endpoint.client.stats()
                except grpc.aio.AioRpcError as exc:  # the restarted draft's channel may still be in reconnect backoff
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    await asyncio.sleep(0.1)
                    continue
                if stats.blocks_used == 0 and stats.running_sequences == 0:
                    break
                await asyncio.sleep(0.05)
            assert stats.blocks_used == 0 and stats.running_sequences == 0, endpoint.address
        latencies.sort()
        report = {"requests": requests, **outcome, "wall_s": round(wall, 1),
                  "p50_s": round(latencies[len(latencies) // 2], 3),
                  "p99_s": round(latencies[int(len(latencies) * 0.99)], 3),
                  "draft_failovers": failovers(running, "draft")}
        artifacts = Path(__file__).resolve().parents[2] / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / "soak.json").write_text(json.dumps(report, indent=2))
        print("soak:", report)
    finally:
        await running.stop(0)
        await target.stop(0)
        stop_all(drafts)
