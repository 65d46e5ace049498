"""Service plumbing shared by every server."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitspec.service import make_channel, model_thread, off_thread, start_server


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def test_a_second_server_on_a_port_in_use_fails_instead_of_sharing_it():
    first = await start_server(lambda server: [], port=0, host="127.0.0.1")
    try:
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{first.port}"):
            await start_server(lambda server: [], port=first.port, host="127.0.0.1")
    finally:
        await first.stop(0)


async def test_a_channel_reaches_a_worker_that_starts_late_within_seconds():
    """A worker that compiles before it serves is reached soon after it listens, however long the
    channel failed before (gRPC's own reconnect backoff would wait up to 120 s: after 10 s of
    failures its next try comes about 6 s later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    channel = make_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    failing_until = time.monotonic() + 10
    while time.monotonic() < failing_until:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.2)
        await asyncio.sleep(0.2)
    server = await start_server(lambda server: [], port=port, host="127.0.0.1")
    listening = time.monotonic()
    try:
        while True:
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.2)
                break
            except grpc.aio.AioRpcError:
                assert time.monotonic() - listening < 3, "the channel did not retry within 3 s of the server starting"
                await asyncio.sleep(0.05)
    finally:
        await channel.close()
        await server.stop(0)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are a Linux feature")
@pytest.mark.parametrize("nice", [0, 3])
def test_model_thread_runs_nice_levels_below_the_io_threads(nice):
    caller = thread_nice()
    with model_thread("test-model", nice) as executor:
        inside = executor.submit(thread_nice).result()
    assert inside == min(19, caller + nice)
    assert thread_nice() == caller  # only the model thread moved


async def test_off_thread_runs_on_a_thread_that_has_exited_when_it_returns():
    """Loading runs there, so that its OpenMP pool is gone before the model thread makes its own."""
    ran_on: list[threading.Thread] = []

    def load(a: int, b: int = 0) -> int:
        ran_on.append(threading.current_thread())
        return a + b

    assert await off_thread(load, 2, b=3) == 5
    assert ran_on[0] is not threading.current_thread() and not ran_on[0].is_alive()


async def test_off_thread_hands_back_the_error():
    def fail() -> None:
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        await off_thread(fail)
