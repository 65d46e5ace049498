"""Step and pool figures both workers report (GetStats, metrics, `splitspec stats`)."""

from __future__ import annotations

from dataclasses import dataclass

from splitspec.paged.block_manager import BlockManager
from splitspec.v1 import common_pb2


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    batched_sequences: int = 0  # summed over steps: mean batch size = batched_sequences / steps
    batched_tokens: int = 0
    max_batch_sequences: int = 0
    preemptions: int = 0

    def record_step(self, sequences: int, tokens: int) -> None:
        self.steps += 1
        self.batched_sequences += sequences
        self.batched_tokens += tokens
        self.max_batch_sequences = max(self.max_batch_sequences, sequences)


def worker_stats(blocks: BlockManager, stats: EngineStats, running: int, waiting: int) -> common_pb2.WorkerStats:
    pool = blocks.stats()
    steps = max(stats.steps, 1)
    return common_pb2.WorkerStats(
        block_size=blocks.block_size,
        blocks_total=pool.num_blocks,
        blocks_used=pool.num_used,
        blocks_free=pool.num_free,
        utilization=pool.utilization,
        running_sequences=running,
        waiting_requests=waiting,
        preemptions=stats.preemptions,
        prefix_cache_hit_rate=pool.prefix_hit_rate,
        steps=stats.steps,
        mean_batch_sequences=stats.batched_sequences / steps,
        max_batch_sequences=stats.max_batch_sequences,
        mean_batch_tokens=stats.batched_tokens / steps,
    )
