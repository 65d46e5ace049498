"""The compiled forward gives the logits of the eager forward on plain `torch.nn.Linear` weights on
every batch shape a worker runs, compiles a bounded number of graphs, and leaves steps longer
than its graphs take to the eager forward (on oneDNN-packed linears). On the CPU the graphs take
steps of up to 5 tokens (C++ GEMM templates on dense weights); the batch shapes are checked with
the limit raised, as CUDA has none."""

from __future__ import annotations

import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from splitspec.paged.block_manager import BlockManager
from splitspec.paged.cache import CacheConfig, build_paged_cache
from splitspec.paged.compiled import (
    GRAPH_TOKENS,
    SHORT_REGISTER_BLOCK,
    export_compiles,
    prefer_cpp_templates,
    prefer_short_register_blocks,
)
from splitspec.paged import runner as runner_module
from splitspec.paged.kernels import cpu_streamed_linear
from splitspec.paged.runner import CALIBRATION_STEPS, Chunk

TOLERANCE = 1e-4


def chunks_of(blocks, generator, shapes: list[tuple[int, int]], tag: str) -> tuple[list[Chunk], list[Chunk]]:
    """Per (context, new tokens): the prefill of the context (where there is one) and the chunk of
    the new tokens, which want logits each."""
    prefills, chunks = [], []
    for index, (context, new) in enumerate(shapes):
        seq_id = f"{tag}{index}"
        tokens = torch.randint(3, 250, (context + new,), generator=generator).tolist()
        blocks.allocate(seq_id, tokens)
        table = list(blocks.tables[seq_id].block_ids)
        if context:
            prefills.append(Chunk(tokens[:context], 0, blocks.slots(seq_id, 0, context), table, 1))
        chunks.append(Chunk(tokens[context:], context, blocks.slots(seq_id, context, len(tokens)), table, new))
    return prefills, chunks


BATCH_GRAPH_TOKENS = 64  # the limit the batch-graph test sets (on the CPU the graphs take 5 tokens)


def count_graph_calls(runner, graph_calls: list[int]) -> None:
    """From now on, the token count of each forward that reaches `runner`'s graphs goes to `graph_calls`."""
    compiled = runner.compiled

    def counted(graphs):
        return lambda **inputs: graph_calls.append(inputs["input_ids"].shape[1]) or graphs(**inputs)

    compiled.function = counted(compiled.function)
    if compiled.batch_function is not None:
        compiled.batch_function = counted(compiled.batch_function)


def run_batches(runner, blocks, batches: list[list[tuple[int, int]]]) -> list[list[torch.Tensor]]:
    """Each batch's logits, its contexts prefilled first by the same runner (same tokens every call)."""
    generator = torch.Generator().manual_seed(0)
    outputs = []
    for number, shapes in enumerate(batches):
        prefills, chunks = chunks_of(blocks, generator, shapes, f"b{number}-")
        if prefills:
            runner.forward(prefills)
        outputs.append(runner.forward(chunks))
    return outputs


def run_both(loaded, batches: list[list[tuple[int, int]]], graph_calls: list[int] | None = None,
             graph_tokens: int | None = None, batch_gemms: str = "templates"):
    """`batch_gemms`: templates, onednn, or streamed (every graph's linears through the streamed
    linear kernel; the caller lets the runner take it for these small weights)."""
    """Each batch of (context, new) shapes through an eager runner on the model's own linears and
    a compiled runner (packed linears) on identical pools: contexts are prefilled first by the
    same runner, then the batch.
    `graph_calls` collects the token count of each forward that reached the compiled graphs."""
    runs = []
    for compile in (False, True):
        streamed = batch_gemms == "streamed"
        blocks, runner = build_paged_cache(loaded, CacheConfig(num_blocks=256, block_size=4), compile=compile,
                                           pack=compile, gemm_kernel=streamed)
        assert runner.gemm_kernel == (compile and streamed)
        if compile and graph_tokens is not None:
            runner.compiled.max_tokens = graph_tokens
        if compile and not streamed and batch_gemms != runner.compiled.batch_gemms:
            runner.compiled.use_batch_gemms(batch_gemms)
        if compile and graph_calls is not None:
            count_graph_calls(runner, graph_calls)
        runs.append((runner, run_batches(runner, blocks, batches)))
    return runs


@pytest.mark.parametrize("batch_gemms", ["templates", "onednn", "streamed"])
def test_compiled_logits_match_eager_on_every_shape(fresh, batch_gemms, monkeypatch):
    """With each kind of linears in the batch graph (onednn: a third graph, as the templates'
    batch graph was compiled when the runner warmed up; streamed: the kernel in both graphs, taken
    here although these weights stay in cache)."""
    if batch_gemms == "streamed":
        if not cpu_streamed_linear():
            pytest.skip("the streamed linear kernel does not build here (no C++ compiler or no AVX2)")
        monkeypatch.setattr(runner_module, "STREAMED_WEIGHT_BYTES", 0)
    batches = [
        [(0, 7)],                       # a prefill
        [(9, 1)],                       # one decode step
        [(14, 5)],                      # a verify of k + 1 = 5
        [(3, 1), (21, 1), (6, 1), (30, 1)],  # decode steps of four sequences
        [(2, 5), (17, 3), (0, 11)],     # verifies and a prefill packed together
        [(1, 1)],                       # a context inside one block
        [(0, BATCH_GRAPH_TOKENS + 1)],  # a prefill longer than the graphs take: eager
        [(5, BATCH_GRAPH_TOKENS - 3), (8, 3)],  # a batch of exactly as many tokens as they take
    ]
    graph_calls: list[int] = []
    (_, eager), (runner, compiled) = run_both(fresh("target"), batches, graph_calls, BATCH_GRAPH_TOKENS, batch_gemms)
    worst = max((a - b).abs().max().item() for batch_e, batch_c in zip(eager, compiled)
                for a, b in zip(batch_e, batch_c))
    assert worst <= TOLERANCE, f"compiled logits differ from eager by {worst}"
    graphs = 3 if batch_gemms == "onednn" else 2
    assert runner.compiles == graphs, f"{runner.compiles} graphs: one token, and one padded dynamic batch graph"
    limit = BATCH_GRAPH_TOKENS
    steps = [sum(new for _, new in shapes) for shapes in batches]
    prefills = [sum(context for context, _ in shapes) for shapes in batches if any(c for c, _ in shapes)]
    assert sorted(graph_calls) == sorted(t for t in steps + prefills if t <= limit)

    registry = CollectorRegistry()
    export_compiles(registry, lambda: runner.compiles)
    assert registry.get_sample_value("splitspec:compiled_graphs") == graphs


def test_cpu_compiles_short_steps_and_runs_longer_ones_eagerly(fresh):
    batches = [[(9, 1)], [(14, 5)], [(3, 1), (21, 1)], [(0, 7)], [(2, 3), (4, 3)]]
    graph_calls: list[int] = []
    (_, eager), (runner, compiled) = run_both(fresh("target"), batches, graph_calls)
    worst = max((a - b).abs().max().item() for batch_e, batch_c in zip(eager, compiled)
                for a, b in zip(batch_e, batch_c))
    assert worst <= TOLERANCE, f"compiled logits differ from eager by {worst}"
    assert GRAPH_TOKENS["cpu"] == 5 and runner.compiled.max_tokens == 5
    assert runner.compiles == 2, runner.compiles
    assert graph_calls == [1, 5, 2], graph_calls  # the prefills (9, 14, 24, 7, 6 tokens) and the batch of 6: eager


def test_calibration_raises_the_step_limit_to_the_last_step_the_graphs_win(fresh):
    """On a real model: the limit ends at the longest step the graphs ran no slower than eager,
    the steps are timed in order up to the first the graphs lose, no graph is added, and the
    forward still gives the eager logits on steps the raised limit now sends to the graphs."""
    batches = [[(3, 1)] * 12, [(0, 7), (9, 5)]]
    (_, eager), (runner, _) = run_both(fresh("target"), batches)
    timed = runner.calibrate(repeats=1)
    steps = list(timed)
    assert steps == [s for s in CALIBRATION_STEPS if s > GRAPH_TOKENS["cpu"]][: len(steps)] and steps
    won = [tokens for tokens, (graph_ms, eager_ms) in timed.items() if graph_ms <= eager_ms]
    assert won == steps[: len(won)], timed  # timing stops at the first loss
    assert runner.compiled.max_tokens == (won[-1] if won else GRAPH_TOKENS["cpu"])
    assert runner.compiles == 2, f"calibration compiled {runner.compiles - 2} more graphs"

    graph_calls: list[int] = []
    count_graph_calls(runner, graph_calls)
    again = run_batches(runner, BlockManager(256, 4), batches)  # from empty blocks, each context prefilled anew
    worst = max((a - b).abs().max().item() for batch_e, batch_c in zip(eager, again) for a, b in zip(batch_e, batch_c))
    assert worst <= TOLERANCE, f"after calibration the forward differs from eager by {worst}"
    assert (12 in graph_calls) == (runner.compiled.max_tokens >= 12), (graph_calls, runner.compiled.max_tokens)


def test_calibration_keeps_the_default_where_the_graphs_lose_and_stops_at_the_first_loss(fresh):
    _, runner = build_paged_cache(fresh("target"), CacheConfig(num_blocks=64, block_size=4), compile=True)
    scripted = {8: (2.0, 1.0)}  # tokens -> (graph ms, eager ms); graph_tokens 0 is the eager run
    runner._timed_run = lambda step, graph_tokens: (scripted[len(step)][0 if graph_tokens else 1], True)
    assert runner.calibrate() == {8: (2.0, 1.0)} and runner.compiled.max_tokens == GRAPH_TOKENS["cpu"]
    scripted.update({8: (1.0, 2.0), 16: (1.0, 1.0), 32: (3.0, 2.0), 64: (1.0, 2.0)})
    assert list(runner.calibrate()) == [8, 16, 32] and runner.compiled.max_tokens == 16
    assert runner.calibrate() == {32: (3.0, 2.0)} and runner.compiled.max_tokens == 16  # from the limit it has


def test_batch_gemms_keep_the_faster_and_only_for_weights_that_stream_from_memory(fresh):
    """Both kinds of batch-graph linears are timed on one step and the faster kept; a model whose
    weights stay in cache (these tiny ones, below the default bound) is not timed."""
    _, runner = build_paged_cache(fresh("target"), CacheConfig(num_blocks=64, block_size=4), compile=True)
    steps: list[tuple[str, int]] = []
    timed_graphs = []
    scripted = {"templates": 2.0, "onednn": 1.0}

    def step_ms(step, graph_tokens, repeats):
        steps.append((runner.compiled.batch_gemms, len(step)))
        timed_graphs.append(runner.compiled.batch_function)
        return scripted[runner.compiled.batch_gemms]

    runner._step_ms = step_ms
    assert not runner.gemm_kernel  # these weights stay in cache: the streamed linear is for those that stream
    assert runner.choose_batch_gemms() == {} and steps == [] and runner.compiled.batch_function is None
    assert runner.choose_batch_gemms(min_weight_bytes=0) == scripted
    assert steps == [("templates", CALIBRATION_STEPS[0]), ("onednn", CALIBRATION_STEPS[0])]
    assert runner.compiled.batch_gemms == "onednn" and runner.compiled.batch_function is not None
    assert runner.compiled.batch_function is timed_graphs[-1]  # the graph timed is the one kept, not built anew
    scripted.update(templates=1.0, onednn=3.0)
    runner.choose_batch_gemms(min_weight_bytes=0)
    assert runner.compiled.batch_gemms == "templates" and runner.compiled.batch_function is None
    with pytest.raises(ValueError, match="batch_gemms"):
        runner.compiled.use_batch_gemms("mkl")


def test_calibration_stays_within_the_model_positions(fresh):
    """A draft with 40 positions is calibrated on steps that attend to at most 40 tokens (a model
    with learned position embeddings has no row past them)."""
    from splitspec.paged.kv_pool import KVPool
    from splitspec.paged.runner import PagedRunner

    loaded = fresh("draft_short")
    positions = loaded.model.config.max_position_embeddings
    assert positions < 128
    runner = PagedRunner(loaded.model, KVPool(loaded.model.config, 16, 4, loaded.dtype, loaded.device), compile=True)
    steps: list[list[Chunk]] = []
    runner.forward = lambda chunks: steps.append(chunks) or []
    runner.calibrate(repeats=1)
    assert steps and all(chunk.start + len(chunk.token_ids) <= positions for step in steps for chunk in step)
    assert all(len(chunk.block_table) * 4 >= chunk.start + 1 for step in steps for chunk in step)


def test_eager_runner_compiles_nothing(tiny):
    _, runner = build_paged_cache(tiny["target"], CacheConfig(num_blocks=16, block_size=4))
    runner.warm_up()
    assert runner.compiles == 0 and runner.compiled is None


def test_gemm_choices_narrow_to_generated_kernels():
    """Autotuning's choices keep only the generated (C++ template) kernels where there are any;
    the ATen kernel stays where it is the only one."""
    from torch._inductor.select_algorithm import ExternKernelCaller

    aten, template = object.__new__(ExternKernelCaller), object()
    assert prefer_cpp_templates([template, aten]) == [template]
    assert prefer_cpp_templates([aten]) == [aten]


def test_avx512_float32_gemms_use_short_register_blocks_and_others_keep_theirs():
    """Inductor's float32 AVX-512 micro-GEMM keeps only the short register block; the other ISAs
    and dtypes keep the list they had (inductor's, unless a compile in this process already
    narrowed it); a second call changes nothing."""
    import torch._inductor.select_algorithm  # noqa: F401 - inductor's modules import cleanly from here
    from torch._inductor.codegen import cpp_micro_gemm
    from torch._inductor.cpu_vec_isa import VecAVX2, VecAVX512

    fp32_vec = cpp_micro_gemm.CppMicroGemmFP32Vec
    before = list(cpp_micro_gemm.micro_gemm_configs[fp32_vec])
    try:
        prefer_short_register_blocks()
        after = list(cpp_micro_gemm.micro_gemm_configs[fp32_vec])
        prefer_short_register_blocks()
        assert cpp_micro_gemm.micro_gemm_configs[fp32_vec] == after

        def blocks(configs, isa, dtype):
            return [tuple(c.register_blocking) for c in configs if c.vec_isa_cls is isa and c.input_dtype == dtype
                    and c.input2_dtype == dtype and c.output_dtype == dtype]

        assert blocks(after, VecAVX512, torch.float) == [SHORT_REGISTER_BLOCK]
        assert blocks(after, VecAVX2, torch.float) == blocks(before, VecAVX2, torch.float)
        assert [c for c in after if c.input_dtype != torch.float] == [c for c in before if c.input_dtype != torch.float]
    finally:
        cpp_micro_gemm.micro_gemm_configs[fp32_vec] = before


def test_cache_keys_follow_this_projects_compile_choices():
    """The settings every CPU compile runs with carry a pass whose uuid is compiled.py's hash, so
    inductor's cache keys change with the choices made there."""
    import hashlib

    import splitspec.paged.compiled as compiled

    key = compiled.inductor_patches(torch.device("cpu"))["post_grad_custom_post_pass"]
    with open(compiled.__file__, "rb") as source:
        assert key.uuid() == hashlib.sha256(source.read()).hexdigest()


def test_models_of_one_class_each_run_their_own_graphs(fresh):
    """Two models of the same class and shapes, different weights, compiled in one process: each
    forward gives its own model's logits. The graphs skip guards on the models' modules and
    weights (frozen into the graphs), so running another model's graph would go unnoticed by
    those guards; each runner's compile keeps its graphs apart."""
    from splitspec.paged.kv_pool import KVPool
    from splitspec.paged.runner import PagedRunner

    step = [Chunk(token_ids=[17], start=0, slots=[0], block_table=[0], num_logits=1)]
    runners = {}
    for name in ("target", "draft_noisy"):
        loaded = fresh(name)
        for compile in (False, True):
            pool = KVPool(loaded.model.config, 4, 4, loaded.dtype, loaded.device)
            runners[name, compile] = PagedRunner(loaded.model, pool, compile=compile, pack=False)
    outputs = {key: runner.forward(step)[0] for key, runner in sorted(runners.items(), key=lambda item: item[0][1])}
    for name in ("target", "draft_noisy"):
        assert (outputs[name, True] - outputs[name, False]).abs().max() <= TOLERANCE, name
    assert (outputs["target", False] - outputs["draft_noisy", False]).abs().max() > 100 * TOLERANCE


def test_compile_by_default_except_half_precision_on_the_cpu():
    from splitspec.paged.compiled import compiles_faster

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiles_faster(cpu, torch.float32) and compiles_faster(cuda, torch.bfloat16)
    assert not compiles_faster(cpu, torch.bfloat16) and not compiles_faster(cpu, torch.float16)

    from types import SimpleNamespace

    from splitspec.config import WorkerConfig

    float32, bfloat16 = (SimpleNamespace(device=cpu, dtype=dtype) for dtype in (torch.float32, torch.bfloat16))
    assert WorkerConfig(model="m", port=0).compiles(float32)
    assert not WorkerConfig(model="m", port=0).compiles(bfloat16)
    assert not WorkerConfig(model="m", port=0, enforce_eager=True).compiles(float32)


def test_calibration_compares_graph_and_eager_in_turn_by_their_least_quiet_runs(monkeypatch):
    """A draft compiling beside the target's start loads some runs: graph and eager are timed in
    turn, a run where the threads waited for a CPU is not counted, and each kind is judged by its
    fastest quiet run (timed one kind after the other with medians, a target kept 8 tokens where the
    graphs win to 128; by the least of all runs, a start beside a draft's compile still did)."""
    from types import SimpleNamespace

    from splitspec.paged import runner as runner_module
    from splitspec.paged.runner import PagedRunner

    monkeypatch.setattr(runner_module, "QUIET_PAUSE_SECONDS", 0.0)
    runs = {8: iter([(40.0, False), (5.0, True), (3.0, False), (5.2, True), (5.1, True)]),
            0: iter([(7.0, True), (7.1, True), (60.0, False), (2.0, False), (7.3, True)])}
    calls: list[int] = []

    def timed_run(step, graph_tokens):
        calls.append(graph_tokens)
        return next(runs[graph_tokens])

    fake = SimpleNamespace(_timed_run=timed_run)
    far = time.monotonic() + 60
    assert PagedRunner._compare_ms(fake, [], 8, 3, far) == (5.0, 7.0)
    assert calls == [8, 0] * 5  # until each kind had 3 quiet runs

    calls.clear()
    runs = {8: iter([(40.0, False), (30.0, False)]), 0: iter([(7.0, True), (6.0, True)])}
    assert PagedRunner._compare_ms(fake, [], 8, 3, time.monotonic() + 0.0) == (40.0, 7.0)  # no wait left
    runs = {8: iter([(40.0, False), (30.0, True)]), 0: iter([(70.0, False), (6.0, True)])}

    def slow_second_run(step, graph_tokens):
        calls.append(graph_tokens)
        if len(calls) > 2:
            time.sleep(0.2)
        return next(runs[graph_tokens])

    calls.clear()
    slow = SimpleNamespace(_timed_run=slow_second_run)
    assert PagedRunner._compare_ms(slow, [], 8, 3, time.monotonic() + 0.1) == (30.0, 6.0)  # the quiet, though < 3
