"""`splitspec bench`: load generator against a running coordinator (gRPC) or gateway (HTTP,
/v1/completions with SSE), speculation vs target-only.

For every concurrency and every k (k = 0, the target-only baseline, always included) it runs the
prompt set and reports output tokens/s, requests/s, TTFT, time per output token, inter-token
latency and end-to-end latency (p50/p90/p99), acceptance rate, tokens per round, per-position
acceptance, the per-round time split (draft, verify, coordinator + network) and draft payload
bytes per round; and for speculative points the speedup bound implied by the measured acceptance
and step costs: E[tokens per round] x (target-only time per token) / (draft + verify time per round),
where E[tokens per round] = 1 + sum_i P(position i accepted) over the rounds actually run.
Writes a JSON report and PNG plots (tokens/s, generation time and TTFT against concurrency).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

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
    coordinator: str                # HOST:PORT of a coordinator (gRPC), or http(s)://HOST:PORT of a gateway
    prompts: list[dict[str, Any]]
    concurrency: list[int]
    k_values: list[int | str]  # ints, and "auto": leave k unset (the coordinator runs --k auto)
    requests: int = 16
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    draft_confidence: float | None = None  # per request; None: the coordinator's --draft-confidence
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


@dataclass(slots=True)
class _Timer:
    """Token arrival times of one request -> TTFT, inter-token gaps, end-to-end latency."""

    start: float = field(default_factory=time.perf_counter)
    ttft: float = 0.0
    last: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)

    def arrived(self, count: int) -> None:
        now = time.perf_counter()
        if not count:
            return
        if self.tokens == 0:
            self.ttft = now - self.start
        else:
            self.gaps.append((now - self.last) / count)
        self.tokens += count
        self.last = now

    def result(self, spec: coordinator_pb2.SpecStats) -> RequestResult:
        return RequestResult(self.tokens, self.ttft, time.perf_counter() - self.start, self.gaps, spec)


async def _one_grpc(stub: coordinator_pb2_grpc.CoordinatorStub, prompt: dict[str, Any], k: int | str,
                    settings: BenchSettings, seed: int) -> RequestResult:
    request = coordinator_pb2.GenerateRequest(
        prompt=prompt["prompt"], max_tokens=prompt.get("max_tokens", settings.max_tokens), seed=seed,
        temperature=settings.temperature, top_k=settings.top_k, ignore_eos=True)
    if k != "auto":
        request.k = int(k)
    if settings.draft_confidence is not None:
        request.draft_confidence = settings.draft_confidence
    timer, spec = _Timer(), None
    async for response in stub.Generate(request):
        timer.arrived(len(response.token_ids))
        if response.finish_reason:
            spec = response.spec
    if spec is None:
        raise RuntimeError("the coordinator's stream ended without a finish reason")
    return timer.result(spec)


async def _one_http(client: Any, model: str, prompt: dict[str, Any], k: int | str, settings: BenchSettings,
                    seed: int) -> RequestResult:
    """POST /v1/completions with stream=true; tokens and the final SpecStats come from the
    `splitspec` extension of each SSE chunk."""
    from google.protobuf.json_format import ParseDict

    body: dict[str, Any] = {"model": model, "prompt": prompt["prompt"],
                            "max_tokens": prompt.get("max_tokens", settings.max_tokens), "seed": seed,
                            "temperature": settings.temperature, "top_k": settings.top_k,
                            "ignore_eos": True, "stream": True}
    speculative: dict[str, Any] = {} if k == "auto" else {"k": int(k)}
    if settings.draft_confidence is not None:
        speculative["draft_confidence"] = settings.draft_confidence
    if speculative:
        body["speculative"] = speculative
    timer, spec = _Timer(), None
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"gateway answered {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"gateway error: {chunk['error']}")
            for choice in chunk.get("choices", []):
                extension = choice.get("splitspec") or {}
                timer.arrived(len(extension.get("token_ids", [])))
                if choice.get("finish_reason"):
                    spec = ParseDict(extension.get("stats") or {}, coordinator_pb2.SpecStats(),
                                     ignore_unknown_fields=True)
    if spec is None:
        raise RuntimeError("the gateway's stream ended without a finish reason")
    return timer.result(spec)


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
        # 1 + sum over positions of P(the token at i is accepted), per round: right for a fixed k and
        # for --k auto, whose rounds propose different numbers of tokens
        "expected_tokens_per_round": round(1 + sum(accepted_at) / rounds, 4) if rounds else 1.0,
        "round_ms": {
            "total": round(per_round(sum(r.spec.round_seconds for r in results)), 3),
            "draft": round(per_round(sum(r.spec.draft_step_seconds for r in results)), 3),
            "verify": round(per_round(sum(r.spec.verify_step_seconds for r in results)), 3),
        },
        "target_only_round_ms": round(1000 * sum(r.spec.target_round_seconds for r in results) / target_rounds, 3)
        if target_rounds else None,
        "draft_payload_bytes_per_round": round(sum(r.spec.draft_payload_bytes for r in results) / rounds, 1)
        if rounds else 0.0,
        # overlap: rounds the target started on its own from the draft's plan, right after the last verdict
        "chained_round_fraction": round(sum(r.spec.chained_rounds for r in results) / rounds, 4) if rounds else 0.0,
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
            point["speedup_bound"] = round(point["expected_tokens_per_round"] * per_token / cost, 3)
            point["fraction_of_bound"] = round(point["speedup"] / point["speedup_bound"], 3)


OneRequest = Callable[[dict[str, Any], "int | str", BenchSettings, int], Awaitable[RequestResult]]


@asynccontextmanager
async def _transport(settings: BenchSettings) -> AsyncIterator[OneRequest]:
    """One request function over a gRPC channel to a coordinator, or HTTP to a gateway."""
    if settings.coordinator.startswith(("http://", "https://")):
        import httpx

        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=settings.coordinator, headers=headers, timeout=None,
                                     limits=limits) as client:
            models = await client.get("/v1/models")
            if models.status_code != 200:
                raise RuntimeError(f"{settings.coordinator}/v1/models answered {models.status_code}: {models.text[:300]}")
            model = models.json()["data"][0]["id"]
            yield lambda prompt, k, s, seed: _one_http(client, model, prompt, k, s, seed)
        return
    async with make_channel(settings.coordinator, settings.tls, settings.token) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        yield lambda prompt, k, s, seed: _one_grpc(stub, prompt, k, s, seed)


async def run_bench(settings: BenchSettings) -> dict[str, Any]:
    from tqdm import tqdm

    points = []
    total = sum(max(settings.requests, c) for c in settings.concurrency) * len(settings.k_values)
    with tqdm(total=total, desc="bench", unit="req", disable=not settings.progress) as bar:
        async with _transport(settings) as one:
            await one(settings.prompts[0], 0, settings, 0)  # warm-up
            for concurrency in settings.concurrency:
                for k in settings.k_values:
                    count = max(settings.requests, concurrency)
                    semaphore = asyncio.Semaphore(concurrency)

                    async def limited(index: int) -> RequestResult:
                        async with semaphore:
                            result = await one(settings.prompts[index % len(settings.prompts)], k, settings, index)
                            bar.update(1)
                            return result

                    start = time.perf_counter()
                    results = await asyncio.gather(*(limited(i) for i in range(count)))
                    points.append(summarise(list(results), time.perf_counter() - start, concurrency, k))
    add_bounds(points)
    report = {"label": settings.label, "coordinator": settings.coordinator, "temperature": settings.temperature,
              "max_tokens": settings.max_tokens, "draft_confidence": settings.draft_confidence, "points": points}
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
