"""Sizing and building a worker's paged cache: block manager + pool + runner."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from splitspec.errors import InvalidArgument
from splitspec.models import LoadedModel
from splitspec.paged.block_manager import BlockManager
from splitspec.paged.kv_pool import KVPool, available_memory, bytes_per_block
from splitspec.paged.runner import PagedRunner

log = logging.getLogger(__name__)
DEFAULT_MEMORY_FRACTION = 0.5


@dataclass(slots=True, kw_only=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None         # wins over kv_cache_memory
    kv_cache_memory: float | None = None  # bytes (> 1) or a fraction of free device memory (<= 1)
    max_num_seqs: int = 256


def parse_memory(text: str) -> float:
    """'0.3' (a fraction), '2e9' or '2GiB' / '512MiB' / '1GB' (bytes)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    lowered = text.strip().lower()
    for unit, scale in units.items():
        if lowered.endswith(unit):
            return float(lowered[: -len(unit)]) * scale
    return float(lowered)


def plan_num_blocks(loaded: LoadedModel, config: CacheConfig, shards: int = 1) -> int:
    """--num-blocks if given; else enough for --max-num-seqs full-length sequences, capped by
    --kv-cache-memory (default: half of the free device memory)."""
    if config.block_size < 1:
        raise InvalidArgument("--block-size", f"must be >= 1, got {config.block_size}")
    if config.num_blocks is not None:
        if config.num_blocks < 1:
            raise InvalidArgument("--num-blocks", f"must be >= 1, got {config.num_blocks}")
        return config.num_blocks
    per_block = bytes_per_block(loaded.model.config, config.block_size, loaded.dtype) // shards
    memory = config.kv_cache_memory if config.kv_cache_memory is not None else DEFAULT_MEMORY_FRACTION
    if memory <= 0:
        raise InvalidArgument("--kv-cache-memory", f"must be > 0, got {memory}")
    budget = memory * available_memory(loaded.device) if memory <= 1 else memory
    wanted = -(-loaded.max_model_len // config.block_size) * config.max_num_seqs
    num_blocks = min(wanted, int(budget // per_block))
    if num_blocks < 1:
        raise InvalidArgument("--kv-cache-memory", f"{budget:.0f} bytes hold no {per_block}-byte KV block")
    return num_blocks


def build_paged_cache(
    loaded: LoadedModel, config: CacheConfig, shards: int = 1, runner_class: type[PagedRunner] = PagedRunner,
    compile: bool = False, pack: bool = True, calibrate: bool = False, paged_kernel: bool = True,
    gemm_kernel: bool = True,
) -> tuple[BlockManager, PagedRunner]:
    """`shards` > 1: this rank's pool holds only its share of the KV heads (tensor parallelism);
    `compile`: the runner's forward goes through torch.compile; `pack`: its linears run on
    oneDNN-packed weights (CPU); `calibrate` (with `compile`): the longest step the graphs take is
    measured on this machine (`PagedRunner.calibrate`); `paged_kernel`: attention through the CPU
    paged kernel where it builds (`kernels.py`); `gemm_kernel`: the graphs' linears through the
    streamed linear kernel where the runner takes it (`PagedRunner`)."""
    num_blocks = plan_num_blocks(loaded, config, shards)
    pool = KVPool(loaded.model.config, num_blocks, config.block_size, loaded.dtype, loaded.device, shards)
    log.info("kv cache allocated", extra={"num_blocks": num_blocks, "block_size": config.block_size,
                                          "bytes": num_blocks * bytes_per_block(loaded.model.config, config.block_size,
                                                                                loaded.dtype)})
    runner = runner_class(loaded.model, pool, compile, pack, paged_kernel, gemm_kernel)
    if compile:
        started = time.perf_counter()
        runner.warm_up()
        log.info("forward compiled", extra={"graphs": runner.compiles, "seconds": round(time.perf_counter() - started, 1)})
        if calibrate:
            started = time.perf_counter()
            gemms = runner.choose_batch_gemms()
            if gemms:
                log.info("batch graph linears chosen", extra={
                    "batch_gemms": runner.compiled.batch_gemms, "seconds": round(time.perf_counter() - started, 1),
                    "step_ms": {name: round(ms, 2) for name, ms in gemms.items()}})
            started = time.perf_counter()
            timed = runner.calibrate()
            log.info("graph step limit calibrated", extra={
                "max_tokens": runner.compiled.max_tokens, "seconds": round(time.perf_counter() - started, 1),
                "graph_vs_eager_ms": {tokens: [round(ms, 2) for ms in pair] for tokens, pair in timed.items()}})
    return BlockManager(num_blocks, config.block_size), runner
