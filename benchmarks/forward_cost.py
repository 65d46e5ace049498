"""Forward-pass cost of a worker's paged runner: ms per call against batch size and new tokens per
sequence (a verify of k + 1 tokens is one sequence with k + 1 new tokens), eager or compiled.

Each sequence already holds `--context` tokens in the paged KV pool; every call writes its new
tokens at the same positions (a verify's window, rewritten), so the context stays fixed. Prints a
markdown table of the median over `--repeats` calls, with the interquartile spread, and the
memory-bandwidth bound: the least ms a forward can take when it must read every weight byte
once, at the copy bandwidth this machine measures (a STREAM-like copy of a 1 GiB buffer).

  python benchmarks/forward_cost.py --model ~/.cache/splitspec-peers/pair/target-48m-hd32 \
      --threads 1 --batch 1,4,16 --tokens 1,2,4,5,9 [--enforce-eager] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def copy_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes per second of the best of `repeats` copies of a `megabytes` buffer (read + write)."""
    source = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


def measure(runner, batch: int, tokens: int, context: int, repeats: int, block_size: int) -> list[float]:
    from splitspec.paged.runner import Chunk

    length = context + tokens
    blocks_per_seq = -(-length // block_size)
    chunks = []
    for b in range(batch):
        table = list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq))
        slots = [table[p // block_size] * block_size + p % block_size for p in range(context, length)]
        chunks.append(Chunk(token_ids=[(7 * b + i) % 100 + 3 for i in range(tokens)], start=context, slots=slots,
                            block_table=table, num_logits=tokens))
    for _ in range(3):
        runner.forward(chunks)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.forward(chunks)
        times.append((time.perf_counter() - start) * 1000)
    return times


def profile(runner, batch: int, tokens: int, context: int) -> None:
    """torch.profiler's table of the ops of 10 forwards of one shape, by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    measure(runner, batch, tokens, context, 3, 16)
    with profiler(activities=[ProfilerActivity.CPU]) as recorded:
        measure(runner, batch, tokens, context, 10, 16)
    print(recorded.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", default="1,4,16")
    parser.add_argument("--tokens", default="1,2,4,5,9")
    parser.add_argument("--context", type=int, default=64, help="tokens already cached per sequence")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-pack", action="store_true", help="nn.Linear weights, not oneDNN-packed ones")
    parser.add_argument("--no-paged-kernel", action="store_true",
                        help="attention over gathered contexts (SDPA), not the CPU paged kernel")
    parser.add_argument("--no-gemm-kernel", action="store_true",
                        help="the graphs' linears as inductor's templates or oneDNN, not the streamed linear kernel")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="keep the graphs' default step limit (the workers measure it at start)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default=None, metavar="BATCHxTOKENS",
                        help="print torch.profiler's op table for one shape, e.g. 16x1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from splitspec.models import load_model
    from splitspec.paged.cache import CacheConfig, build_paged_cache

    batches, token_counts = [int(x) for x in args.batch.split(",")], [int(x) for x in args.tokens.split(",")]
    loaded = load_model(args.model, device="cpu", dtype=args.dtype)
    from splitspec.paged.runner import weight_bytes

    nbytes = weight_bytes(loaded.model)  # before the runner packs the linears into oneDNN buffers
    blocks = max(batches) * -(-(args.context + max(token_counts)) // 16) + 1
    started = time.perf_counter()
    _, runner = build_paged_cache(loaded, CacheConfig(num_blocks=blocks), compile=not args.enforce_eager,
                                     pack=not args.no_pack, calibrate=not args.no_calibrate,
                                     paged_kernel=not args.no_paged_kernel,
                                     gemm_kernel=not args.no_gemm_kernel)
    compile_seconds, started = time.perf_counter() - started, time.perf_counter()
    rows = []
    for batch in batches:
        for tokens in token_counts:
            times = measure(runner, batch, tokens, args.context, args.repeats, 16)
            quartiles = statistics.quantiles(times, n=4)
            rows.append({"batch": batch, "tokens": tokens, "median_ms": round(statistics.median(times), 2),
                         "q1_ms": round(quartiles[0], 2), "q3_ms": round(quartiles[2], 2)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.profile:
        profile(runner, *[int(x) for x in args.profile.split("x")], args.context)
    bandwidth = copy_bandwidth()
    bound_ms = nbytes / bandwidth * 1000
    mode = "eager" if args.enforce_eager else "compiled"
    print(f"\n{args.model}: {mode}, {args.threads} thread(s), {args.dtype}, context {args.context}, "
          f"start (compile included) {compile_seconds:.0f} s, measurement {time.perf_counter() - started:.0f} s, "
          f"graphs compiled {runner.compiles}, graph step limit "
          f"{runner.compiled.max_tokens if runner.compiled is not None else '-'} tokens, batch graph linears "
          f"{'streamed kernel' if runner.gemm_kernel else runner.compiled.batch_gemms if runner.compiled is not None else '-'}"
          ", attention "
          f"{'paged kernel' if runner.paged_kernel else 'gathered contexts'}")
    print(f"weights {nbytes / 1e6:.1f} MB, copy bandwidth {bandwidth / 1e9:.1f} GB/s -> bound {bound_ms:.2f} ms "
          "per forward\n")
    print("| batch \\ tokens | " + " | ".join(str(t) for t in token_counts) + " |")
    print("|---|" + "---|" * len(token_counts))
    for batch in batches:
        cells = [r for r in rows if r["batch"] == batch]
        print(f"| {batch} | " + " | ".join(f"{r['median_ms']:.1f} ({r['q1_ms']:.1f}-{r['q3_ms']:.1f})"
                                              for r in cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "mode": mode, "threads": args.threads, "dtype": args.dtype,
                       "weight_bytes": nbytes, "copy_bandwidth": bandwidth, "bound_ms": bound_ms, "rows": rows},
                      handle, indent=1)


if __name__ == "__main__":
    main()
