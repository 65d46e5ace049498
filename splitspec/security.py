"""Transport security and authentication for every gRPC hop.

TLS: a service given --tls-cert/--tls-key serves TLS; with --tls-ca and --require-client-cert it
also demands a client certificate signed by that CA (mutual TLS, used between coordinator and
workers). A client given --tls-ca verifies the server against it and presents its own
certificate when it has one. Bearer tokens: the coordinator's client-facing API checks
`authorization: Bearer TOKEN` in a server interceptor (UNAUTHENTICATED otherwise); clients attach
it with a client interceptor. Health checks stay open so that probes work without the token.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from splitspec.errors import InvalidArgument, with_behaviors


@dataclass(slots=True, frozen=True)
class TLSConfig:
    cert: bytes | None = None      # PEM certificate chain presented by this process
    key: bytes | None = None       # its private key
    ca: bytes | None = None        # PEM CA that peers must be signed by
    require_client_cert: bool = False

    @classmethod
    def from_paths(cls, cert: str | None, key: str | None, ca: str | None, require_client_cert: bool = False
                   ) -> "TLSConfig | None":
        if not (cert or key or ca):
            if require_client_cert:
                raise InvalidArgument("--require-client-cert", "needs --tls-cert, --tls-key and --tls-ca")
            return None
        if bool(cert) != bool(key):
            raise InvalidArgument("--tls-cert" if key else "--tls-key", "--tls-cert and --tls-key go together")
        if require_client_cert and not ca:
            raise InvalidArgument("--tls-ca", "is required with --require-client-cert")

        def read(flag: str, path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise InvalidArgument(flag, f"cannot read {path}: {exc.strerror}") from exc

        return cls(read("--tls-cert", cert), read("--tls-key", key), read("--tls-ca", ca), require_client_cert)

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise InvalidArgument("--tls-cert", "a TLS server needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def bearer(context_metadata: Any) -> str:
    for key, value in context_metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:]
    return ""


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Require `authorization: Bearer TOKEN` on every method under `protected` (health stays open)."""

    def __init__(self, token: str, protected: str) -> None:
        self._token = token.encode()
        self._protected = protected

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._protected):
            return handler
        if hmac.compare_digest(bearer(handler_call_details.invocation_metadata).encode(), self._token):
            return handler

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (--auth-token)")

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (--auth-token)")
            yield  # pragma: no cover - makes this an async generator

        return with_behaviors(handler, lambda _: deny, lambda _: deny_stream)


def _with_header(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), header)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class _UnaryUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(_with_header(details, self._header), request)


class _UnaryStreamToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(_with_header(details, self._header), request)


def bearer_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Attach `authorization: Bearer TOKEN` to every unary and server-streaming call of a channel.
    (grpc.aio files each interceptor under the first kind it implements, hence one per kind.)"""
    header = ("authorization", f"Bearer {token}")
    return [_UnaryUnaryToken(header), _UnaryStreamToken(header)]
