"""Interleaved A/B of compile settings on one model: the forward cost of each variant (inductor
settings over the worker's own, `"pack": false` for nn.Linear weights instead of oneDNN-packed ones,
`"batch_gemms": "onednn"` for the batch graph's linears on oneDNN instead of the C++ templates,
and how many tokens its graphs take), measured round-robin in one
process so that a noisy machine slows every variant alike. Prints the median ms per forward and
the interquartile spread, per (batch, new tokens) shape.

  python benchmarks/compile_ab.py --model ~/.cache/splitspec-peers/pair/target-48m-hd32 \
      --variant 'unpacked={"pack": false}' --variant 'now={}' \
      [--graph-tokens unpacked=64] [--shapes 1x1,4x1,1x4,4x4,16x1,1x128] [--rounds 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from forward_cost import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME=JSON inductor settings")
    parser.add_argument("--graph-tokens", action="append", default=[], help="NAME=N: most tokens its graphs take")
    parser.add_argument("--shapes", default="1x1,4x1,1x4,4x4,16x1,1x128", help="BATCHxTOKENS,...")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=10, help="calls per shape per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from splitspec.models import load_model
    from splitspec.paged.compiled import CompiledForward
    from splitspec.paged.kv_pool import KVPool
    from splitspec.paged.runner import PagedRunner

    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    graph_tokens = {name: int(n) for name, n in (item.split("=", 1) for item in args.graph_tokens)}
    blocks = max(b for b, _ in shapes) * -(-(args.context + max(t for _, t in shapes)) // 16) + 1
    runners = {}
    for item in args.variant:
        name, settings = item.split("=", 1)
        overrides = json.loads(settings)
        pack = overrides.pop("pack", True)
        loaded = load_model(args.model, device="cpu", dtype="float32")
        runner = PagedRunner(loaded.model, KVPool(loaded.model.config, blocks, 16, loaded.dtype, loaded.device), pack=pack)
        batch_gemms = overrides.pop("batch_gemms", "templates")
        runner.compiled = CompiledForward(runner.model, runner.device, overrides=overrides, batch_gemms=batch_gemms)
        if name in graph_tokens:
            runner.compiled.max_tokens = graph_tokens[name]
        runner.warm_up()
        runners[name] = runner
    times: dict[tuple[str, tuple[int, int]], list[float]] = {(n, s): [] for n in runners for s in shapes}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            for batch, tokens in shapes:
                times[(name, (batch, tokens))] += measure(runner, batch, tokens, args.context, args.repeats, 16)
    print("| batch x tokens | " + " | ".join(runners) + " |")
    print("|---|" + "---|" * len(runners))
    rows = []
    for shape in shapes:
        cells = []
        for name in runners:
            sample = times[(name, shape)]
            q1, _, q3 = statistics.quantiles(sample, n=4)
            rows.append({"variant": name, "batch": shape[0], "tokens": shape[1],
                         "median_ms": round(statistics.median(sample), 2), "q1_ms": round(q1, 2), "q3_ms": round(q3, 2)})
            cells.append(f"{rows[-1]['median_ms']:.1f} ({q1:.1f}-{q3:.1f})")
        print(f"| {shape[0]}x{shape[1]} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "variants": args.variant, "graph_tokens": graph_tokens,
                       "threads": args.threads, "context": args.context, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
