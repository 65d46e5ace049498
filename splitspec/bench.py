"""`splitspec bench`: load generator against a running coordinator, speculation vs target-only.

For every concurrency and every k (k = 0, the target-only baseline, always included) it runs the
prompt set and reports output tokens/s, requests/s, TTFT, time per output token, inter-token
latency and end-to-end latency (p50/p90/p99), acceptance rate, tokens per round, per-position
acceptance, the per-round time split (draft, verify, coordinator + network) and draft payload
bytes per round; and for speculative points the speedup bound implied by the measured acceptance
and step costs: E[tokens per round] x (target-only time per token) / (draft + verify time per round).
Writes a JSON report and PNG plots (tokens/s, generation time and TTFT against concurrency).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitspec.service import make_channel
from splitspec.v1 import coordinator_pb2, coordinator_pb2_grpc


@dataclass(slots=True)
class RequestResult:
    tokens: int
    ttft: float
    e2e: float
    gaps: list[float]
    spec: coordinator_pb2.SpecStats


@dataclass(slots=True)
class BenchSettings:
    coordinator: str
    prompts: list[dict[str, Any]]
    concurrency: list[int]
    k_values: list[int | str]  # ints, and "auto": leave k unset (the coordinator runs --k auto)
    requests: int = 16
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    output: Path = Path("bench-results")
    tls: Any = None
    token: str | None = None
    progress: bool = True
    label: str = ""


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


async def _one(stub: coordinator_pb2_grpc.CoordinatorStub, prompt: dict[str, Any], k: int | str, settings: BenchSettings,
               seed: int) -> RequestResult:
    request = coordinator_pb2.GenerateRequest(
        prompt=prompt["prompt"], max_tokens=prompt.get("max_tokens", settings.max_tokens), seed=seed,
        temperature=settings.temperature, top_k=settings.top_k, ignore_eos=True)
    if k != "auto":
        request.k = int(k)
    start = time.perf_counter()
    ttft, last, tokens, gaps, final = 0.0, start, 0, [], None
    async for response in stub.Generate(request):
        now = time.perf_counter()
        if response.token_ids:
            if tokens == 0:
                ttft = now - start
            else:
                gaps.append((now - last) / len(response.token_ids))
            tokens += len(response.token_ids)
            last = now
        if response.finish_reason:
            final = response
    assert final is not None
    return RequestResult(tokens, ttft, time.perf_counter() - start, gaps, final.spec)


def summarise(results: list[RequestResult], wall: float, concurrency: int, k: int | str) -> dict[str, Any]:
    tokens = sum(r.tokens for r in results)
    rounds = sum(r.spec.rounds for r in results)
    drafted = sum(r.spec.draft_tokens for r in results)
    accepted = sum(r.spec.accepted_tokens for r in results)
    proposed_at: list[int] = []
    accepted_at: list[int] = []
    for r in results:
        for i, (p, a) in enumerate(zip(r.spec.proposed_per_position, r.spec.accepted_per_position)):
            if i >= len(proposed_at):
                proposed_at.append(0)
                accepted_at.append(0)
            proposed_at[i] += p
            accepted_at[i] += a
    per_round = (lambda total: 1000 * total / rounds if rounds else 0.0)
    target_rounds = sum(r.spec.target_rounds for r in results)
    point = {
        "concurrency": concurrency,
        "k": k,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "ttft_s": percentiles([r.ttft for r in results]),
        "tpot_s": round(statistics.mean((r.e2e - r.ttft) / max(r.tokens - 1, 1) for r in results), 5),
        "itl_s": percentiles([g for r in results for g in r.gaps]),
        "e2e_s": percentiles([r.e2e for r in results]),
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "tokens_per_round": round((accepted + rounds) / rounds, 3) if rounds else 1.0,
        "acceptance_per_position": [round(a / p, 4) if p else 0.0 for a, p in zip(accepted_at, proposed_at)],
        "round_ms": {
            "total": round(per_round(sum(r.spec.round_seconds for r in results)), 3),
            "draft": round(per_round(sum(r.spec.draft_step_seconds for r in results)), 3),
            "verify": round(per_round(sum(r.spec.verify_step_seconds for r in results)), 3),
        },
        "target_only_round_ms": round(1000 * sum(r.spec.target_round_seconds for r in results) / target_rounds, 3)
        if target_rounds else None,
        "draft_payload_bytes_per_round": round(sum(r.spec.draft_payload_bytes for r in results) / rounds, 1)
        if rounds else 0.0,
    }
    times = point["round_ms"]
    times["overhead"] = round(times["total"] - times["draft"] - times["verify"], 3) if rounds else 0.0
    return point


def add_bounds(points: list[dict[str, Any]]) -> None:
    """Speedup bound and achieved speedup of each speculative point against the k = 0 point."""
    baseline = {p["concurrency"]: p for p in points if p["k"] == 0}
    for point in points:
        base = baseline.get(point["concurrency"])
        if point["k"] == 0 or base is None:
            continue
        point["speedup"] = round(point["output_tokens_per_s"] / base["output_tokens_per_s"], 3)
        per_token = base["target_only_round_ms"]
        cost = point["round_ms"]["draft"] + point["round_ms"]["verify"]
        if per_token and cost:
            expected = 1 + sum(point["acceptance_per_position"])
            point["speedup_bound"] = round(expected * per_token / cost, 3)
            point["fraction_of_bound"] = round(point["speedup"] / point["speedup_bound"], 3)


async def run_bench(settings: BenchSettings) -> dict[str, Any]:
    from tqdm import tqdm

    points = []
    total = sum(max(settings.requests, c) for c in settings.concurrency) * len(settings.k_values)
    with tqdm(total=total, desc="bench", unit="req", disable=not settings.progress) as bar:
        async with make_channel(settings.coordinator, settings.tls, settings.token) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            await _one(stub, settings.prompts[0], 0, settings, 0)  # warm-up
            for concurrency in settings.concurrency:
                for k in settings.k_values:
                    count = max(settings.requests, concurrency)
                    semaphore = asyncio.Semaphore(concurrency)

                    async def limited(index: int) -> RequestResult:
                        async with semaphore:
                            result = await _one(stub, settings.prompts[index % len(settings.prompts)], k, settings,
                                                index)
                            bar.update(1)
                            return result

                    start = time.perf_counter()
                    results = await asyncio.gather(*(limited(i) for i in range(count)))
                    points.append(summarise(list(results), time.perf_counter() - start, concurrency, k))
    add_bounds(points)
    report = {"label": settings.label, "coordinator": settings.coordinator, "temperature": settings.temperature,
              "max_tokens": settings.max_tokens, "points": points}
    settings.output.mkdir(parents=True, exist_ok=True)
    (settings.output / "bench.json").write_text(json.dumps(report, indent=2))
    plot(report, settings.output)
    return report


def plot(report: dict[str, Any], output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    ks = sorted({p["k"] for p in points}, key=lambda k: (isinstance(k, str), k if isinstance(k, int) else 0))
    charts = [("tokens_per_s", "output tokens/s", lambda p: p["output_tokens_per_s"]),
              ("generation_time", "generation time p50 (s)", lambda p: p["e2e_s"]["p50"]),
              ("ttft", "time to first token p50 (s)", lambda p: p["ttft_s"]["p50"])]
    written = []
    for name, ylabel, value in charts:
        figure, axes = plt.subplots(figsize=(6, 4))
        for k in ks:
            series = sorted((p for p in points if p["k"] == k), key=lambda p: p["concurrency"])
            axes.plot([p["concurrency"] for p in series], [value(p) for p in series], marker="o",
                      label="target only (k=0)" if k == 0 else f"speculative k={k}")
        axes.set_xlabel("concurrency")
        axes.set_ylabel(ylabel)
        axes.set_xscale("log", base=2)
        axes.set_title(f"{report.get('label') or 'splitspec'}: {ylabel}")
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = output / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def table(report: dict[str, Any]) -> str:
    lines = ["| conc | k | tok/s | speedup | bound | TTFT p50 ms | e2e p50 s | accept | tok/round | "
             "draft/verify/overhead ms per round | bytes/round |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in report["points"]:
        split = p["round_ms"]
        lines.append(
            f"| {p['concurrency']} | {p['k']} | {p['output_tokens_per_s']} | {p.get('speedup', '-')} | "
            f"{p.get('speedup_bound', '-')} | {1000 * p['ttft_s']['p50']:.1f} | {p['e2e_s']['p50']:.2f} | "
            f"{p['acceptance_rate'] if p['acceptance_rate'] is not None else '-'} | {p['tokens_per_round']} | "
            f"{split['draft']}/{split['verify']}/{split['overhead']} | {p['draft_payload_bytes_per_round']} |")
    return "\n".join(lines)
