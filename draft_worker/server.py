"""Draft worker process: load the model, serve DraftWorker + health, drain on SIGTERM."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from draft_worker.engine import DraftEngine
from draft_worker.metrics import DraftMetrics
from draft_worker.servicer import DraftServicer
from splitspec.models import LoadedModel, load_model
from splitspec.service import RunningServer, serve_until_signal, start_server
from splitspec.v1 import draft_pb2, draft_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DraftConfig:
    model: str
    port: int = 50053
    host: str = "0.0.0.0"
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    max_k: int = 16
    metrics_port: int | None = None
    grace: float = 10.0


async def start_draft(loaded: LoadedModel, port: int = 0, host: str = "127.0.0.1", max_k: int = 16) -> RunningServer:
    """Serve an already loaded draft model (used by the CLI and by in-process tests)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-model")
    metrics = DraftMetrics()
    engine = DraftEngine(loaded, max_k=max_k)
    servicer = DraftServicer(engine, metrics, executor)

    def register(server: grpc.aio.Server) -> list[str]:
        draft_pb2_grpc.add_DraftWorkerServicer_to_server(servicer, server)
        return [draft_pb2.DESCRIPTOR.services_by_name["DraftWorker"].full_name]

    running = await start_server(register, port, host, metrics.registry, engine)
    running.on_stop.append(lambda: executor.shutdown(wait=False, cancel_futures=True))
    return running


async def serve_draft(config: DraftConfig) -> None:
    loaded = load_model(config.model, config.device, config.dtype, config.max_model_len)
    running = await start_draft(loaded, config.port, config.host, config.max_k)
    log.info("draft worker serving", extra={"port": running.port, "model": config.model})
    await serve_until_signal(running, config.grace, config.metrics_port)
