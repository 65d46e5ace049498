"""A request's rounds on fake workers: each round's next request (verify or proposal) goes out
before the round's message reaches the client, and the tokens are the verdicts' tokens."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from coordinator.backend import Backend
from coordinator.generation import Generation
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

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.decode([token_id])


@dataclass
class FakeVerifier:
    """A target that keeps `accept` tokens of each proposal; with `chain`, it starts a planned
    branch's round as soon as a verdict matches it, as the target servicer does."""

    events: Events
    accept: int
    chain: bool = False
    plans: dict[int, list[tuple[int, int, draft_pb2.DraftResponse]]] = field(default_factory=dict)
    ahead: asyncio.Future | None = None

    async def verify(self, proposal: draft_pb2.DraftResponse | None, num_tokens: int,
                     timeout: float, autonomous_rounds: int = 0) -> target_pb2.VerifyResponse:
        """Autonomous rounds are not run here: each verdict comes back unchained, so the
        coordinator sends every round itself."""
        self.events.log.append(("verify", num_tokens))
        return await self._step(proposal, num_tokens)

    async def chained(self, timeout: float) -> target_pb2.VerifyResponse:
        ahead, self.ahead = self.ahead, None
        assert ahead is not None, "read a chained verdict the target never started"
        return await ahead

    async def offer(self, num_tokens: int, branches: list[tuple[int, int, draft_pb2.DraftResponse]]) -> None:
        self.events.log.append(("offer", num_tokens))
        self.plans[num_tokens] = branches

    async def _step(self, proposal: draft_pb2.DraftResponse | None, num_tokens: int) -> target_pb2.VerifyResponse:
        await asyncio.sleep(0.001)  # the target's step
        if proposal is None:
            return target_pb2.VerifyResponse(token_id=num_tokens % 20, num_tokens=num_tokens + 1, step_seconds=0.001)
        accepted = min(self.accept, len(proposal.token_ids))
        verdict = target_pb2.VerifyResponse(num_accepted=accepted, token_id=20 + num_tokens % 5,
                                            is_bonus=accepted == len(proposal.token_ids),
                                            num_tokens=num_tokens + accepted + 1, step_seconds=0.001)
        plan = self.plans.pop(num_tokens, []) if self.chain else []
        branch = next((p for a, t, p in plan if (a, t) == (verdict.num_accepted, verdict.token_id)), None)
        if branch is not None:
            self.events.log.append(("chained", verdict.num_tokens))
            verdict.chained = True
            self.ahead = asyncio.ensure_future(self._step(branch, verdict.num_tokens))
        return verdict

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.cancel()


@dataclass
class FakeTargetClient:
    events: Events
    accept: int = 1
    chain: bool = False

    async def prefill(self, seq_id: str, token_ids: list[int], *args: object, **kwargs: object) -> target_pb2.PrefillResponse:
        return target_pb2.PrefillResponse(token_id=7, num_tokens=len(token_ids) + 1)

    def open_verify(self, seq_id: str) -> FakeVerifier:
        return FakeVerifier(self.events, self.accept, self.chain)

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
        verified = next(n for event, n in reversed(self.events.log) if event in ("verify", "chained"))
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


def generation(events: Events, k: int, overlap: bool = False, chain: bool = False,
               stop_token_ids: frozenset[int] = frozenset(), max_tokens: int = 12) -> Generation:
    backend = Backend(targets=pool("target", FakeTargetClient(events, chain=chain)),
                      drafts=pool("draft", FakeDraftClient(events)) if k else None,
                      eos_token_ids=frozenset(), tokenizer=LetterTokenizer(), metrics=CoordinatorMetrics(),
                      overlap=overlap)
    request = GenerationRequest(request_id="r", prompt_token_ids=PROMPT, max_tokens=max_tokens, params=SamplingParams(),
                                stop=(), stop_token_ids=stop_token_ids, ignore_eos=True, k=k)
    return Generation(request, backend)


async def run(events: Events, gen: Generation) -> list[int]:
    tokens: list[int] = []
    async for message in gen.stream():
        tokens.extend(message.token_ids)
        events.log.append(("message", len(PROMPT) + len(tokens)))
    return tokens


def assert_next_request_before_message(events: Events) -> None:
    """Every message but the last comes after the next round's first request (a proposal, or a
    verify of a held branch or a target-only round, or the target chaining a planned branch) for
    the history it ends."""
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


@pytest.mark.asyncio
async def test_target_chains_planned_branches_without_a_verify_request() -> None:
    plain, chaining = Events(), Events()
    expected = await run(plain, generation(plain, k=3, overlap=True))
    gen = generation(chaining, k=3, overlap=True, chain=True)
    assert await run(chaining, gen) == expected
    chained = [n for event, n in chaining.log if event == "chained"]
    sent = [n for event, n in chaining.log if event == "verify"]
    assert chained and gen.spec.chained_rounds == len(chained)
    assert not set(chained) & set(sent)  # a chained round is never also sent
    assert len(sent) + len(chained) == len([n for event, n in plain.log if event == "verify"])
    offers = [n for event, n in chaining.log if event == "offer"]
    assert all(n in offers for n in [n for event, n in plain.log if event == "verify"][1:-2])
    assert_next_request_before_message(chaining)


@pytest.mark.asyncio
async def test_branches_that_would_end_the_request_are_not_offered() -> None:
    """Verdict tokens run 24, 21, 23, 20, 22 (history 6, 8, 10, 12, 14): stop token 22 ends the
    request after the round verified with 12 tokens, whose branch the target must not be offered."""
    events = Events()
    gen = generation(events, k=3, overlap=True, chain=True, stop_token_ids=frozenset({22}), max_tokens=30)
    tokens = await run(events, gen)
    assert tokens[-1] == 22 and gen.finish_reason == "stop" and len(PROMPT) + len(tokens) == 14
    assert ("offer", 10) in events.log and ("chained", 12) in events.log  # plans up to the last round
    assert ("offer", 12) not in events.log and ("chained", 14) not in events.log  # its one branch would stop
