"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}}, and the mapping from
coordinator gRPC statuses to HTTP status codes."""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
# Coordinator field names that differ from the OpenAI request's.
_PARAM_NAMES = {"k": "speculative.k", "draft_confidence": "speculative.draft_confidence",
                "prompt_token_ids": "prompt"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_grpc(exc: grpc.aio.AioRpcError) -> OpenAIError:
    status, type_ = _GRPC_TO_HTTP.get(exc.code(), (500, "internal_error"))
    details = exc.details() or exc.code().name
    param = None
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and ":" in details:
        field = details.split(":", 1)[0]
        param = _PARAM_NAMES.get(field, field)
    return OpenAIError(status, details, type_, param, exc.code().name.lower())
