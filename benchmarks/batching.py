"""Aggregate throughput with continuous batching vs one sequence per forward pass.

Starts a target, a draft and a coordinator as separate processes (as `splitspec up` does), runs
the prompt set at each concurrency and prints output tokens/s, once with the target batching all
sequences' work into one forward pass per step and once with `--no-batching` (every prefill and
verification its own forward pass). The draft batches in both runs.

  python benchmarks/batching.py --target $SPLITSPEC_MODEL_DIR/tinystories-260k \
      --draft $SPLITSPEC_MODEL_DIR/tinystories-xs --prompts ../shared/prompts/tinystories.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time

from splitspec.service import make_channel
from splitspec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, target_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: argparse.Namespace, batching: bool) -> tuple[list[subprocess.Popen], str, str]:
    cli = [sys.executable, "-m", "entrypoints.cli"]
    tp, dp, cp = free_port(), free_port(), free_port()
    common = ["--host", "127.0.0.1", "--threads", str(args.threads), "--log-level", "warning"]
    target = [*cli, "target", "--model", args.target, "--port", str(tp), *common]
    if not batching:
        target.append("--no-batching")
    processes = [
        subprocess.Popen(target),
        subprocess.Popen([*cli, "draft", "--model", args.draft, "--port", str(dp), *common]),
        subprocess.Popen([*cli, "coordinator", "--port", str(cp), "--target", f"127.0.0.1:{tp}", "--draft",
                          f"127.0.0.1:{dp}", "--k", str(args.k), "--log-level", "warning", "--host", "127.0.0.1"]),
    ]
    return processes, f"127.0.0.1:{cp}", f"127.0.0.1:{tp}"


async def wait_ready(address: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with make_channel(address) as channel:
        for _ in range(600):
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{address} did not become healthy")


async def measure(address: str, prompts: list[str], concurrency: int, args: argparse.Namespace) -> dict:
    async with make_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        semaphore = asyncio.Semaphore(concurrency)
        count = max(args.requests, 2 * concurrency)

        async def one(index: int) -> int:
            async with semaphore:
                request = coordinator_pb2.GenerateRequest(
                    prompt=prompts[index % len(prompts)], max_tokens=args.max_tokens, temperature=args.temperature,
                    seed=index, ignore_eos=True)
                tokens = 0
                async for response in stub.Generate(request):
                    tokens += len(response.token_ids)
                return tokens

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(count))))
        elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": count, "tokens": tokens, "seconds": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1)}


async def run_mode(args: argparse.Namespace, prompts: list[str], batching: bool) -> list[dict]:
    processes, address, target_address = start(args, batching)
    try:
        await wait_ready(address)
        rows = []
        for concurrency in args.concurrency:
            row = await measure(address, prompts, concurrency, args)
            row["batching"] = batching
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        async with make_channel(target_address) as channel:
            stats = await target_pb2_grpc.TargetWorkerStub(channel).GetStats(common_pb2.StatsRequest())
        print(f"target: mean {stats.mean_batch_sequences:.2f} sequences per step, max {stats.max_batch_sequences}",
              file=sys.stderr)
        return rows
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=32, help="requests per point (at least 2 x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()]
    batched = await run_mode(args, prompts, batching=True)
    single = await run_mode(args, prompts, batching=False)
    base = batched[0]["tokens_per_s"]
    print("| concurrency | batched tokens/s | one per forward tokens/s | batched vs c=1 | batched vs one per forward |")
    print("|---|---|---|---|---|")
    for b, s in zip(batched, single):
        print(f"| {b['concurrency']} | {b['tokens_per_s']} | {s['tokens_per_s']} | {b['tokens_per_s'] / base:.2f}x | "
              f"{b['tokens_per_s'] / s['tokens_per_s']:.2f}x |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"batched": batched, "one_per_forward": single, "args": vars(args)}, handle, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
