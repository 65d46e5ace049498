"""Domain errors that carry a gRPC status code, and the interceptor that maps them.

Servicers raise these; `StatusInterceptor` turns them into gRPC statuses with their message,
and turns any other exception into INTERNAL without leaking a traceback to the client.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import grpc

log = logging.getLogger(__name__)


class SplitspecError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(SplitspecError, ValueError):
    """Bad input; the message always starts with the offending field's name."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def check_token_ids(field: str, token_ids: Iterable[int], vocab_size: int) -> None:
    """Raises InvalidArgument naming `field` when an id is outside [0, vocab_size)."""
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgument(field, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


class NotFound(SplitspecError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(SplitspecError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(SplitspecError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SplitspecError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SplitspecError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(SplitspecError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ModelLoadError(SplitspecError):
    """A model path or id that cannot be loaded; the message names it and what is missing."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class IncompatibleModels(SplitspecError):
    code = grpc.StatusCode.FAILED_PRECONDITION


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, SplitspecError):
        await context.abort(exc.code, str(exc))
    if isinstance(exc, grpc.aio.AioRpcError):  # a downstream call failed: pass its status on
        await context.abort(exc.code(), exc.details() or exc.code().name)
    log.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request_or_iterator, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the mapping point
            await _abort_for(exc, context, method)

    return wrapped


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request_or_iterator, context):
                yield item
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort_for(exc, context, method)

    return wrapped


def with_behaviors(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    stream: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> grpc.RpcMethodHandler:
    """A copy of `handler` with its behavior replaced: `unary(behavior)` for the RPC kinds that
    answer once, `stream(behavior)` for those that stream their answer."""
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kwargs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **kwargs)
    return handler


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps `SplitspecError` subclasses to their status codes; anything else to INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return with_behaviors(handler, lambda b: _wrap_unary(b, method), lambda b: _wrap_stream(b, method))
