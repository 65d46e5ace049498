"""Target worker process: load the model, serve TargetWorker + health, drain on SIGTERM."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from splitspec.models import LoadedModel, load_model
from splitspec.service import RunningServer, serve_until_signal, start_server
from splitspec.v1 import target_pb2, target_pb2_grpc
from target_worker.engine import TargetEngine
from target_worker.metrics import TargetMetrics
from target_worker.servicer import TargetServicer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TargetConfig:
    model: str
    port: int = 50052
    host: str = "0.0.0.0"
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    metrics_port: int | None = None
    grace: float = 10.0


async def start_target(loaded: LoadedModel, port: int = 0, host: str = "127.0.0.1", max_num_seqs: int = 256) -> RunningServer:
    """Serve an already loaded model (used by the CLI and by in-process tests)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-model")
    metrics = TargetMetrics()
    engine = TargetEngine(loaded, max_num_seqs=max_num_seqs)
    servicer = TargetServicer(engine, metrics, executor)

    def register(server: grpc.aio.Server) -> list[str]:
        target_pb2_grpc.add_TargetWorkerServicer_to_server(servicer, server)
        return [target_pb2.DESCRIPTOR.services_by_name["TargetWorker"].full_name]

    running = await start_server(register, port, host, metrics.registry, engine)
    running.on_stop.append(lambda: executor.shutdown(wait=False, cancel_futures=True))
    return running


async def serve_target(config: TargetConfig) -> None:
    loaded = load_model(config.model, config.device, config.dtype, config.max_model_len)
    running = await start_target(loaded, config.port, config.host, config.max_num_seqs)
    log.info("target worker serving", extra={"port": running.port, "model": config.model})
    await serve_until_signal(running, config.grace, config.metrics_port)
