"""A real stack (workers, coordinator) plus the gateway on loopback, in the test event loop."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn

from gateway.app import GatewayConfig, create_app
from tests.support import free_port, start_stack

API_KEY = "test-key"
MODEL = "tiny-target"


async def start_gateway(coordinator_address: str, tokenizer, **overrides) -> tuple[uvicorn.Server, asyncio.Task, str]:
    config = GatewayConfig(coordinator=coordinator_address, model_name=MODEL, api_key=API_KEY, **overrides)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config, tokenizer), host="127.0.0.1", port=port,
                                           log_level="warning", loop="none", lifespan="off"))
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    return server, task, f"http://127.0.0.1:{port}"


async def stop_gateway(server: uvicorn.Server, task: asyncio.Task) -> None:
    server.should_exit = True
    await task


@pytest.fixture(scope="module")
async def web(tiny):
    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=4, max_k=8)
    server, task, url = await start_gateway(stack.coordinator.address, tiny["target"].tokenizer,
                                            max_body_bytes=64 * 1024)
    yield stack, url
    await stop_gateway(server, task)
    await stack.stop()
