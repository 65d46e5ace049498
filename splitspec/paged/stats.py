"""Step and pool figures both workers report (GetStats, metrics, `splitspec stats`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from splitspec.paged.arrivals import Arrivals
from splitspec.paged.block_manager import BlockManager
from splitspec.v1 import common_pb2


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    batched_tokens: int = 0
    preemptions: int = 0
    steps_by_batch: list[int] = field(default_factory=lambda: [0])  # [n]: steps that ran n sequences
    mask_seconds: float = 0.0       # structured outputs: computing grammar masks (beside the forward)
    mask_wait_seconds: float = 0.0  # of which the step waited for after its forward
    masked_rows: int = 0            # scored positions a grammar masked
    step_seconds: float = 0.0       # in steps on the model thread (forward, sampling, bookkeeping)
    forward_seconds: float = 0.0    # of which in forward passes

    @property
    def batched_sequences(self) -> int:
        """Summed over steps: mean batch size = batched_sequences / steps."""
        return sum(n * count for n, count in enumerate(self.steps_by_batch))

    @property
    def max_batch_sequences(self) -> int:
        return len(self.steps_by_batch) - 1

    @contextmanager
    def timing_step(self) -> Iterator[None]:
        """Adds the time inside to `step_seconds` (an engine's whole step)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.step_seconds += time.perf_counter() - started

    def record_step(self, sequences: int, tokens: int, forward_seconds: float = 0.0) -> None:
        self.steps += 1
        self.forward_seconds += forward_seconds
        self.batched_tokens += tokens
        while len(self.steps_by_batch) <= sequences:
            self.steps_by_batch.append(0)
        self.steps_by_batch[sequences] += 1


def worker_stats(blocks: BlockManager | None, stats: EngineStats, running: int, waiting: int,
                 arrivals: Arrivals | None = None) -> common_pb2.WorkerStats:
    """`blocks` None: a worker without a KV pool (n-gram drafting); the pool fields stay 0.
    `arrivals`: the step loop's holds for expected sequences (a target's)."""
    steps = max(stats.steps, 1)
    reply = common_pb2.WorkerStats(
        running_sequences=running,
        waiting_requests=waiting,
        preemptions=stats.preemptions,
        steps=stats.steps,
        mean_batch_sequences=stats.batched_sequences / steps,
        max_batch_sequences=stats.max_batch_sequences,
        mean_batch_tokens=stats.batched_tokens / steps,
        steps_by_batch_sequences=stats.steps_by_batch if stats.steps else [],
        step_seconds=stats.step_seconds,
        forward_seconds=stats.forward_seconds,
    )
    if arrivals is not None:
        reply.held_steps, reply.hold_seconds, reply.late_arrivals = arrivals.holds, arrivals.hold_seconds, arrivals.late
        reply.expected_gap_seconds = arrivals.gap(quick=False) or 0.0
    if blocks is not None:
        pool = blocks.stats()
        reply.block_size = blocks.block_size
        reply.blocks_total, reply.blocks_used, reply.blocks_free = pool.num_blocks, pool.num_used, pool.num_free
        reply.utilization, reply.prefix_cache_hit_rate = pool.utilization, pool.prefix_hit_rate
    return reply
