"""Fuzzing every gRPC method of every service, each a real process on loopback (tiny models):
coordinator Generate, draft Propose, target Prefill / Verify / VerifyStream / Release / GetStats /
GetModelInfo. Messages come from the protobuf descriptors with scalars at their type's edges, plus
the hostile cases a client could send on purpose: unknown and repeated seq_ids, out-of-order and
repeated stream messages, a Release while the sequence verifies, draft probabilities of the wrong
dtype, shape or byte length, NaN, negative, or rows that do not sum to 1, k past the limits, empty
proposals.

Invariants after every example: only documented status codes (never INTERNAL or UNKNOWN), no
worker process exited, and once the example's sequences are released, each pool's free block
count is back at its starting value."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from splitspec.v1 import (common_pb2, coordinator_pb2, coordinator_pb2_grpc, draft_pb2, draft_pb2_grpc, target_pb2,
                          target_pb2_grpc)
from tests.fuzzing import EDGE_INTS, fuzz, odd_text, with_hostile_fields
from tests.support import BYTE_VOCAB, free_port, log_tail, spawn_logged, spawn_worker, stop_logged

OK = grpc.StatusCode.OK
DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
SEQ_IDS = ["fz-a", "fz-b", ""]  # a small pool, so that ids repeat across calls and streams
LIVE = "fz-live"                # prefilled before its rounds are fuzzed
CONTEXT = 160                   # the tiny models' positions
TIMEOUT = 30.0


def spawn_coordinator(target: str, draft: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = spawn_logged(
        [sys.executable, "-m", "entrypoints.cli", "coordinator", "--target", target, "--draft", draft, "--port",
         str(port), "--host", "127.0.0.1", "--log-level", "warning", "--max-k", "8"], "coordinator")
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"coordinator exited: {log_tail(process)}")
            try:
                stub.GetStats(coordinator_pb2.CoordinatorStatsRequest(), timeout=1)
                return process, address
            except grpc.RpcError:
                time.sleep(0.2)
    process.kill()
    pytest.fail("coordinator did not come up")


class Services:
    """The processes and a stub for each: target, draft and coordinator; or (`tensor_parallel`)
    a tensor-parallel target alone."""

    def __init__(self, tiny_dirs: dict, tensor_parallel: int = 1) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        self.processes["target"], target = spawn_worker(
            "target", tiny_dirs["target"], None, "--num-blocks", "64", "--tensor-parallel-size", str(tensor_parallel),
            timeout=180)
        self.channels = [grpc.insecure_channel(target)]
        self.target = target_pb2_grpc.TargetWorkerStub(self.channels[0])
        self.pools = {"target": self.target}  # workers whose KV blocks must all come back
        if tensor_parallel == 1:
            self.processes["draft"], draft = spawn_worker("draft", tiny_dirs["draft_noisy"], None, "--num-blocks", "64",
                                                          "--max-k", "8")
            self.processes["coordinator"], coordinator = spawn_coordinator(target, draft)
            self.channels += [grpc.insecure_channel(draft), grpc.insecure_channel(coordinator)]
            self.draft = draft_pb2_grpc.DraftWorkerStub(self.channels[1])
            self.coordinator = coordinator_pb2_grpc.CoordinatorStub(self.channels[2])
            self.pools["draft"] = self.draft
        self.baseline = {name: self.stats(name).blocks_free for name in self.pools}

    def stats(self, worker: str) -> common_pb2.WorkerStats:
        return self.pools[worker].GetStats(common_pb2.StatsRequest(), timeout=TIMEOUT)

    def alive(self) -> None:
        for name, process in self.processes.items():
            assert process.poll() is None, f"the {name} exited"

    def release_all(self, *sent: str) -> None:
        """Release the pool's ids and any other the example sent: what is left after that leaked."""
        for seq_id in dict.fromkeys([*SEQ_IDS, LIVE, *sent]):
            self.target.Release(target_pb2.ReleaseRequest(seq_id=seq_id), timeout=TIMEOUT)

    def back_to_baseline(self) -> None:
        """Every process alive, and (within a few seconds: releases run at the next step) every
        block free and no sequence held."""
        self.alive()
        deadline = time.monotonic() + 10
        while True:
            stats = {name: self.stats(name) for name in self.pools}
            if all(s.blocks_free == self.baseline[name] and s.running_sequences == 0 for name, s in stats.items()):
                return
            assert time.monotonic() < deadline, "leak: " + "; ".join(
                f"{name} {s.blocks_free}/{self.baseline[name]} free, {s.running_sequences} held"
                for name, s in stats.items())
            time.sleep(0.05)

    def stop(self) -> None:
        for channel in self.channels:
            channel.close()
        for process in reversed(self.processes.values()):
            stop_logged(process)


@pytest.fixture(scope="module")
def services(tiny_dirs):
    services = Services(tiny_dirs)
    yield services
    services.stop()


@pytest.fixture(scope="module")
def tensor_parallel(tiny_dirs):
    services = Services(tiny_dirs, tensor_parallel=2)
    yield services
    services.stop()


def expect_documented(call) -> Any:
    """Run `call`; returns its result, or None after a documented error status."""
    try:
        result = call()
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED, (exc.code(), exc.details())
        assert exc.details() and "Traceback" not in exc.details()
        event(f"{exc.code().name}: {exc.details().split(':')[0]}")
        return None
    event("OK")
    return result


def drain(responses: Iterator) -> list:
    """The responses of a stream up to its end or its (documented) error status."""
    received = []
    try:
        for response in responses:
            received.append(response)
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED, (exc.code(), exc.details())
        assert exc.details() and "Traceback" not in exc.details()
        event(f"stream {exc.code().name}: {exc.details().split(':')[0]} after {len(received)}")
        return received
    event(f"stream OK: {len(received)} responses")
    return received


# --- strategies: valid messages, then up to two fields swapped for edge values ---------------
tokens = st.integers(0, BYTE_VOCAB - 1)
int32_edges = st.one_of(st.sampled_from([e for e in EDGE_INTS if -(2**31) <= e < 2**31]), st.integers(-(2**31), 2**31 - 1))
token_lists = st.one_of(st.lists(tokens, min_size=1, max_size=12), st.lists(tokens, min_size=1, max_size=3),
                        st.lists(tokens, min_size=CONTEXT - 8, max_size=CONTEXT + 40))
valid_sampling = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.0, 0.7, 1.0, 1e-6, 1e30]), "top_k": st.sampled_from([0, 1, 5, 2**31 - 1]),
    "top_p": st.sampled_from([1.0, 0.9, 1e-6]), "min_p": st.sampled_from([0.0, 0.1, 1.0]),
    "repetition_penalty": st.sampled_from([1.0, 1.3, 1e-6, 1e6]), "seed": st.integers(0, 2**64 - 1)})
sampling = with_hostile_fields(valid_sampling, common_pb2.SamplingParams.DESCRIPTOR, most=1)


@st.composite
def dense_probs(draw, rows: int) -> dict:
    """q for `rows` positions: valid, or broken in one of the ways a bad client breaks it."""
    kind = draw(st.sampled_from(["valid"] * 6 + ["nan", "negative", "unnormalised", "zeros", "inf", "bytes", "shape",
                                                 "dtype"]))
    event(f"draft_probs {kind}")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.dirichlet(np.ones(BYTE_VOCAB), size=max(rows, 1)).astype(np.float32)
    shape = [rows, BYTE_VOCAB]
    if kind == "nan":
        values[0, draw(st.integers(0, BYTE_VOCAB - 1))] = np.nan
    elif kind == "negative":
        values[0, 0] = -0.5
    elif kind == "unnormalised":
        values *= draw(st.sampled_from([0.5, 2.0, 1e6]))
    elif kind == "zeros":
        values[:] = 0
    elif kind == "inf":
        values[-1, 3] = np.inf
    data = values[:rows].tobytes()
    if kind == "bytes":
        data = draw(st.one_of(st.binary(max_size=64), st.just(data[:-4]), st.just(data + b"\0\0")))
    if kind == "shape":
        shape = draw(st.lists(st.sampled_from([0, 1, rows + 1, BYTE_VOCAB, BYTE_VOCAB + 1, -1, 2**40]), max_size=3))
    dtype = draw(st.sampled_from(["float64", "int8", "", "bfloat16", "float16", "complex64"])) if kind == "dtype" \
        else "float32"
    return {"dtype": dtype, "shape": shape, "data": data}


@st.composite
def sparse_probs(draw, draft: list[int]) -> dict:
    """q as its support: valid (on the proposed token and one other), or broken."""
    rows = len(draft)
    kind = draw(st.sampled_from(["valid", "valid", "random", "out_of_range", "decreasing", "vocab"]))
    event(f"draft_sparse_probs {kind}")
    if kind == "random":
        return {"vocab_size": draw(int32_edges), "offsets": draw(st.binary(max_size=32)),
                "indices": draw(st.binary(max_size=32)), "values": draw(st.binary(max_size=32))}
    offsets = np.arange(0, 2 * (rows + 1), 2, dtype=np.int32)
    indices = np.array([[t % BYTE_VOCAB, (t + 1) % BYTE_VOCAB] for t in draft], dtype=np.int32).reshape(-1)
    values = np.tile(np.array([0.25, 0.75], dtype=np.float32), rows)
    if kind == "out_of_range" and rows:
        indices[-1] = draw(st.sampled_from([BYTE_VOCAB, -1, 2**31 - 1]))
    if kind == "decreasing" and rows:
        offsets[1] = offsets[-1] + 5
    vocab = draw(st.sampled_from([0, -3, 10**6])) if kind == "vocab" else BYTE_VOCAB
    return {"vocab_size": vocab, "offsets": offsets.tobytes(), "indices": indices.tobytes(), "values": values.tobytes()}


@st.composite
def verify_requests(draw, stream: bool, nested: bool = True) -> target_pb2.VerifyRequest:
    """A round for the live sequence, mostly well formed (num_tokens 0: not checked); on a
    stream, sometimes a plan of branches or an autonomous budget."""
    draft = draw(st.one_of(st.lists(tokens, max_size=6), st.lists(tokens, max_size=1),
                           st.lists(int32_edges, max_size=3), st.lists(tokens, min_size=9, max_size=20)))
    fields: dict[str, Any] = {"seq_id": LIVE, "draft_token_ids": draft}
    probs = draw(st.sampled_from(["dense", "dense", "sparse", "none", "both"]))
    if probs in ("dense", "both"):
        fields["draft_probs"] = draw(dense_probs(len(draft)))
    if probs in ("sparse", "both"):
        fields["draft_sparse_probs"] = draw(sparse_probs(draft))
    if draw(st.integers(0, 3)) == 0:
        fields["seq_id"] = draw(st.sampled_from(SEQ_IDS))
    if draw(st.integers(0, 3)) == 0:
        fields["num_tokens"] = draw(st.one_of(st.integers(0, 12), int32_edges))
    if draw(st.integers(0, 4)) == 0 or (stream and not draft and draw(st.booleans())):
        fields["autonomous_rounds"] = draw(st.sampled_from([1, 3, -1, 2**31 - 1]))
    if nested and draw(st.integers(0, 2 if stream else 6)) == 0:
        fields["branches"] = [{"num_accepted": draw(st.integers(-1, 4)), "token_id": draw(tokens),
                               "next": draw(verify_requests(stream, nested=False))} for _ in range(draw(st.integers(1, 3)))]
    return target_pb2.VerifyRequest(**fields)


def prefill_live(services: Services, temperature: float) -> None:
    reply = services.target.Prefill(target_pb2.PrefillRequest(
        seq_id=LIVE, token_ids=[1, 72, 105], max_new_tokens=40, num_lookahead_slots=21,
        sampling=common_pb2.SamplingParams(temperature=temperature, top_p=1.0, repetition_penalty=1.0, seed=1)),
        timeout=TIMEOUT)
    assert reply.num_tokens == 4


# --- target ----------------------------------------------------------------------------------
prefills = with_hostile_fields(st.fixed_dictionaries({
    "seq_id": st.sampled_from(SEQ_IDS[:2]), "token_ids": token_lists, "sampling": valid_sampling,
    "max_new_tokens": st.integers(1, 40), "num_lookahead_slots": st.integers(1, 9), "resume": st.just(False)}),
    target_pb2.PrefillRequest.DESCRIPTOR)


@fuzz(80)
@given(requests=st.lists(prefills, min_size=1, max_size=3))
def test_target_prefill(services, requests):
    """Prefills, repeated seq_ids among them."""
    for fields in requests:
        expect_documented(lambda: services.target.Prefill(target_pb2.PrefillRequest(**fields), timeout=TIMEOUT))
    services.release_all(*(fields.get("seq_id", "") for fields in requests))
    services.back_to_baseline()


@fuzz(100)
@given(temperature=st.sampled_from([0.0, 1.0, 1e-6, 1e30]), rounds=st.lists(verify_requests(False), min_size=1, max_size=4))
def test_target_verify(services, temperature, rounds):
    prefill_live(services, temperature)
    for request in rounds:
        expect_documented(lambda: services.target.Verify(request, timeout=TIMEOUT))
    services.release_all(*(request.seq_id for request in rounds))
    services.back_to_baseline()


@fuzz(100)
@given(temperature=st.sampled_from([0.0, 1.0, 1e30]),
       rounds=st.tuples(verify_requests(True, nested=False), st.lists(verify_requests(True), max_size=4)).map(
           lambda first_and_rest: [first_and_rest[0], *first_and_rest[1]]),
       release_in_flight=st.booleans())
def test_target_verify_stream(services, temperature, rounds, release_in_flight):
    """Rounds and plans in any order, repeated, for live and unknown sequences; a Release may
    arrive while they verify."""
    prefill_live(services, temperature)
    event(f"stream of {sum(not r.branches for r in rounds)} rounds, {sum(bool(r.branches) for r in rounds)} plans, release {release_in_flight}")
    responses = services.target.VerifyStream(iter(rounds), timeout=TIMEOUT)
    released = services.target.Release.future(target_pb2.ReleaseRequest(seq_id=LIVE), timeout=TIMEOUT) \
        if release_in_flight else None
    drain(responses)
    if released is not None:
        released.result()
    services.release_all(*(request.seq_id for request in rounds))
    services.back_to_baseline()


@fuzz(30)
@given(temperature=st.sampled_from([0.0, 1.0]), rounds=st.lists(verify_requests(True), min_size=1, max_size=3),
       streamed=st.booleans())
def test_tensor_parallel_target_verify(tensor_parallel, temperature, rounds, streamed):
    """The same rounds against a target split over two ranks: a bad round must not desynchronise
    the ranks (a rank that raised while the other ran the step would hang the group)."""
    prefill_live(tensor_parallel, temperature)
    if streamed:
        drain(tensor_parallel.target.VerifyStream(iter(rounds), timeout=TIMEOUT))
    else:
        for request in rounds:
            expect_documented(lambda: tensor_parallel.target.Verify(request, timeout=TIMEOUT))
    tensor_parallel.release_all(*(request.seq_id for request in rounds))
    tensor_parallel.back_to_baseline()


@fuzz(40)
@given(seq_id=odd_text(40, utf8=True))
def test_target_release_stats_and_info(services, seq_id):
    assert services.target.Release(target_pb2.ReleaseRequest(seq_id=seq_id), timeout=TIMEOUT).released is False
    info = services.target.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=TIMEOUT)
    assert info.vocab_size == BYTE_VOCAB
    services.back_to_baseline()


# --- draft -----------------------------------------------------------------------------------
def draft_messages(first: bool) -> st.SearchStrategy[dict]:
    """A Propose message; `first`: it opens the stream (seq_id, sampling, the whole history)."""
    valid = {"k": st.integers(1, 8), "new_token_ids": st.lists(tokens, min_size=0 if not first else 1, max_size=4),
             "num_accepted": st.integers(0, 1), "speculative": st.booleans(), "branch_width": st.integers(1, 3)}
    if first:
        valid.update(seq_id=st.just("fz-d"), sampling=valid_sampling, new_token_ids=token_lists,
                     speculative=st.just(False), num_accepted=st.just(0))
    return with_hostile_fields(st.fixed_dictionaries(valid), draft_pb2.DraftRequest.DESCRIPTOR)


@fuzz(100)
@given(opening=draft_messages(True), stream=st.lists(draft_messages(False), max_size=4),
       order=st.permutations(range(5)), reorder=st.booleans())
def test_draft_propose(services, opening, stream, order, reorder):
    """A Propose stream: an opening and rounds, sometimes out of order (the opening later, or twice)."""
    requests = [draft_pb2.DraftRequest(**fields) for fields in [opening, *stream]]
    if reorder:
        requests = [requests[i] for i in order if i < len(requests)] + requests[:1]
    drain(services.draft.Propose(iter(requests), timeout=TIMEOUT))
    services.back_to_baseline()


# --- coordinator -----------------------------------------------------------------------------
generate_requests = with_hostile_fields(st.fixed_dictionaries({
    "prompt": st.sampled_from(["hi", "Once upon", "a", "\u202e\u0645 🦙", "\x00<s>"]),
    "max_tokens": st.integers(1, 24), "temperature": st.sampled_from([0.0, 0.8, 1.0, 1e-6, 1e30]),
    "top_p": st.sampled_from([1.0, 0.9, 1e-6]), "top_k": st.sampled_from([0, 3]),
    "repetition_penalty": st.sampled_from([1.0, 1.2]), "k": st.integers(0, 8), "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.sampled_from(["a", "the", "\n"]), max_size=2), "ignore_eos": st.booleans(),
}, optional={"prompt_token_ids": st.lists(tokens, min_size=1, max_size=8)}), coordinator_pb2.GenerateRequest.DESCRIPTOR)


@fuzz(120)
@given(fields=generate_requests, cancel_after=st.sampled_from([None, None, None, 1, 3]))
def test_coordinator_generate(services, fields, cancel_after):
    """Generated requests, some cancelled by the client mid-stream."""
    responses = services.coordinator.Generate(coordinator_pb2.GenerateRequest(**fields), timeout=TIMEOUT)
    if cancel_after is None:
        received = drain(responses)
        if received:
            assert received[-1].finish_reason in ("length", "stop"), received[-1]
    else:
        try:
            for count, _ in enumerate(responses, 1):
                if count >= cancel_after:
                    break
        except grpc.RpcError as exc:
            assert exc.code() in DOCUMENTED, (exc.code(), exc.details())
        responses.cancel()
    services.back_to_baseline()
