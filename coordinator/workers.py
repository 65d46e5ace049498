"""Clients for the two worker kinds, as the coordinator sees them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitspec.convert import sampling_to_proto
from splitspec.errors import Unavailable
from splitspec.sampling import SamplingParams
from splitspec.service import make_channel
from splitspec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc


async def wait_until_serving(channel: grpc.aio.Channel, address: str, timeout: float) -> None:
    """Poll the standard health service until SERVING or `timeout` seconds pass."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            last_error = exc.code().name
        await asyncio.sleep(0.2)
    raise Unavailable(f"worker at {address} is not serving after {timeout:.0f}s ({last_error})")


def verify_request(seq_id: str, proposal: draft_pb2.DraftResponse | None, num_tokens: int) -> target_pb2.VerifyRequest:
    """Verify `proposal` (None: a target-only round); its q travels on as received, dense or sparse."""
    request = target_pb2.VerifyRequest(seq_id=seq_id, num_tokens=num_tokens)
    if proposal is not None:
        request.draft_token_ids.extend(proposal.token_ids)
        if proposal.HasField("sparse_probs"):
            request.draft_sparse_probs.CopyFrom(proposal.sparse_probs)
        elif proposal.HasField("probs"):
            request.draft_probs.CopyFrom(proposal.probs)
    return request


def _stream_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@dataclass(slots=True)
class VerifySession:
    """One sequence's verify stream on its pinned target: a request and an answer per round, and
    plans (the next round's request per likely verdict) that let the target chain a round on its
    own. Failures surface as AioRpcError with the stream's status, as a unary Verify's would; a
    round that outlasts its timeout ends the stream with DEADLINE_EXCEEDED."""

    call: grpc.aio.StreamStreamCall
    seq_id: str
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)  # a plan may be written during a round

    async def verify(self, proposal: draft_pb2.DraftResponse | None, num_tokens: int,
                     timeout: float, autonomous_rounds: int = 0) -> target_pb2.VerifyResponse:
        """Verify `proposal` (None: a target-only round, which may go on for `autonomous_rounds`
        more rounds on the target: their verdicts are read with `chained`)."""
        request = verify_request(self.seq_id, proposal, num_tokens)
        request.autonomous_rounds = autonomous_rounds
        return await self._within(timeout, self._round(request))

    async def chained(self, timeout: float) -> target_pb2.VerifyResponse:
        """The verdict of the round the target started on its own (the last verdict was `chained`)."""
        return await self._within(timeout, self._read())

    async def offer(self, num_tokens: int, branches: list[tuple[int, int, draft_pb2.DraftResponse]]) -> None:
        """Plan for the round in flight (sent with `num_tokens`): after verdict (accepted, token),
        verify the paired proposal next."""
        plan = target_pb2.VerifyRequest(seq_id=self.seq_id, num_tokens=num_tokens)
        for accepted, token, proposal in branches:
            plan.branches.add(num_accepted=accepted, token_id=token,
                              next=verify_request("", proposal, num_tokens + accepted + 1))
        await self._write(plan)

    async def extend(self, num_tokens: int, rounds: int) -> None:
        """Plan for the target-only round in flight (sent with `num_tokens`): after its verdict, go
        on by yourself for `rounds` more rounds."""
        await self._write(target_pb2.VerifyRequest(seq_id=self.seq_id, num_tokens=num_tokens,
                                                   autonomous_rounds=rounds, extends_autonomy=True))

    async def _within(self, timeout: float, answer: Any) -> target_pb2.VerifyResponse:
        try:
            async with asyncio.timeout(timeout):  # no wrapper task: the write goes out in this step
                return await answer
        except TimeoutError:
            self.close()
            raise _stream_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"verify took longer than {timeout:.1f}s") from None

    async def _round(self, request: target_pb2.VerifyRequest) -> target_pb2.VerifyResponse:
        await self._write(request)
        return await self._read()

    async def _write(self, request: target_pb2.VerifyRequest) -> None:
        try:
            async with self.writing:
                await self.call.write(request)
        except asyncio.InvalidStateError:  # the stream already ended: report its status
            code = await self.call.code()
            raise _stream_error(code, await self.call.details() or "verify stream ended") from None

    async def _read(self) -> target_pb2.VerifyResponse:
        response = await self.call.read()
        if response is grpc.aio.EOF:
            raise _stream_error(grpc.StatusCode.UNAVAILABLE, f"verify stream for {self.seq_id} ended")
        return response

    def close(self) -> None:
        self.call.cancel()


@dataclass(slots=True)
class TargetClient:
    address: str
    tls: Any = None  # splitspec.security.TLSConfig: verify the worker, present our certificate (mTLS)
    channel: grpc.aio.Channel = field(init=False)
    stub: target_pb2_grpc.TargetWorkerStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = make_channel(self.address, self.tls)
        self.stub = target_pb2_grpc.TargetWorkerStub(self.channel)

    async def info(self) -> common_pb2.ModelInfo:
        return await self.stub.GetModelInfo(common_pb2.ModelInfoRequest())

    async def prefill(
        self,
        seq_id: str,
        token_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        num_lookahead_slots: int,
        resume: bool = False,
        timeout: float | None = None,
        num_prompt_logprobs: int | None = None,
    ) -> target_pb2.PrefillResponse:
        return await self.stub.Prefill(
            target_pb2.PrefillRequest(
                seq_id=seq_id, token_ids=token_ids, sampling=sampling_to_proto(params), max_new_tokens=max_new_tokens,
                num_lookahead_slots=num_lookahead_slots, resume=resume, num_prompt_logprobs=num_prompt_logprobs,
            ),
            timeout=timeout,
        )

    def open_verify(self, seq_id: str) -> "VerifySession":
        return VerifySession(self.stub.VerifyStream(), seq_id)

    async def stats(self, timeout: float = 5.0) -> common_pb2.WorkerStats:
        return await self.stub.GetStats(common_pb2.StatsRequest(), timeout=timeout)

    async def release(self, seq_id: str) -> None:
        await self.stub.Release(target_pb2.ReleaseRequest(seq_id=seq_id), timeout=5.0)

    async def close(self) -> None:
        await self.channel.close()


@dataclass(slots=True)
class DraftClient:
    address: str
    tls: Any = None
    channel: grpc.aio.Channel = field(init=False)
    stub: draft_pb2_grpc.DraftWorkerStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = make_channel(self.address, self.tls)
        self.stub = draft_pb2_grpc.DraftWorkerStub(self.channel)

    async def info(self) -> common_pb2.ModelInfo:
        return await self.stub.GetModelInfo(common_pb2.ModelInfoRequest())

    async def stats(self, timeout: float = 5.0) -> common_pb2.WorkerStats:
        return await self.stub.GetStats(common_pb2.StatsRequest(), timeout=timeout)

    def open(self, seq_id: str, params: SamplingParams, min_confidence: float = 0.0) -> "DraftSession":
        return DraftSession(self.stub.Propose(), seq_id, params, min_confidence)

    async def close(self) -> None:
        await self.channel.close()


@dataclass(slots=True)
class DraftSession:
    """One sequence's proposal stream; tracks what the draft already holds of the history."""

    call: grpc.aio.StreamStreamCall
    seq_id: str
    params: SamplingParams
    min_confidence: float = 0.0  # proposals end after a draft token less likely than this
    synced_len: int = 0         # history tokens the draft held before its last proposal
    num_accepted: int = 0       # tokens of the last proposal that the target kept
    started: bool = False
    held: int | None = None     # the branch of the last speculation that held: named in the next request

    async def propose(self, history: list[int], k: int) -> draft_pb2.DraftResponse:
        request = draft_pb2.DraftRequest(
            num_accepted=self.num_accepted, new_token_ids=history[self.synced_len + self.num_accepted :], k=k
        )
        return await self._send(request, len(history))

    async def speculate(self, k: int, width: int) -> draft_pb2.DraftResponse:
        """Draft the next round now, once per likely verdict of the current proposal (`width`
        candidate tokens per accept length). Bookkeeping changes only once a branch holds."""
        return await self._send(draft_pb2.DraftRequest(speculative=True, k=k, branch_width=width), None)

    def branch_held(self, index: int, history_len: int) -> None:
        """Branch `index` is the next round's proposal: the draft holds the history up to here."""
        self.synced_len, self.num_accepted, self.held = history_len, 0, index

    async def _send(self, request: draft_pb2.DraftRequest, history_len: int | None) -> draft_pb2.DraftResponse:
        if self.held is not None:
            request.held_branch, self.held = self.held, None
        request.min_confidence = self.min_confidence
        if not self.started:
            request.seq_id = self.seq_id
            request.sampling.CopyFrom(sampling_to_proto(self.params))
            self.started = True
        try:
            await self.call.write(request)
            response = await self.call.read()
        except asyncio.InvalidStateError as exc:  # the stream already ended: the worker went away
            raise Unavailable(f"draft stream for {self.seq_id} has ended") from exc
        if response is grpc.aio.EOF:
            raise Unavailable(f"draft stream for {self.seq_id} ended unexpectedly")
        if history_len is not None:
            self.synced_len, self.num_accepted = history_len, 0
        return response

    def accepted(self, num_accepted: int) -> None:
        self.num_accepted = num_accepted

    def close(self) -> None:
        self.call.cancel()
