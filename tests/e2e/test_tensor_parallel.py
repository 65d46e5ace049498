"""The whole stack with a TP=2 target (two Gloo ranks on the CPU): greedy tokens equal the target
alone (hence TP=1) under speculation and concurrency 4; killing a rank mid-request stops the
worker with a non-zero exit, the request gets UNAVAILABLE, and no process is left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from splitspec.service import make_channel
from splitspec.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.e2e.test_greedy_identity import _prompts, reference
from tests.support import alive, launch_up, process_tree, real_model_dir

R = coordinator_pb2.GenerateRequest


async def generate_all(address: str, prompts: list[str], max_tokens: int) -> list[list[int]]:
    async with make_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)

        async def one(prompt: str, k: int) -> list[int]:
            request = R(prompt=prompt, max_tokens=max_tokens, temperature=0.0, k=k, ignore_eos=True)
            return [t for r in [r async for r in stub.Generate(request, timeout=120)] for t in r.token_ids]

        return await asyncio.gather(*(one(p, (1, 2, 4, 8)[i % 4]) for i, p in enumerate(prompts)))


def stop(process) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except Exception:  # noqa: BLE001
            os.killpg(process.pid, signal.SIGKILL)


async def test_tp2_stack_matches_target_alone(tiny, tiny_dirs):
    process, address = launch_up("--target", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft_noisy"]),
                                 "--tensor-parallel-size", "2", "--threads", "1")
    try:
        prompts = ["alpha beta", "a much longer prompt about gamma and delta", "x", "tensor parallel"]
        outputs = await generate_all(address, prompts, 40)
        target = tiny["target"]
        for prompt, tokens in zip(prompts, outputs):
            assert tokens == reference(target, target.tokenizer(prompt).input_ids, 40, False), prompt
    finally:
        stop(process)


@pytest.mark.real_models
async def test_tp2_stack_matches_target_alone_on_the_real_pair(real):
    root = real_model_dir()
    process, address = launch_up("--target", str(root / "tinystories-260k"), "--draft", str(root / "tinystories-xs"),
                                 "--tensor-parallel-size", "2", "--threads", "1")
    try:
        prompts = _prompts(4)
        outputs = await generate_all(address, prompts, 100)
        target = real["target"]
        for prompt, tokens in zip(prompts, outputs):
            assert tokens == reference(target, target.tokenizer(prompt).input_ids, 100, False), prompt
    finally:
        stop(process)


async def test_killing_a_rank_stops_the_worker_and_fails_the_request_clearly(tiny_dirs):
    process, address = launch_up("--target", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft_noisy"]),
                                 "--tensor-parallel-size", "2", "--threads", "1")
    try:
        tree = process_tree(process.pid)
        commands = {pid: open(f"/proc/{pid}/cmdline").read().replace("\0", " ") for pid in tree if alive(pid)}
        target_pid = next(pid for pid, cmd in commands.items() if " target " in cmd)
        rank1 = next(pid for pid in process_tree(target_pid) if "spawn_main" in commands.get(pid, ""))
        target_tree = process_tree(target_pid)
        async with make_channel(address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            call = stub.Generate(R(prompt="keep going", max_tokens=140, temperature=0.0, ignore_eos=True), timeout=60)
            await call.read()
            os.kill(rank1, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while await call.read() != grpc.aio.EOF:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 10
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(pid) for pid in [target_pid, *target_tree]):
            await asyncio.sleep(0.2)
        assert not alive(target_pid), "the target worker kept running after losing a rank"
        assert not [pid for pid in target_tree if alive(pid)], "orphaned rank or helper processes"
        assert process.wait(timeout=30) != 0  # `up` notices the target's exit and stops the stack
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
