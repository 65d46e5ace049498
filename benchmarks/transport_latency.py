"""What one worker round trip costs on this machine's transport, apart from the step it carries.

A worker-like server answers a stream of VerifyRequest messages, each after a CPU step of S ms on
its single model thread, timed around the hand-off as the target servicer times its steps; the
client measures round trip minus that step. That difference is what a verify adds to a round's
coordinator/network overhead before the coordinator does any work of its own. Two transports carry
the same protobuf messages: a grpc.aio bidirectional stream (what splitspec uses) and, as a floor
without gRPC's poller thread, a raw asyncio TCP socket with length-prefixed frames. Both use
uvloop; server and client are pinned to cores of their own when there are two.

  python benchmarks/transport_latency.py --steps-ms 0,5,25 --round-trips 200

Prints one JSON object per (transport, step): median, mean and p90 of round trip minus step, ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, Callable

import grpc
import torch
import uvloop

from splitspec.v1 import target_pb2, target_pb2_grpc

FRAME = struct.Struct("<I")


def busy_step(milliseconds: float, weight: torch.Tensor) -> None:
    """Keep the model thread's core busy for `milliseconds`, as a forward pass would."""
    end = time.perf_counter() + milliseconds / 1000
    x = torch.randn(8, weight.shape[0])
    while time.perf_counter() < end:
        x = torch.tanh(x @ weight)


class Worker:
    """One model thread; `step` returns the seconds from hand-off to result, as the target reports."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1)
        self.weight = torch.randn(1024, 1024)

    async def step(self, request: target_pb2.VerifyRequest) -> target_pb2.VerifyResponse:
        start = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(self.executor, busy_step, request.num_tokens, self.weight)
        return target_pb2.VerifyResponse(num_accepted=len(request.draft_token_ids), token_id=1,
                                         step_seconds=time.perf_counter() - start)


class VerifyServicer(target_pb2_grpc.TargetWorkerServicer):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def VerifyStream(self, requests: AsyncIterator[target_pb2.VerifyRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[target_pb2.VerifyResponse]:
        async for request in requests:
            yield await self.worker.step(request)


async def serve_grpc(port: int) -> None:
    server = grpc.aio.server()
    target_pb2_grpc.add_TargetWorkerServicer_to_server(VerifyServicer(Worker()), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    return await reader.readexactly(size)


def frame(message: object) -> bytes:
    payload = message.SerializeToString()  # type: ignore[attr-defined]
    return FRAME.pack(len(payload)) + payload


async def serve_raw(port: int) -> None:
    worker = Worker()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                request = target_pb2.VerifyRequest.FromString(await read_frame(reader))
                writer.write(frame(await worker.step(request)))
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    await server.serve_forever()


def server_main(serve: Callable[[int], Awaitable[None]], port: int, core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    uvloop.run(serve(port))


def request(step_ms: int) -> target_pb2.VerifyRequest:
    """num_tokens carries the step's length, in ms."""
    return target_pb2.VerifyRequest(seq_id="bench", draft_token_ids=[1, 2, 3], num_tokens=step_ms)


async def overheads_grpc(port: int, step_ms: int, round_trips: int) -> list[float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
        call = target_pb2_grpc.TargetWorkerStub(channel).VerifyStream()
        samples = []
        for _ in range(round_trips):
            start = time.perf_counter()
            await call.write(request(step_ms))
            response = await call.read()
            samples.append(time.perf_counter() - start - response.step_seconds)
        call.cancel()
    return samples


async def overheads_raw(port: int, step_ms: int, round_trips: int) -> list[float]:
    for _ in range(100):  # the server process may still be starting
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        raise OSError(f"no raw-tcp server on 127.0.0.1:{port} after 10 s")
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    for _ in range(round_trips):
        start = time.perf_counter()
        writer.write(frame(request(step_ms)))
        response = target_pb2.VerifyResponse.FromString(await read_frame(reader))
        samples.append(time.perf_counter() - start - response.step_seconds)
    writer.close()
    return samples


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-ms", default="0,5,25", help="server step durations in ms, comma-separated")
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    server_core = cores[-1] if len(cores) >= 2 else None
    if server_core is not None:
        os.sched_setaffinity(0, {cores[0]})
    context = multiprocessing.get_context("spawn")
    for transport, serve, measure in (("grpc.aio", serve_grpc, overheads_grpc), ("raw-tcp", serve_raw, overheads_raw)):
        port = free_port()
        server = context.Process(target=server_main, args=(serve, port, server_core), daemon=True)
        server.start()
        try:
            for step_ms in (int(s) for s in args.steps_ms.split(",")):
                samples = uvloop.run(measure(port, step_ms, args.warmup + args.round_trips))[args.warmup:]
                ms = sorted(1000 * s for s in samples)
                print(json.dumps({"transport": transport, "step_ms": step_ms, "round_trips": len(ms),
                                  "overhead_ms": {"p50": round(statistics.median(ms), 3),
                                                  "mean": round(statistics.mean(ms), 3),
                                                  "p90": round(ms[int(0.9 * len(ms))], 3)}}), flush=True)
        finally:
            server.terminate()
            server.join()


if __name__ == "__main__":
    main()
