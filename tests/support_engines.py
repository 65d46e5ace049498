"""Engines over a small paged pool, driven step by step (no gRPC)."""

from __future__ import annotations

from draft_worker.engine import DraftEngine
from splitspec.models import LoadedModel
from splitspec.paged.cache import CacheConfig, build_paged_cache
from target_worker.engine import TargetEngine


def target_engine(loaded: LoadedModel, num_blocks: int = 64, block_size: int = 4, **kwargs) -> TargetEngine:
    blocks, runner = build_paged_cache(loaded, CacheConfig(num_blocks=num_blocks, block_size=block_size))
    return TargetEngine(loaded, blocks, runner, **{"max_batch_tokens": 4096, **kwargs})


def draft_engine(loaded: LoadedModel, num_blocks: int = 64, block_size: int = 4, max_k: int = 16) -> DraftEngine:
    blocks, runner = build_paged_cache(loaded, CacheConfig(num_blocks=num_blocks, block_size=block_size))
    return DraftEngine(loaded, blocks, runner, max_k=max_k)


def run_one(engine, item):
    """One step with one item; returns its outcome (raises it when it is an error)."""
    outcomes, waiting = engine.step([item])
    assert not waiting, "the item was not admitted"
    outcome = outcomes[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
