"""Draft worker process: load the model, serve DraftWorker + health, drain on SIGTERM."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from draft_worker.engine import DraftEngine
from draft_worker.metrics import DraftMetrics
from draft_worker.servicer import DraftServicer
from splitspec.config import WorkerConfig
from splitspec.models import LoadedModel, load_model
from splitspec.paged.cache import CacheConfig, build_paged_cache
from splitspec.service import (
    RunningServer,
    ServerSecurity,
    message_limit,
    serve_until_signal,
    start_stepped_server,
)
from splitspec.v1 import draft_pb2, draft_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class DraftConfig(WorkerConfig):
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_k: int = 16


async def start_draft(
    loaded: LoadedModel, port: int = 0, host: str = "127.0.0.1", max_k: int = 16, cache: CacheConfig | None = None,
    watchdog_seconds: float = 60.0,
    tls: Any = None,
    reflection: bool = False,
) -> RunningServer:
    """Serve an already loaded draft model (used by the CLI and by in-process tests)."""
    blocks, runner = build_paged_cache(loaded, cache or CacheConfig())
    engine = DraftEngine(loaded, blocks, runner, max_k=max_k)
    metrics = DraftMetrics()
    return await start_stepped_server(
        engine, lambda steps: DraftServicer(engine, metrics, steps), draft_pb2_grpc.add_DraftWorkerServicer_to_server,
        draft_pb2.DESCRIPTOR.services_by_name["DraftWorker"], metrics.registry, port, host, "draft-model",
        watchdog_seconds,
        ServerSecurity(tls=tls, reflection=reflection, max_message_bytes=message_limit(loaded.vocab_size, max_k)),
    )


async def serve_draft(config: DraftConfig) -> None:
    loaded = load_model(config.model, config.device, config.dtype, config.max_model_len)
    running = await start_draft(loaded, config.port, config.host, config.max_k, config.cache, config.watchdog_seconds,
                                config.tls, config.reflection)
    log.info("draft worker serving", extra={"port": running.port, "model": config.model})
    await serve_until_signal(running, config.grace, config.metrics_port)
