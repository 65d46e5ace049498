"""Acceptance rate and tokens per round of a draft/target pair over a prompt set.

Usage:
  python benchmarks/acceptance.py --coordinator 127.0.0.1:50051 --prompts ../shared/prompts/tinystories.jsonl \
      --k 4 --temperature 0 1 --max-tokens 128

Prints, per temperature: acceptance rate (accepted / proposed draft tokens), mean tokens per
speculative round ((accepted + rounds) / rounds), rounds with an empty proposal (n-gram lookup
without a match), output tokens/s at concurrency 1, and the same run's target-only (k = 0) tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from splitspec.service import make_channel
from splitspec.v1 import coordinator_pb2, coordinator_pb2_grpc


async def run(stub, prompts: list[str], k: int, temperature: float, max_tokens: int) -> dict:
    rounds = drafted = accepted = tokens = empty = 0
    start = time.perf_counter()
    for seed, prompt in enumerate(prompts):
        request = coordinator_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens, k=k, seed=seed,
                                                  temperature=temperature, ignore_eos=True)
        async for response in stub.Generate(request):
            if response.finish_reason:
                rounds += response.spec.rounds
                drafted += response.spec.draft_tokens
                accepted += response.spec.accepted_tokens
                tokens += response.usage.completion_tokens
                empty += response.spec.empty_proposals
    elapsed = time.perf_counter() - start
    return {
        "k": k, "temperature": temperature, "requests": len(prompts), "output_tokens": tokens,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "tokens_per_round": round((accepted + rounds) / rounds, 3) if rounds else None,
        "empty_proposals": empty,  # rounds the draft had nothing to propose (n-gram lookup)
        "tokens_per_s": round(tokens / elapsed, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", default="127.0.0.1:50051")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()][: args.limit]
    async with make_channel(args.coordinator) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for temperature in args.temperature:
            for k in (args.k, 0):
                print(json.dumps(await run(stub, prompts, k, temperature, args.max_tokens)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
