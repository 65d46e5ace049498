"""A short smoke run of `splitspec bench` against a real stack: the report has its fields and the
plots are written. No speed threshold: benchmarks are not timed tests."""

from __future__ import annotations

import pytest

from entrypoints.bench import BenchSettings, add_bounds, run_bench, table
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
        assert point["chained_round_fraction"] == 0  # no overlap: every round is sent by the coordinator
    for name in ("bench.json", "tokens_per_s.png", "generation_time.png", "ttft.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "| 2 | 2 |" in table(report)


async def test_bench_http_mode_reads_the_gateways_sse_and_spec_stats(tiny, tmp_path):
    """--gateway: the same report through /v1/completions; SpecStats arrive whole in the final chunk."""
    from tests.gateway.conftest import API_KEY, start_gateway, stop_gateway

    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=2)
    server, task, url = await start_gateway(stack.coordinator.address, tiny["target"].tokenizer)
    try:
        settings = BenchSettings(coordinator=url, prompts=[{"prompt": "a"}, {"prompt": "bb"}], concurrency=[2],
                                 k_values=[0, 3], requests=4, max_tokens=10, output=tmp_path, progress=False,
                                 token=API_KEY)
        report = await run_bench(settings)
    finally:
        await stop_gateway(server, task)
        await stack.stop()
    base, speculative = report["points"]
    assert base["k"] == 0 and base["output_tokens"] == 40 and base["acceptance_rate"] is None
    assert speculative["k"] == 3 and speculative["output_tokens"] == 40
    assert len(speculative["acceptance_per_position"]) == 3 and 0 <= speculative["acceptance_rate"] <= 1
    assert speculative["round_ms"]["verify"] > 0 and speculative["draft_payload_bytes_per_round"] > 0
    assert speculative["ttft_s"]["p50"] > 0 and "speedup_bound" in speculative
    assert (tmp_path / "tokens_per_s.png").stat().st_size > 0


def test_bound_uses_tokens_per_round_over_the_rounds_actually_run():
    """--k auto mixes proposal lengths: 10 rounds of k=1 (all accepted) and 10 of k=4 (none
    accepted) average 1 + 10/20 = 1.5 tokens per round, not 1 + 1.0 + 0 + 0 + 0 = 2."""
    base = {"concurrency": 1, "k": 0, "output_tokens_per_s": 10.0, "target_only_round_ms": 10.0}
    point = {"concurrency": 1, "k": "auto", "output_tokens_per_s": 12.0, "expected_tokens_per_round": 1.5,
             "acceptance_per_position": [0.5, 0.0, 0.0, 0.0], "round_ms": {"draft": 2.0, "verify": 10.0}}
    add_bounds([base, point])
    assert point["speedup_bound"] == pytest.approx(1.5 * 10.0 / 12.0, abs=1e-3)
    assert point["speedup"] == 1.2
