"""Target worker process: load the model, serve TargetWorker + health, drain on SIGTERM."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from splitspec.config import WorkerConfig
from splitspec.models import LoadedModel, load_model
from splitspec.service import RunningServer, model_thread, registration, serve_until_signal, start_server
from splitspec.v1 import target_pb2, target_pb2_grpc
from target_worker.engine import TargetEngine
from target_worker.metrics import TargetMetrics
from target_worker.servicer import TargetServicer

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class TargetConfig(WorkerConfig):
    max_num_seqs: int = 256


async def start_target(loaded: LoadedModel, port: int = 0, host: str = "127.0.0.1", max_num_seqs: int = 256) -> RunningServer:
    """Serve an already loaded model (used by the CLI and by in-process tests)."""
    executor = model_thread("target-model")
    metrics = TargetMetrics()
    engine = TargetEngine(loaded, max_num_seqs=max_num_seqs)
    register = registration(
        target_pb2_grpc.add_TargetWorkerServicer_to_server,
        TargetServicer(engine, metrics, executor),
        target_pb2.DESCRIPTOR.services_by_name["TargetWorker"],
    )
    return await start_server(register, port, host, metrics.registry, engine, executor)


async def serve_target(config: TargetConfig) -> None:
    loaded = load_model(config.model, config.device, config.dtype, config.max_model_len)
    running = await start_target(loaded, config.port, config.host, config.max_num_seqs)
    log.info("target worker serving", extra={"port": running.port, "model": config.model})
    await serve_until_signal(running, config.grace, config.metrics_port)
