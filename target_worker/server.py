"""Target worker process: load the model, serve TargetWorker + health, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from splitspec.config import WorkerConfig
from splitspec.errors import InvalidArgument, Unavailable
from splitspec.models import LoadedModel, load_model
from splitspec.paged.cache import CacheConfig, build_paged_cache, plan_num_blocks
from splitspec.paged.compiled import export_compiles
from splitspec.service import (
    RunningServer,
    ServerSecurity,
    message_limit,
    off_thread,
    serve_until_signal,
    start_stepped_server,
)
from splitspec.v1 import target_pb2, target_pb2_grpc
from target_worker.cores import CorePlan
from target_worker.engine import TargetEngine
from target_worker.metrics import GrammarMaskCollector, TargetMetrics
from target_worker.servicer import TargetServicer
from target_worker.tensor_parallel import (
    FollowerSpec,
    TensorParallelGroup,
    TensorParallelRunner,
    check_devices,
    check_shardable_checkpoint,
    free_address,
    init_group,
    load_shard,
    rank_device,
)

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class TargetConfig(WorkerConfig):
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_batch_tokens: int | None = None  # default: max(4096, the context)
    batching: bool = True
    tensor_parallel_size: int = 1
    threads: int | None = None
    verify_cores: set[int] | None = None  # see CorePlan: with drafts on the others, verify on these


async def start_target(
    loaded: LoadedModel,
    port: int = 0,
    host: str = "127.0.0.1",
    cache: CacheConfig | None = None,
    max_batch_tokens: int | None = None,
    batching: bool = True,
    tensor_parallel_size: int = 1,
    watchdog_seconds: float = 60.0,
    tls: Any = None,
    reflection: bool = False,
    model_nice: int = 0,
    compile: bool = False,
    cores: CorePlan | None = None,
) -> RunningServer:
    """Serve an already loaded model (used by the CLI and by in-process tests). `compile`: the
    forward runs through torch.compile, compiled before the server starts (not with tensor
    parallelism, whose ranks run eagerly). `cores`: the model thread's cores step by step."""
    cache = cache or CacheConfig()
    max_batch_tokens = max_batch_tokens or max(4096, loaded.max_model_len)
    if max_batch_tokens < loaded.max_model_len:
        raise InvalidArgument("--max-batch-tokens", f"must be at least the context ({loaded.max_model_len}): "
                                                    "a whole prompt is prefilled in one step")
    if tensor_parallel_size > 1:
        blocks, runner = await off_thread(build_paged_cache, loaded, cache, tensor_parallel_size, TensorParallelRunner)
    else:
        if cores is not None and len(cores.every) != os.cpu_count():
            # inductor writes num_threads(N) into its OpenMP regions unless N is the machine's core
            # count: make them follow torch's count step by step. Not otherwise: it also gives every
            # small loop a parallel region (forward at 2 threads, 1 / 4 / 32 rows: 0.2-1.0 / 0.3-0.5 /
            # 2.1-2.2 ms slower, two runs)
            import torch._inductor.config

            torch._inductor.config.cpp.dynamic_threads = True
        blocks, runner = await off_thread(build_paged_cache, loaded, cache, compile=compile, calibrate=compile)
        if compile and cores is not None and cores.beside_drafts != cores.every:
            await off_thread(cores.warm_up, runner.warm_up)
    engine = TargetEngine(loaded, blocks, runner, max_num_seqs=cache.max_num_seqs,
                          max_batch_tokens=max_batch_tokens, batching=batching, cores=cores)
    metrics = TargetMetrics()
    export_compiles(metrics.registry, lambda: runner.compiles)
    metrics.registry.register(GrammarMaskCollector(engine.stats))
    return await start_stepped_server(
        engine, lambda steps: TargetServicer(engine, metrics, steps), target_pb2_grpc.add_TargetWorkerServicer_to_server,
        target_pb2.DESCRIPTOR.services_by_name["TargetWorker"], metrics.registry, port, host, "target-model",
        watchdog_seconds, ServerSecurity(tls=tls, reflection=reflection, max_message_bytes=message_limit(loaded.vocab_size)),
        model_nice,
    )


async def serve_target(config: TargetConfig) -> None:
    if config.tensor_parallel_size > 1:
        await serve_tensor_parallel(config)
        return
    loaded = await off_thread(load_model, config.model, config.device, config.dtype, config.max_model_len)
    running = await start_target(loaded, config.port, config.host, config.cache, config.max_batch_tokens,
                                 config.batching, watchdog_seconds=config.watchdog_seconds, tls=config.tls,
                                 reflection=config.reflection, model_nice=config.model_nice,
                                 compile=config.compiles(loaded),
                                 cores=CorePlan.for_this_process(config.verify_cores) if config.verify_cores else None)
    log.info("target worker serving", extra={"port": running.port, "model": config.model})
    await serve_until_signal(running, config.grace, config.metrics_port)


async def serve_tensor_parallel(config: TargetConfig) -> None:
    """Rank 0: launch ranks 1..N-1, join the group, shard, serve; stop everything if a rank dies."""
    size = config.tensor_parallel_size
    check_devices(config.device, size)
    check_shardable_checkpoint(config.model, size)
    device = rank_device(config.device, 0)
    loaded = await off_thread(load_shard, config.model, device, config.dtype, config.max_model_len, 0, size)
    num_blocks = plan_num_blocks(loaded, config.cache, size)
    spec = FollowerSpec(config.model, config.device, config.dtype, config.max_model_len, num_blocks,
                        config.cache.block_size, config.threads, free_address(), size)
    group = TensorParallelGroup.launch(spec)
    try:
        await _join_group(group, spec.address, size, device)
        cache = CacheConfig(block_size=config.cache.block_size, num_blocks=num_blocks,
                            max_num_seqs=config.cache.max_num_seqs)
        running = await start_target(loaded, config.port, config.host, cache, config.max_batch_tokens,
                                     config.batching, size, config.watchdog_seconds, config.tls, config.reflection,
                                     config.model_nice)
    except BaseException:
        group.kill()
        raise
    watchdog = asyncio.get_running_loop().create_task(_watch(group, running))
    log.info("target worker serving", extra={"port": running.port, "model": config.model,
                                             "tensor_parallel_size": size})
    try:
        await serve_until_signal(running, config.grace, config.metrics_port)
    finally:
        watchdog.cancel()
        running.state.runner.stop_followers()
        group.kill()


async def _join_group(group: TensorParallelGroup, address: str, size: int, device: str) -> None:
    joining = asyncio.get_running_loop().run_in_executor(None, init_group, address, 0, size, device)
    while not joining.done():
        rank = group.dead_rank()
        if rank is not None:
            raise Unavailable(f"tensor-parallel rank {rank} exited during startup (see its log above)")
        await asyncio.sleep(0.2)
    joining.result()


async def _watch(group: TensorParallelGroup, running: RunningServer) -> None:
    """A dead rank ends the worker: health NOT_SERVING, the other ranks killed, exit code 1."""
    while True:
        rank = group.dead_rank()
        if rank is not None:
            log.error("tensor-parallel rank died; stopping the worker", extra={"rank": rank})
            await running.set_serving(False)
            group.kill()
            await asyncio.sleep(0.2)  # let in-flight RPCs carry their UNAVAILABLE out
            os._exit(1)
        await asyncio.sleep(0.2)
