"""Gateway process: wait for the coordinator, load the tokenizer, serve HTTP with uvicorn on uvloop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from gateway.app import GatewayConfig, create_app
from splitspec.errors import IncompatibleModels
from splitspec.models import load_tokenizer, tokenizer_fingerprint
from splitspec.service import make_channel
from splitspec.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class GatewaySettings:
    coordinator: str
    port: int = 8000
    host: str = "0.0.0.0"
    api_key: str | None = None
    served_model_name: str | None = None
    tokenizer: str | None = None
    max_body_bytes: int = 1 << 20
    connect_timeout: float = 120.0
    coordinator_token: str | None = None
    tls: Any = None


async def build_app(settings: GatewaySettings):  # -> FastAPI
    from coordinator.workers import wait_until_serving

    async with make_channel(settings.coordinator, settings.tls, settings.coordinator_token) as channel:
        await wait_until_serving(channel, settings.coordinator, settings.connect_timeout)
        info = await coordinator_pb2_grpc.CoordinatorStub(channel).GetModelInfo(
            coordinator_pb2.CoordinatorInfoRequest())
    tokenizer = await asyncio.to_thread(load_tokenizer, settings.tokenizer or info.target.model)
    if tokenizer_fingerprint(tokenizer) != info.target.tokenizer_fingerprint:
        raise IncompatibleModels(f"tokenizer {settings.tokenizer or info.target.model} does not match the target's")
    config = GatewayConfig(coordinator=settings.coordinator, model_name=settings.served_model_name or info.target.model,
                           api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                           coordinator_token=settings.coordinator_token, tls=settings.tls,
                           max_model_len=info.target.max_model_len, root=info.target.model)
    return create_app(config, tokenizer)


async def serve_gateway(settings: GatewaySettings) -> None:
    import uvicorn

    app = await build_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, loop="none",
                                           log_level="warning", access_log=False, timeout_graceful_shutdown=10))
    log.info("gateway serving", extra={"port": settings.port, "coordinator": settings.coordinator})
    await server.serve()  # handles SIGTERM/SIGINT: stops accepting, lets in-flight requests finish
