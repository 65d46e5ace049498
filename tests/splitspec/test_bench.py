"""A short smoke run of `splitspec bench` against a real stack: the report has its fields and the
plots are written. No speed threshold: benchmarks are not timed tests."""

from __future__ import annotations

from splitspec.bench import BenchSettings, run_bench, table
from tests.support import start_stack


async def test_bench_smoke_writes_report_and_plots(tiny, tmp_path):
    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=2)
    try:
        settings = BenchSettings(coordinator=stack.coordinator.address, prompts=[{"prompt": "a"}, {"prompt": "bb"}],
                                 concurrency=[1, 2], k_values=[0, 2], requests=2, max_tokens=8, output=tmp_path,
                                 progress=False, label="smoke")
        report = await run_bench(settings)
    finally:
        await stack.stop()
    points = report["points"]
    assert [(p["concurrency"], p["k"]) for p in points] == [(1, 0), (1, 2), (2, 0), (2, 2)]
    for point in points:
        assert point["output_tokens"] == 8 * point["requests"]
        for key in ("output_tokens_per_s", "requests_per_s", "tpot_s", "tokens_per_round"):
            assert point[key] > 0, key
        for key in ("ttft_s", "itl_s", "e2e_s"):
            assert set(point[key]) == {"p50", "p90", "p99"}
        assert set(point["round_ms"]) == {"total", "draft", "verify", "overhead"}
    speculative = [p for p in points if p["k"] == 2]
    for point in speculative:
        assert 0 <= point["acceptance_rate"] <= 1 and len(point["acceptance_per_position"]) == 2
        assert point["draft_payload_bytes_per_round"] > 0 and point["round_ms"]["draft"] > 0
        assert "speedup" in point and "speedup_bound" in point
    for name in ("bench.json", "tokens_per_s.png", "generation_time.png", "ttft.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "| 2 | 2 |" in table(report)
