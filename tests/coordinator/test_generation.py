"""A request's rounds on fake workers: each round's next request (verify or proposal) goes out
before the round's message reaches the client, and the tokens are the verdicts' tokens."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from coordinator.generation import Backend, Generation
from coordinator.metrics import CoordinatorMetrics
from coordinator.pool import Endpoint, WorkerPool
from coordinator.request import GenerationRequest
from splitspec.sampling import SamplingParams
from splitspec.v1 import common_pb2, draft_pb2, target_pb2

PROMPT = [1, 2, 3]


@dataclass
class Events:
    log: list[tuple[str, int]] = field(default_factory=list)


class LetterTokenizer:
    """Token t is the letter chr(97 + t % 26); no Rust backend, so TextStream decodes twice."""

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(chr(97 + t % 26) for t in ids)


@dataclass
class FakeVerifier:
    events: Events
    accept: int  # tokens of each proposal the target keeps

    async def verify(self, proposal: draft_pb2.DraftResponse | None, num_tokens: int,
                     timeout: float) -> target_pb2.VerifyResponse:
        self.events.log.append(("verify", num_tokens))
        await asyncio.sleep(0.001)  # the target's step
        if proposal is None:
            return target_pb2.VerifyResponse(token_id=num_tokens % 20, num_tokens=num_tokens + 1, step_seconds=0.001)
        accepted = min(self.accept, len(proposal.token_ids))
        return target_pb2.VerifyResponse(num_accepted=accepted, token_id=20 + num_tokens % 5,
                                         is_bonus=accepted == len(proposal.token_ids),
                                         num_tokens=num_tokens + accepted + 1, step_seconds=0.001)

    def close(self) -> None:
        pass


@dataclass
class FakeTargetClient:
    events: Events
    accept: int = 1

    async def prefill(self, seq_id: str, token_ids: list[int], *args: object, **kwargs: object) -> target_pb2.PrefillResponse:
        return target_pb2.PrefillResponse(token_id=7, num_tokens=len(token_ids) + 1)

    def open_verify(self, seq_id: str) -> FakeVerifier:
        return FakeVerifier(self.events, self.accept)

    async def release(self, seq_id: str) -> None:
        pass


@dataclass
class FakeDraftSession:
    """Proposes k tokens; with `branch` speculation it drafts the branch every verdict of
    FakeVerifier takes (the target's token after `accept` accepted tokens)."""

    events: Events
    accept: int
    history_len: int = 0

    async def propose(self, history: list[int], k: int) -> draft_pb2.DraftResponse:
        self.events.log.append(("propose", len(history)))
        self.history_len = len(history)
        await asyncio.sleep(0.001)
        return draft_pb2.DraftResponse(token_ids=[10 + i for i in range(k)], step_seconds=0.001)

    async def speculate(self, k: int, width: int) -> draft_pb2.DraftResponse:
        await asyncio.sleep(0)  # the verify of the proposal this speculates on has been sent
        verified = next(n for event, n in reversed(self.events.log) if event == "verify")
        return draft_pb2.DraftResponse(branches=[draft_pb2.DraftBranch(
            num_accepted=self.accept, token_id=20 + verified % 5, proposal=draft_pb2.DraftResponse(token_ids=[11] * k))])

    def branch_held(self, index: int, history_len: int) -> None:
        self.history_len = history_len

    def accepted(self, num_accepted: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class FakeDraftClient:
    events: Events
    accept: int = 1

    def open(self, seq_id: str, params: SamplingParams, min_confidence: float = 0.0) -> FakeDraftSession:
        return FakeDraftSession(self.events, self.accept)


def pool(kind: str, client: object) -> WorkerPool:
    workers = WorkerPool(kind, [], make_client=lambda address: client)
    workers.endpoints["fake:1"] = Endpoint("fake:1", client, healthy=True,
                                          info=common_pb2.ModelInfo(max_model_len=1000))
    return workers


def generation(events: Events, k: int, overlap: bool = False) -> Generation:
    backend = Backend(targets=pool("target", FakeTargetClient(events)),
                      drafts=pool("draft", FakeDraftClient(events)) if k else None,
                      eos_token_ids=frozenset(), tokenizer=LetterTokenizer(), metrics=CoordinatorMetrics(),
                      overlap=overlap)
    request = GenerationRequest(request_id="r", prompt_token_ids=PROMPT, max_tokens=12, params=SamplingParams(),
                                stop=(), stop_token_ids=frozenset(), ignore_eos=True, k=k)
    return Generation(request, backend)


async def run(events: Events, gen: Generation) -> list[int]:
    tokens: list[int] = []
    async for message in gen.stream():
        tokens.extend(message.token_ids)
        events.log.append(("message", len(PROMPT) + len(tokens)))
    return tokens


def assert_next_request_before_message(events: Events) -> None:
    """Every message but the last comes after the next round's first request (a proposal, or a
    verify of a held branch or a target-only round) for the history it ends."""
    messages = [(i, n) for i, (event, n) in enumerate(events.log) if event == "message"]
    for index, history_len in messages[1:-1]:
        requested = [i for i, (event, n) in enumerate(events.log) if event != "message" and n == history_len]
        assert requested and requested[0] < index, (history_len, events.log)


@pytest.mark.asyncio
async def test_target_only_round_is_verified_before_its_predecessor_is_written() -> None:
    events = Events()
    tokens = await run(events, generation(events, k=0))
    assert tokens == [7] + [n % 20 for n in range(4, 15)]
    assert_next_request_before_message(events)


@pytest.mark.asyncio
async def test_next_proposal_is_requested_before_the_round_is_written() -> None:
    events = Events()
    gen = generation(events, k=3)
    tokens = await run(events, gen)
    assert len(tokens) == 12 and gen.spec.rounds >= 5
    assert tokens[1:3] == [10, 20 + 4 % 5]  # one accepted draft token, then the target's
    assert [n for event, n in events.log if event == "propose"] == [4, 6, 8, 10, 12]  # then 1 token left: target-only
    assert_next_request_before_message(events)


@pytest.mark.asyncio
async def test_held_branch_is_verified_before_the_round_is_written() -> None:
    events = Events()
    gen = generation(events, k=3, overlap=True)
    tokens = await run(events, gen)
    assert len(tokens) == 12
    verifies = [n for event, n in events.log if event == "verify"]
    proposes = [n for event, n in events.log if event == "propose"]
    assert len(proposes) < len(verifies)  # some rounds came from a held branch, not a proposal
    assert_next_request_before_message(events)
