"""Process runtime shared by every service: structured logs, gRPC server with health,
message-size limits and status mapping, Prometheus endpoint, uvloop, and SIGTERM draining."""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import json
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from splitspec.errors import StatusInterceptor

log = logging.getLogger(__name__)

# Client channels accept the largest legitimate message of any service: a proposal of
# k x vocab float32 probabilities (k <= 64, vocab ~256k). Servers set their own, tighter limit.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_SERVER_MESSAGE_BYTES = 4 * 1024 * 1024


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def message_limit(vocab_size: int, max_k: int = 64) -> int:
    """A worker's limit: k x vocab float32 probabilities plus headroom (oversize -> RESOURCE_EXHAUSTED)."""
    return max(DEFAULT_SERVER_MESSAGE_BYTES, max_k * vocab_size * 4 + (1 << 20))


GRPC_OPTIONS = grpc_options()
# A channel retries a worker it could not reach after at most 2 s (gRPC's default backoff grows
# to 120 s: a worker that compiled its forward for 75 s was seen serving 35 s after it was).
CHANNEL_OPTIONS = [*GRPC_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
_STANDARD_RECORD_KEYS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update({k: v for k, v in vars(record).items() if k not in _STANDARD_RECORD_KEYS})
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(service: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def make_channel(address: str, tls: Any = None, token: str | None = None) -> grpc.aio.Channel:
    """A client channel: TLS (and a client certificate for mTLS) when `tls` is given, and a
    bearer token on every call when `token` is given."""
    from splitspec.security import bearer_token_interceptors

    interceptors = bearer_token_interceptors(token) if token else None
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS,
                                   interceptors=interceptors)


@dataclass(slots=True, frozen=True)
class ServerSecurity:
    """How a server listens: TLS (mTLS with require_client_cert), extra interceptors (bearer token),
    reflection (off unless asked for) and its message size limit."""

    tls: Any = None
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
    reflection: bool = False
    max_message_bytes: int = DEFAULT_SERVER_MESSAGE_BYTES


@dataclass(slots=True)
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    registry: CollectorRegistry
    state: Any = None  # the domain object behind the servicer (engine or backend), for introspection
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    on_stop_async: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    draining: bool = False  # set once stop() begins: health stays NOT_SERVING

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        self.draining = True
        await self.set_serving(False)
        await self.server.stop(grace)
        for hook in self.on_stop_async:
            await hook()
        for callback in self.on_stop:
            callback()


async def off_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` on a thread of its own, which exits when it returns: for a model's
    load, compile and calibration, which run before the model thread starts. OpenMP keeps a pool of
    threads for each thread that ran a parallel region, for as long as that thread lives; with a
    second pool alive (say, the event loop's, from loading) libgomp counts more threads than cores
    and stops spinning between parallel regions, and every region then waits for its workers to
    wake: 64 streamed linears at 2 threads took 10.3 ms from the thread that loaded them, 15.4-16.5
    ms from a second thread, 9.8 ms from a second one once the loading thread had exited."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=getattr(fn, "__name__", "off-thread"))
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))
    finally:
        await asyncio.to_thread(executor.shutdown)  # its thread exits, and that thread's OpenMP pool with it


def model_thread(name: str, nice: int = 0) -> ThreadPoolExecutor:
    """The single thread a worker's model runs on: one step at a time, off the event loop. `nice`
    (Linux) ranks it that much below the process's I/O threads (event loop, gRPC), so that a
    request arriving during a step is read at once rather than after the step's time slice."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_lower_priority, initargs=(nice,))


def _lower_priority(nice: int) -> None:
    if nice <= 0:
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except OSError as exc:  # not Linux (PRIO_PROCESS of a thread id), or not permitted
        log.warning("model thread keeps its priority", extra={"nice": nice, "error": str(exc)})


def registration(
    add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any, service: Any
) -> Callable[[grpc.aio.Server], list[str]]:
    """A `register` callback for one generated `add_XServicer_to_server` and its service descriptor."""

    def register(server: grpc.aio.Server) -> list[str]:
        add_to_server(servicer, server)
        return [service.full_name]

    return register


async def start_server(
    register: Callable[[grpc.aio.Server], Iterable[str]],
    port: int,
    host: str = "0.0.0.0",
    registry: CollectorRegistry | None = None,
    state: Any = None,
    executor: ThreadPoolExecutor | None = None,
    security: "ServerSecurity | None" = None,
) -> RunningServer:
    """Start a grpc.aio server; `register` adds servicers and returns their full service names.
    `executor` (the model thread) is shut down when the server stops."""
    security = security or ServerSecurity()
    interceptors: list[grpc.aio.ServerInterceptor] = list(security.interceptors) + [StatusInterceptor()]
    # No SO_REUSEPORT: a second server on a port in use must fail, not silently take half its connections.
    options = [*grpc_options(security.max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    service_names = tuple(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if security.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection((*service_names, reflection.SERVICE_NAME,
                                             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    try:
        if security.tls is not None:
            bound = server.add_secure_port(f"{host}:{port}", security.tls.server_credentials())
        else:
            bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc reports a failed bind this way
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port} (is another server using the port?)")
    await server.start()
    running = RunningServer(
        server=server,
        port=bound,
        health=health_servicer,
        service_names=service_names,
        registry=registry or CollectorRegistry(),
        state=state,
    )
    if executor is not None:
        running.on_stop.append(lambda: executor.shutdown(wait=False, cancel_futures=True))
    await running.set_serving(True)
    return running


def start_metrics(port: int | None, registry: CollectorRegistry) -> None:
    if port is not None:
        start_http_server(port, registry=registry)
        log.info("metrics listening", extra={"metrics_port": port})


async def serve_until_signal(running: RunningServer, grace: float, metrics_port: int | None = None) -> None:
    """Block until SIGTERM/SIGINT; then health goes NOT_SERVING and in-flight RPCs get `grace` seconds."""
    start_metrics(metrics_port, running.registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_s": grace})
    await running.stop(grace)
    log.info("stopped")


def run(main: Callable[[], "asyncio.Future | object"]) -> None:
    """Run an async entry point on uvloop when available. SIGUSR1 writes every thread's stack to
    stderr (Python's faulthandler: works even while a C call holds the GIL), for a stuck server."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        asyncio.run(main())
        return
    uvloop.run(main())


async def start_stepped_server(
    engine: Any,
    servicer_for: Callable[[Any], Any],
    add_to_server: Callable[[Any, grpc.aio.Server], None],
    service: Any,
    registry: CollectorRegistry,
    port: int,
    host: str,
    thread_name: str,
    watchdog_seconds: float = 60.0,
    security: ServerSecurity | None = None,
    model_nice: int = 0,
) -> RunningServer:
    """Serve a worker whose `engine.step` runs batched steps on one model thread (`model_nice`
    below the I/O threads); `servicer_for` builds the servicer around the step loop. Health
    reflects progress: NOT_SERVING while the loop has had work but finished no step for
    `watchdog_seconds`."""
    from splitspec.paged.step_loop import StepLoop

    executor = model_thread(thread_name, model_nice)
    steps = StepLoop(engine.step, executor)
    steps.start()
    running = await start_server(registration(add_to_server, servicer_for(steps), service), port, host, registry,
                                 engine, executor, security)
    watchdog = asyncio.get_running_loop().create_task(_watchdog(running, steps, watchdog_seconds))

    async def stop_background() -> None:
        watchdog.cancel()
        await steps.stop()

    running.on_stop_async.append(stop_background)
    return running


async def _watchdog(running: RunningServer, steps: Any, limit: float) -> None:
    stalled = False
    while True:
        await asyncio.sleep(min(1.0, limit / 4))
        now_stalled = steps.stalled_for() > limit
        if now_stalled != stalled and not running.draining:
            stalled = now_stalled
            log.warning("step watchdog", extra={"stalled": stalled, "limit_s": limit})
            await running.set_serving(not stalled)
