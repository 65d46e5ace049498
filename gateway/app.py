"""The FastAPI application: OpenAI-compatible routes, health, metrics and the playground."""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

import splitspec
from splitspec.prompts import encode_prompt
from gateway.completions import ChoiceDelta, merged, open_choices, render_chat
from gateway.errors import OpenAIError, from_grpc
from gateway.logprobs import merge as merge_logprobs
from gateway.metrics import GatewayMetrics
from gateway.structured import ToolCallStream, answer_tool_calls
from gateway.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingFields,
                              StreamOptions, TokenizeRequest, new_id, now, spec_stats)
from splitspec.service import make_channel
from splitspec.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-before"}


@dataclass(slots=True)
class GatewayConfig:
    coordinator: str
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    coordinator_token: str | None = None  # the coordinator's --auth-token
    tls: Any = None                       # TLSConfig towards the coordinator
    max_model_len: int = 0                # the target's context (/v1/models, /tokenize)
    root: str = ""                        # the model the target loaded (/v1/models)


def _param(error: dict) -> str | None:
    parts: list[str] = []
    for part in error.get("loc", ()):
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part):
            break
        parts.append(str(part))
    return ".".join(parts) or None


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def create_app(config: GatewayConfig, tokenizer: Any, metrics: GatewayMetrics | None = None) -> FastAPI:
    metrics = metrics or GatewayMetrics()
    app = FastAPI(title="splitspec gateway", docs_url=None, redoc_url=None)
    channel = make_channel(config.coordinator, config.tls, config.coordinator_token)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    app.state.metrics, app.state.channel = metrics, channel

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        metrics.http_errors.labels(str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)  # a bug: the fuzz suites look for these
        metrics.http_errors.labels("500").inc()
        return OpenAIError(500, f"internal error: {type(exc).__name__}", "internal_error", None,
                           "internal_error").response()

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), config.api_key.encode()):
            raise OpenAIError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
                              None, "invalid_api_key")

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        authorize(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise OpenAIError(413, f"request body exceeds {config.max_body_bytes} bytes", param=None,
                              code="body_too_large")
        body = await request.body()
        if len(body) > config.max_body_bytes:
            raise OpenAIError(413, f"request body exceeds {config.max_body_bytes} bytes", code="body_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OpenAIError(400, f"malformed JSON body: {exc}", code="invalid_json") from exc
        except RecursionError as exc:
            raise OpenAIError(400, "malformed JSON body: nested too deeply", code="invalid_json") from exc
        if not isinstance(data, dict):
            raise OpenAIError(400, "the body must be a JSON object", code="invalid_json")
        try:
            parsed = model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = _param(first)
            raise OpenAIError(400, f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value") from exc
        refused = parsed.unsupported() if isinstance(parsed, SamplingFields) else None
        if refused is not None:
            raise OpenAIError(400, refused[1], param=refused[0], code="unsupported_parameter")
        if parsed.model is not None and parsed.model != config.model_name:
            raise OpenAIError(404, f"model {parsed.model!r} does not exist; this server serves {config.model_name!r}",
                              "not_found_error", "model", "model_not_found")
        return parsed

    async def start(request: SamplingFields) -> tuple[list, list[ChoiceDelta]]:
        try:
            return await open_choices(stub, tokenizer, request, metrics)
        except grpc.aio.AioRpcError as exc:
            error = from_grpc(exc)
            constraint = request.constraint()
            if constraint is not None and (error.param or "").startswith("constraint"):
                error.param = constraint[0]  # the field that asked for the grammar that does not compile
            raise error from exc

    async def respond(body: SamplingFields, chat: bool) -> Response:
        streams, firsts = await start(body)
        metrics.running.inc(len(streams))
        kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        request_id, created = new_id(kind[0]), now()
        if body.user or body.safety_identifier:
            log.info("request", extra={"request_id": request_id, "user": body.user or body.safety_identifier})
        if body.stream:
            return StreamingResponse(stream_events(body, chat, streams, firsts, request_id, created, kind[1]),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices: dict[int, dict[str, Any]] = {}
            async for delta in merged(streams, firsts):
                choice = choices.setdefault(delta.index, {"text": "", "tokens": 0, "logprobs": []})
                choice["text"] += delta.text
                if delta.logprobs is not None:
                    choice["logprobs"].append(delta.logprobs)
                if delta.finish_reason:
                    choice.update(finish_reason=delta.finish_reason, tokens=delta.completion_tokens,
                                  prompt_tokens=delta.prompt_tokens, cached_tokens=delta.cached_tokens,
                                  spec=delta.spec)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc) from exc
        finally:
            metrics.running.dec(len(streams))
        ordered = [choices[i] for i in sorted(choices)]
        if chat:
            for c in ordered:
                c["message"] = {"role": "assistant", "content": c["text"]}
                calls = answer_tool_calls(body, c["text"], c.get("finish_reason"))
                if calls is not None:
                    c["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
                    c["finish_reason"] = "tool_calls"
        return JSONResponse({
            "id": request_id,
            "object": kind[1],
            "created": created,
            "model": config.model_name,
            "choices": [
                {"index": i, "message": c["message"], "finish_reason": c["finish_reason"],
                 "logprobs": merge_logprobs(c["logprobs"])} if chat else
                {"index": i, "text": c["text"], "finish_reason": c["finish_reason"],
                 "logprobs": merge_logprobs(c["logprobs"])}
                for i, c in enumerate(ordered)
            ],
            "usage": usage(ordered, body.n),
            "splitspec": combined_spec(ordered),
        })

    def usage(choices: list[dict[str, Any]], n: int) -> dict[str, Any]:
        prompt = sum(c.get("prompt_tokens", 0) for c in choices[::n])  # each prompt counted once
        cached = sum(c.get("cached_tokens", 0) for c in choices[::n])
        completion = sum(c["tokens"] for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def combined_spec(choices: list[dict[str, Any]]) -> dict[str, Any]:
        specs = [c.get("spec") or {} for c in choices]
        return spec_stats(sum(s.get("draft_tokens", 0) for s in specs), sum(s.get("accepted_tokens", 0) for s in specs),
                          sum(s.get("rounds", 0) for s in specs))

    async def stream_events(body: SamplingFields, chat: bool, streams: list, firsts: list[ChoiceDelta],
                            request_id: str, created: int, object_name: str) -> AsyncIterator[str]:
        chunk_object = "chat.completion.chunk" if chat else object_name
        options = body.stream_options or StreamOptions()
        finished: list[dict[str, Any]] = []
        started_roles: set[int] = set()
        tool_streams: dict[int, ToolCallStream] = {}
        calls_tools = chat and getattr(body, "calls_tools", False)
        try:
            async for delta in merged(streams, firsts):
                choice: dict[str, Any] = {"index": delta.index, "finish_reason": delta.finish_reason,
                                          "logprobs": delta.logprobs}
                if calls_tools:
                    tools = tool_streams.setdefault(delta.index, ToolCallStream(body))
                    choice["delta"], choice["finish_reason"] = tools.delta(delta.text, delta.finish_reason)
                elif chat:
                    choice["delta"] = {"content": delta.text}
                if chat:
                    if delta.index not in started_roles:
                        choice["delta"]["role"] = "assistant"
                        started_roles.add(delta.index)
                else:
                    choice["text"] = delta.text
                choice["splitspec"] = {"token_ids": delta.token_ids, "origins": delta.origins, "pieces": delta.pieces}
                if delta.finish_reason:
                    choice["splitspec"]["stats"] = delta.spec
                    finished.append({"tokens": delta.completion_tokens, "prompt_tokens": delta.prompt_tokens,
                                     "cached_tokens": delta.cached_tokens, "spec": delta.spec, "index": delta.index})
                chunk = {"id": request_id, "object": chunk_object, "created": created, "model": config.model_name,
                         "choices": [choice]}
                if options.continuous_usage_stats:  # this chunk's choice so far
                    chunk["usage"] = usage([{"tokens": delta.completion_tokens, "prompt_tokens": delta.prompt_tokens,
                                             "cached_tokens": delta.cached_tokens}], 1)
                yield _sse(chunk)
            if options.include_usage:
                finished.sort(key=lambda c: c["index"])
                yield _sse({"id": request_id, "object": chunk_object, "created": created, "model": config.model_name,
                            "choices": [], "usage": usage(finished, body.n), "splitspec": combined_spec(finished)})
        except grpc.aio.AioRpcError as exc:  # mid-stream failure: an error event, then [DONE]
            error = from_grpc(exc)
            metrics.http_errors.labels(str(error.status)).inc()
            yield _sse(error.body())
        finally:
            metrics.running.dec(len(streams))
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await respond(await parse(request, CompletionRequest), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await respond(await parse(request, ChatCompletionRequest), chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": now(), "owned_by": "splitspec",
             "root": config.root or config.model_name, "parent": None, "max_model_len": config.max_model_len}]})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await parse(request, TokenizeRequest)
        if body.messages is not None:
            ids = render_chat(tokenizer, ChatCompletionRequest(model="", messages=body.messages))
        else:
            ids = encode_prompt(tokenizer, body.prompt, body.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": config.max_model_len, "tokens": ids,
                             "token_strs": None})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = await parse(request, DetokenizeRequest)
        vocab = len(tokenizer)
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise OpenAIError(400, f"tokens: ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens",
                              code="invalid_value")
        return JSONResponse({"prompt": tokenizer.decode(body.tokens)})

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> JSONResponse:
        """vLLM's: what a client needs to tokenize as the server does (lm-eval's remote tokenizer)."""
        authorize(request)
        return JSONResponse({
            "tokenizer_class": type(tokenizer).__name__, "model_max_length": config.max_model_len,
            "chat_template": getattr(tokenizer, "chat_template", None),
            **{name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")},
        })

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": splitspec.__version__})

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            stats = await stub.GetStats(coordinator_pb2.CoordinatorStatsRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return JSONResponse({"status": "unavailable", "detail": exc.details() or exc.code().name}, status_code=503)
        return JSONResponse({"status": "ok", "running_requests": stats.running_requests})

    @app.get("/metrics")
    async def prometheus() -> Response:
        try:
            metrics.update_from(await stub.GetStats(coordinator_pb2.CoordinatorStatsRequest(), timeout=2))
        except grpc.aio.AioRpcError:
            log.warning("metrics: coordinator stats unavailable")
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
