"""Draft worker process: build the drafter (a model, the target with layers skipped, or n-gram
lookup), serve DraftWorker + health, drain on SIGTERM."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from draft_worker.engine import DraftEngine
from draft_worker.metrics import DraftMetrics
from draft_worker.ngram import NgramEngine
from draft_worker.servicer import DraftServicer
from splitspec.config import WorkerConfig
from splitspec.errors import InvalidArgument
from splitspec.layerskip import skip_layers
from splitspec.models import LoadedModel, load_model, load_vocabulary
from splitspec.paged.cache import CacheConfig, build_paged_cache
from splitspec.paged.compiled import export_compiles
from splitspec.service import (
    RunningServer,
    ServerSecurity,
    message_limit,
    off_thread,
    serve_until_signal,
    start_stepped_server,
)
from splitspec.v1 import draft_pb2, draft_pb2_grpc

log = logging.getLogger(__name__)


DRAFT_METHODS = ("model", "layerskip", "ngram")


@dataclass(slots=True, kw_only=True)
class DraftConfig(WorkerConfig):
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_k: int = 16
    method: str = "model"                                 # model | layerskip | ngram
    skip_layers: list[int] = field(default_factory=list)  # layerskip: the target's layers to skip
    ngram_min: int = 1
    ngram_max: int = 4


async def start_draft(
    loaded: LoadedModel, port: int = 0, host: str = "127.0.0.1", max_k: int = 16, cache: CacheConfig | None = None,
    watchdog_seconds: float = 60.0,
    tls: Any = None,
    reflection: bool = False,
    model_nice: int = 0,
    compile: bool = False,
) -> RunningServer:
    """Serve an already loaded draft model (a separate model, or the target with layers skipped);
    `compile`: its forward runs through torch.compile, compiled before the server starts."""
    blocks, runner = await off_thread(build_paged_cache, loaded, cache or CacheConfig(), compile=compile,
                                      calibrate=compile)
    engine = DraftEngine(loaded, blocks, runner, max_k=max_k)
    return await serve_engine(engine, loaded.vocab_size, port, host, watchdog_seconds, tls, reflection, model_nice)


async def start_ngram_draft(
    vocabulary: LoadedModel, port: int = 0, host: str = "127.0.0.1", max_k: int = 16, ngram_min: int = 1,
    ngram_max: int = 4, watchdog_seconds: float = 60.0, tls: Any = None, reflection: bool = False,
    model_nice: int = 0,
) -> RunningServer:
    """Serve n-gram prompt lookup over the target's vocabulary (`load_vocabulary` of the target)."""
    engine = NgramEngine(vocabulary, ngram_min, ngram_max, max_k)
    return await serve_engine(engine, vocabulary.vocab_size, port, host, watchdog_seconds, tls, reflection,
                              model_nice)


async def serve_engine(engine: DraftEngine | NgramEngine, vocab_size: int, port: int, host: str,
                       watchdog_seconds: float, tls: Any, reflection: bool, model_nice: int = 0) -> RunningServer:
    metrics = DraftMetrics()
    runner = getattr(engine, "runner", None)
    export_compiles(metrics.registry, lambda: runner.compiles if runner is not None else 0)
    return await start_stepped_server(
        engine, lambda steps: DraftServicer(engine, metrics, steps), draft_pb2_grpc.add_DraftWorkerServicer_to_server,
        draft_pb2.DESCRIPTOR.services_by_name["DraftWorker"], metrics.registry, port, host, "draft-model",
        watchdog_seconds,
        ServerSecurity(tls=tls, reflection=reflection, max_message_bytes=message_limit(vocab_size, engine.max_k)),
        model_nice,
    )


async def serve_draft(config: DraftConfig) -> None:
    if config.method not in DRAFT_METHODS:
        raise InvalidArgument("--method", f"expected one of {', '.join(DRAFT_METHODS)}, got {config.method!r}")
    if config.method == "ngram":
        vocabulary = load_vocabulary(config.model, config.max_model_len)
        running = await start_ngram_draft(vocabulary, config.port, config.host, config.max_k, config.ngram_min,
                                          config.ngram_max, config.watchdog_seconds, config.tls, config.reflection,
                                          config.model_nice)
    else:
        if config.method == "layerskip" and not config.skip_layers:
            raise InvalidArgument("--skip-layers", "layerskip needs the layers to skip (--skip-layers 1,3 or "
                                                   "--skip-layers-file best.json from splitspec search-skip)")
        loaded = await off_thread(load_model, config.model, config.device, config.dtype, config.max_model_len)
        if config.method == "layerskip":
            skip_layers(loaded.model, config.skip_layers)
            loaded.name = f"{config.model} skipping layers {','.join(map(str, config.skip_layers))}"
        running = await start_draft(loaded, config.port, config.host, config.max_k, config.cache,
                                    config.watchdog_seconds, config.tls, config.reflection, config.model_nice,
                                    compile=config.compiles(loaded))
    log.info("draft worker serving", extra={"port": running.port, "model": config.model, "method": config.method})
    await serve_until_signal(running, config.grace, config.metrics_port)
