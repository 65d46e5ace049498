"""Target worker process: load the model, serve TargetWorker + health, drain on SIGTERM."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from splitspec.config import WorkerConfig
from splitspec.errors import InvalidArgument
from splitspec.models import LoadedModel, load_model
from splitspec.paged.cache import CacheConfig, build_paged_cache
from splitspec.service import RunningServer, serve_until_signal, start_stepped_server
from splitspec.v1 import target_pb2, target_pb2_grpc
from target_worker.engine import TargetEngine
from target_worker.metrics import TargetMetrics
from target_worker.servicer import TargetServicer

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class TargetConfig(WorkerConfig):
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_batch_tokens: int | None = None  # default: max(4096, the context)
    batching: bool = True


async def start_target(
    loaded: LoadedModel,
    port: int = 0,
    host: str = "127.0.0.1",
    cache: CacheConfig | None = None,
    max_batch_tokens: int | None = None,
    batching: bool = True,
) -> RunningServer:
    """Serve an already loaded model (used by the CLI and by in-process tests)."""
    cache = cache or CacheConfig()
    max_batch_tokens = max_batch_tokens or max(4096, loaded.max_model_len)
    if max_batch_tokens < loaded.max_model_len:
        raise InvalidArgument("--max-batch-tokens", f"must be at least the context ({loaded.max_model_len}): "
                                                    "a whole prompt is prefilled in one step")
    blocks, runner = build_paged_cache(loaded, cache)
    engine = TargetEngine(loaded, blocks, runner, max_num_seqs=cache.max_num_seqs,
                          max_batch_tokens=max_batch_tokens, batching=batching)
    metrics = TargetMetrics()
    return await start_stepped_server(
        engine, lambda steps: TargetServicer(engine, metrics, steps), target_pb2_grpc.add_TargetWorkerServicer_to_server,
        target_pb2.DESCRIPTOR.services_by_name["TargetWorker"], metrics.registry, port, host, "target-model",
    )


async def serve_target(config: TargetConfig) -> None:
    loaded = load_model(config.model, config.device, config.dtype, config.max_model_len)
    running = await start_target(loaded, config.port, config.host, config.cache, config.max_batch_tokens,
                                 config.batching)
    log.info("target worker serving", extra={"port": running.port, "model": config.model})
    await serve_until_signal(running, config.grace, config.metrics_port)
