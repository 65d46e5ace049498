"""Turning an OpenAI request into coordinator streams, and their output into OpenAI responses.

`n` choices (times the prompts of a batched completion) run as concurrent Generate streams whose
deltas are merged as they arrive. Each choice also feeds its tokens through a TextStream of its
own, so the stream can carry one text piece per token (with its origin) for the playground. The
authoritative `text` / `delta.content` is the coordinator's, which already withholds stop strings.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc

from coordinator.detokenizer import TextStream
from gateway.logprobs import LogprobsBuilder, merge
from gateway.metrics import GatewayMetrics
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, spec_report
from splitspec.prompts import encode_prompt
from splitspec.v1 import coordinator_pb2, coordinator_pb2_grpc

ORIGIN_NAMES = {
    coordinator_pb2.TOKEN_ORIGIN_TARGET: "target",
    coordinator_pb2.TOKEN_ORIGIN_ACCEPTED: "accepted",
    coordinator_pb2.TOKEN_ORIGIN_RECOVERED: "recovered",
    coordinator_pb2.TOKEN_ORIGIN_BONUS: "bonus",
}
PLAIN_CHAT_SUFFIX = "assistant:"


def render_chat(tokenizer: Any, request: ChatCompletionRequest) -> list[int]:
    """The tokenizer's chat template when it has one; otherwise the documented plain fallback:
    one "role: content" line per message, then "assistant:" (BOS added by the tokenizer)."""
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    if getattr(tokenizer, "chat_template", None):
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + PLAIN_CHAT_SUFFIX
    return list(tokenizer(text).input_ids)


def prompts_of(tokenizer: Any, request: SamplingFields) -> list[str | list[int]]:
    if isinstance(request, ChatCompletionRequest):
        return [render_chat(tokenizer, request)]
    assert isinstance(request, CompletionRequest)
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]  # strings, or token-id lists


def generate_request(request: SamplingFields, prompt: str | list[int], choice: int) -> coordinator_pb2.GenerateRequest:
    message = coordinator_pb2.GenerateRequest(ignore_eos=request.ignore_eos)
    if isinstance(prompt, str):
        message.prompt = prompt
    else:
        message.prompt_token_ids.extend(prompt)
    if request.token_limit is not None:
        message.max_tokens = request.token_limit
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                 "min_tokens"):
        value = getattr(request, name)
        if value is not None:
            setattr(message, name, value)
    if request.top_k is not None:
        message.top_k = max(request.top_k, 0)
    # n > 1 with a seed: seed, seed + 1, ... so the choices differ and the request stays reproducible
    message.seed = request.seed + choice if request.seed is not None else secrets.randbits(63)
    if request.stop:
        message.stop.extend(request.stop)
    if request.num_logprobs is not None:
        message.logprobs = request.num_logprobs
    if request.num_prompt_logprobs is not None:
        message.prompt_logprobs = request.num_prompt_logprobs
    if request.stop_token_ids:
        message.stop_token_ids.extend(request.stop_token_ids)
    for token, bias in (request.logit_bias or {}).items():
        message.logit_bias[int(token)] = bias
    constraint = request.constraint()
    if constraint is not None:
        message.constraint.CopyFrom(constraint[1])
    if request.speculative is not None:
        if request.speculative.k is not None:
            message.k = request.speculative.k
        if request.speculative.draft_confidence is not None:
            message.draft_confidence = request.speculative.draft_confidence
    return message


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    origins: list[str]
    pieces: list[str]
    finish_reason: str | None = None
    completion_tokens: int = 0  # so far, this delta's included
    prompt_tokens: int = 0
    cached_tokens: int = 0      # set on the last delta
    spec: dict[str, Any] | None = None
    logprobs: dict[str, Any] | None = None  # this delta's tokens', when asked for


@dataclass(slots=True)
class ChoiceStream:
    """One choice: a coordinator Generate stream plus the per-token text pieces."""

    index: int
    call: Any
    pieces: TextStream
    metrics: GatewayMetrics
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_output_at: float = 0.0
    accepted_run: int = 0  # accepted tokens of the round in progress (per-position metrics)
    echo: str = ""         # the prompt text, prepended to the first delta (echo: true)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: LogprobsBuilder | None = None

    async def next(self) -> ChoiceDelta | None:
        response = await self.call.read()
        if response is grpc.aio.EOF:
            return None
        pieces = []
        for token in response.token_ids:
            self.pieces.add(token)
            pieces.append(self.pieces.delta(final=False))
        if response.finish_reason and pieces:
            pieces[-1] += self.pieces.delta(final=True)  # text held back for the last tokens
        if response.token_ids:
            arrived = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = arrived
                self.metrics.ttft.observe(arrived - self.started)
            else:
                self.metrics.inter_token_latency.observe(arrived - self.last_output_at)
            self.last_output_at = arrived
            self.metrics.generation_tokens.inc(len(response.token_ids))
        origins = [ORIGIN_NAMES.get(o, "target") for o in response.origins]
        self.accepted_run = self.metrics.record_origins(origins, self.accepted_run)
        self.completion_tokens += len(response.token_ids)
        delta = ChoiceDelta(self.index, self.echo + response.text, list(response.token_ids), origins, pieces,
                            completion_tokens=self.completion_tokens, prompt_tokens=self.prompt_tokens)
        if self.logprobs is not None:
            parts = []
            if response.prompt_token_ids:  # echo: the prompt's tokens come first
                parts.append(self.logprobs.prompt(response.prompt_token_ids, response.prompt_logprobs, self.echo))
            if response.token_ids:
                parts.append(self.logprobs.build(response.token_ids, response.logprobs, pieces))
            delta.logprobs = merge(parts)
        self.echo = ""
        if response.finish_reason:
            delta.finish_reason = response.finish_reason
            delta.completion_tokens = response.usage.completion_tokens
            delta.prompt_tokens = response.usage.prompt_tokens
            delta.cached_tokens = response.usage.cached_tokens
            delta.spec = spec_report(response.spec)
            self.metrics.record_finished(self, response)
        return delta

    def cancel(self) -> None:
        self.call.cancel()


async def open_choices(stub: coordinator_pb2_grpc.CoordinatorStub, tokenizer: Any, request: SamplingFields,
                       metrics: GatewayMetrics) -> tuple[list[ChoiceStream], list[ChoiceDelta]]:
    """Start every choice's stream and wait for its first message, so that request errors surface
    as HTTP errors before any streaming starts. Returns the streams and their first deltas."""
    streams: list[ChoiceStream] = []
    for prompt_index, prompt in enumerate(prompts_of(tokenizer, request)):
        prompt_ids = prompt if isinstance(prompt, list) else encode_prompt(tokenizer, prompt)
        echo = ""
        if isinstance(request, CompletionRequest) and request.echo:
            echo = prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=True)
        for n in range(request.n):
            index = prompt_index * request.n + n
            call = stub.Generate(generate_request(request, prompt, n))
            builder = None if request.num_logprobs is None else \
                LogprobsBuilder(tokenizer, chat=isinstance(request, ChatCompletionRequest))
            streams.append(ChoiceStream(index, call, TextStream(tokenizer, prompt_ids), metrics, echo=echo,
                                        prompt_tokens=len(prompt_ids), logprobs=builder))
    try:
        firsts = await asyncio.gather(*(s.next() for s in streams))
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams, [f for f in firsts if f is not None]


async def merged(streams: list[ChoiceStream], firsts: list[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
    """Yield deltas of all choices as they arrive (each choice's in order)."""
    for first in firsts:
        yield first
    live = {asyncio.ensure_future(s.next()): s for s, f in zip(streams, firsts) if f.finish_reason is None}
    try:
        while live:
            done, _ = await asyncio.wait(live, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                stream = live.pop(future)
                delta = future.result()
                if delta is None:
                    continue
                yield delta
                if delta.finish_reason is None:
                    live[asyncio.ensure_future(stream.next())] = stream
    finally:
        for future in live:
            future.cancel()
        for stream in streams:
            stream.cancel()
