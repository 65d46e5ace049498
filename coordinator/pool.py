"""Pools of worker replicas: discovery, health watching, and load-based choice.

Each `--target` / `--draft` value is a HOST:PORT; a host name that resolves to several addresses
(a headless Kubernetes Service) yields one endpoint per address and is re-resolved every refresh,
so replicas can be added and removed while traffic flows. Every refresh checks each endpoint with
the standard `grpc.health.v1` service and reads its load (GetStats). A request is pinned to one
endpoint of each kind, picked by load: fewest requests pinned here, then most free KV blocks.
Never round-robin per RPC: a request's KV lives on its worker.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitspec.errors import Unavailable
from splitspec.v1 import common_pb2

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Endpoint:
    address: str
    client: Any                          # TargetClient or DraftClient
    healthy: bool = False
    info: common_pb2.ModelInfo | None = None
    stats: common_pb2.WorkerStats | None = None
    pinned: int = 0                      # requests of this coordinator pinned here

    def load(self) -> tuple[int, int]:
        free = self.stats.blocks_free if self.stats is not None else 0
        return self.pinned, -free


def resolve(spec: str) -> list[str]:
    """HOST:PORT -> one HOST:PORT per address the host resolves to (IPv4 preferred, so that
    `localhost` is one replica, not two)."""
    host, _, port = spec.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError, UnicodeError):
        return []
    v4 = [sockaddr[0] for family, _, _, _, sockaddr in infos if family == socket.AF_INET]
    ips = v4 or [f"[{sockaddr[0]}]" for _, _, _, _, sockaddr in infos]
    return list(dict.fromkeys(f"{ip}:{port}" for ip in ips))


@dataclass(slots=True)
class WorkerPool:
    kind: str                                   # "target" or "draft"
    specs: list[str]
    make_client: Callable[[str], Any]
    check_info: Callable[[common_pb2.ModelInfo], None] = lambda info: None  # raises on an incompatible worker
    refresh_seconds: float = 1.0
    health_timeout: float = 1.0
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for endpoint in self.endpoints.values():
            await endpoint.client.close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep watching whatever happens
                log.exception("pool refresh failed", extra={"kind": self.kind})

    async def refresh(self) -> None:
        addresses: list[str] = []
        for spec in self.specs:
            found = await asyncio.to_thread(resolve, spec)
            addresses += [a for a in found if a not in addresses]
        for address in addresses:
            if address not in self.endpoints:
                self.endpoints[address] = Endpoint(address, self.make_client(address))
                log.info("worker added", extra={"kind": self.kind, "address": address})
        for address in [a for a in self.endpoints if a not in addresses]:
            endpoint = self.endpoints.pop(address)
            if endpoint.pinned == 0:
                await endpoint.client.close()
            log.info("worker removed", extra={"kind": self.kind, "address": address})
        await asyncio.gather(*(self._probe(e) for e in list(self.endpoints.values())))
        self.changed.set()

    async def _probe(self, endpoint: Endpoint) -> None:
        was = endpoint.healthy
        try:
            reply = await health_pb2_grpc.HealthStub(endpoint.client.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.health_timeout)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            if serving and endpoint.info is None:
                info = await endpoint.client.info()
                self.check_info(info)
                endpoint.info = info
            if serving:
                endpoint.stats = await endpoint.client.stats(timeout=self.health_timeout)
            endpoint.healthy = serving
        except grpc.aio.AioRpcError:
            endpoint.healthy = False
        except Exception as exc:  # noqa: BLE001 - an incompatible worker is never used
            log.error("worker refused", extra={"kind": self.kind, "address": endpoint.address, "error": str(exc)})
            endpoint.healthy = False
        if was != endpoint.healthy:
            log.info("worker health changed", extra={"kind": self.kind, "address": endpoint.address,
                                                     "healthy": endpoint.healthy})

    def healthy(self) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.healthy]

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> Endpoint | None:
        candidates = [e for e in self.healthy() if e.address not in exclude]
        return min(candidates, key=Endpoint.load) if candidates else None

    def pin(self, tried: set[str]) -> Endpoint | None:
        """Pick an endpoint not in `tried` for a request, record it there and count it pinned; the
        request unpins it (`pinned -= 1`) when it moves on or ends."""
        endpoint = self.pick(exclude=tried)
        if endpoint is not None:
            tried.add(endpoint.address)
            endpoint.pinned += 1
        return endpoint

    def mark_failed(self, endpoint: Endpoint) -> None:
        """A call failed at the transport level: stop choosing it until a health check says SERVING."""
        if endpoint.healthy:
            log.warning("worker marked unhealthy", extra={"kind": self.kind, "address": endpoint.address})
        endpoint.healthy = False

    async def wait_for_one(self, timeout: float) -> Endpoint:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.healthy():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise Unavailable(f"no {self.kind} worker is serving after {timeout:.0f}s (tried: "
                                  f"{', '.join(self.endpoints) or ', '.join(self.specs)})")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, self.refresh_seconds * 2))
            except asyncio.TimeoutError:
                await self.refresh()
        return self.healthy()[0]
