"""Acceptance rate and tokens per round of a draft/target pair over a prompt set.

Usage:
  python benchmarks/acceptance.py --coordinator 127.0.0.1:50051 --prompts ../shared/prompts/tinystories.jsonl \
      --k 4 --temperature 0 1 --max-tokens 128

Prints, per temperature: acceptance rate (accepted / proposed draft tokens), mean tokens per
speculative round ((accepted + rounds) / rounds), rounds with an empty proposal (n-gram lookup
without a match), output tokens/s at concurrency 1, and the same run's target-only (k = 0) tokens/s.

Structured outputs: `--json-schema FILE` or `--regex R` constrains every request (EOS then ends it,
so `ignore_eos` no longer keeps it going); `--target-metrics URL` (a target started with
--metrics-port) adds the grammar-mask time the target spent per masked position and what its steps
waited for it after their forward.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from splitspec.service import make_channel
from splitspec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc


def mask_counters(url: str | None) -> dict[str, float]:
    if url is None:
        return {}
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("splitspec:grammar_")}


async def run(stub, prompts: list[str], k: int, temperature: float, max_tokens: int,
              constraint: common_pb2.Constraint | None = None, target_metrics: str | None = None) -> dict:
    rounds = drafted = accepted = tokens = empty = 0
    before = mask_counters(target_metrics)
    start = time.perf_counter()
    for seed, prompt in enumerate(prompts):
        request = coordinator_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens, k=k, seed=seed,
                                                  temperature=temperature, ignore_eos=True, constraint=constraint)
        async for response in stub.Generate(request):
            if response.finish_reason:
                rounds += response.spec.rounds
                drafted += response.spec.draft_tokens
                accepted += response.spec.accepted_tokens
                tokens += response.usage.completion_tokens
                empty += response.spec.empty_proposals
    elapsed = time.perf_counter() - start
    after = mask_counters(target_metrics)
    masks = {}
    if after:
        delta = {name: after[name] - before.get(name, 0.0) for name in after}
        rows = delta.get("splitspec:grammar_masked_rows_total", 0)
        masks = {"mask_us_per_position": round(1e6 * delta["splitspec:grammar_mask_seconds_total"] / rows, 1)
                 if rows else None,
                 "mask_wait_ms_per_token": round(1e3 * delta["splitspec:grammar_mask_wait_seconds_total"] / tokens, 3)
                 if tokens else None}
    return {
        "constrained": constraint is not None, **masks,
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
    parser.add_argument("--json-schema", help="a JSON schema file: constrain every request to it")
    parser.add_argument("--regex", help="constrain every request to this regex")
    parser.add_argument("--target-metrics", help="the target's /metrics URL (grammar-mask time)")
    args = parser.parse_args()
    constraint = None
    if args.json_schema:
        with open(args.json_schema, encoding="utf-8") as handle:
            constraint = common_pb2.Constraint(json_schema=handle.read())
    elif args.regex:
        constraint = common_pb2.Constraint(regex=args.regex)
    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()][: args.limit]
    async with make_channel(args.coordinator) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for temperature in args.temperature:
            for k in (args.k, 0):
                print(json.dumps(await run(stub, prompts, k, temperature, args.max_tokens, constraint,
                                           args.target_metrics)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
