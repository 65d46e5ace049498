"""The compiled forward (torch.compile with freezing and weight prepacking) gives the eager
forward's logits on every batch shape a worker runs, and compiles a bounded number of graphs."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry

from splitspec.paged.cache import CacheConfig, build_paged_cache
from splitspec.paged.compiled import export_compiles
from splitspec.paged.runner import Chunk

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


def run_both(loaded, batches: list[list[tuple[int, int]]]):
    """Each batch of (context, new) shapes through an eager and a compiled runner on identical
    pools: contexts are prefilled first by the same runner (eager or compiled), then the batch."""
    runs = []
    for compile in (False, True):
        blocks, runner = build_paged_cache(loaded, CacheConfig(num_blocks=256, block_size=4), compile=compile)
        generator = torch.Generator().manual_seed(0)
        outputs = []
        for number, shapes in enumerate(batches):
            prefills, chunks = chunks_of(blocks, generator, shapes, f"b{number}-")
            if prefills:
                runner.forward(prefills)
            outputs.append(runner.forward(chunks))
        runs.append((runner, outputs))
    return runs


def test_compiled_logits_match_eager_on_every_shape(fresh):
    batches = [
        [(0, 7)],                       # a prefill
        [(9, 1)],                       # one decode step
        [(14, 5)],                      # a verify of k + 1 = 5
        [(3, 1), (21, 1), (6, 1), (30, 1)],  # decode steps of four sequences
        [(2, 5), (17, 3), (0, 11)],     # verifies and a prefill packed together
        [(1, 1)],                       # a context inside one block
    ]
    (_, eager), (runner, compiled) = run_both(fresh("target"), batches)
    worst = max((a - b).abs().max().item() for batch_e, batch_c in zip(eager, compiled)
                for a, b in zip(batch_e, batch_c))
    assert worst <= TOLERANCE, f"compiled logits differ from eager by {worst}"
    assert runner.compiles == 2, f"{runner.compiles} graphs: one token, and one padded dynamic batch graph"

    registry = CollectorRegistry()
    export_compiles(registry, lambda: runner.compiles)
    assert registry.get_sample_value("splitspec:compiled_graphs") == 2


def test_eager_runner_compiles_nothing(tiny):
    _, runner = build_paged_cache(tiny["target"], CacheConfig(num_blocks=16, block_size=4))
    runner.warm_up()
    assert runner.compiles == 0 and runner.compiled is None
