"""The target's VerifyStream plans, against a real target server on the tiny model: a verdict that
matches a planned branch starts that branch's round on the target at once; any other plan is
ignored; a malformed plan is refused with INVALID_ARGUMENT naming its field. A target-only round
with autonomous rounds goes on by itself, giving the tokens that rounds sent one by one give, and a
plan that extends its budget in time makes it go on further."""

from __future__ import annotations

import grpc
import pytest

from splitspec.paged.cache import CacheConfig
from splitspec.service import make_channel
from splitspec.v1 import common_pb2, target_pb2, target_pb2_grpc
from target_worker.server import start_target

PROMPT = [5, 6, 7]
GREEDY = common_pb2.SamplingParams(temperature=0.0, top_p=1.0, repetition_penalty=1.0, seed=1)


@pytest.fixture
async def stub(tiny):
    server = await start_target(tiny["target"], cache=CacheConfig(num_blocks=64))
    channel = make_channel(server.address)
    try:
        yield target_pb2_grpc.TargetWorkerStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


async def prefill(stub, seq_id: str) -> int:
    reply = await stub.Prefill(target_pb2.PrefillRequest(seq_id=seq_id, token_ids=PROMPT, sampling=GREEDY,
                                                         max_new_tokens=40, num_lookahead_slots=4))
    return reply.num_tokens


def verify(seq_id: str, draft: list[int], num_tokens: int) -> target_pb2.VerifyRequest:
    return target_pb2.VerifyRequest(seq_id=seq_id, draft_token_ids=draft, num_tokens=num_tokens)


def plan(seq_id: str, num_tokens: int, *branches: tuple[int, int, list[int]]) -> target_pb2.VerifyRequest:
    request = target_pb2.VerifyRequest(seq_id=seq_id, num_tokens=num_tokens)
    for accepted, token, draft in branches:
        request.branches.add(num_accepted=accepted, token_id=token,
                             next=target_pb2.VerifyRequest(draft_token_ids=draft, num_tokens=num_tokens + accepted + 1))
    return request


def verdict(response: target_pb2.VerifyResponse) -> tuple[int, int, int]:
    return response.num_accepted, response.token_id, response.num_tokens


async def sent_rounds(stub, seq_id: str, drafts: list[list[int]]) -> list[target_pb2.VerifyResponse]:
    """Each round sent by the caller after the last verdict, as without plans."""
    call = stub.VerifyStream()
    num_tokens, responses = await prefill(stub, seq_id), []
    for draft in drafts:
        await call.write(verify(seq_id, draft, num_tokens))
        responses.append(await call.read())
        num_tokens = responses[-1].num_tokens
    call.cancel()
    return responses


async def test_a_matching_plan_chains_the_next_round(stub):
    first, second, third = await sent_rounds(stub, "sent", [[1, 2], [3, 4], []])
    assert not first.chained and not second.chained

    call = stub.VerifyStream()
    num_tokens = await prefill(stub, "chained")
    wrong_token = (first.token_id + 1) % 64
    await call.write(plan("chained", num_tokens, (first.num_accepted, wrong_token, [9]),
                          (first.num_accepted, first.token_id, [3, 4])))
    await call.write(verify("chained", [1, 2], num_tokens))
    answer = await call.read()
    assert answer.chained and verdict(answer) == verdict(first)
    ahead = await call.read()  # the planned round, verified without a request
    assert not ahead.chained and verdict(ahead) == verdict(second)
    await call.write(verify("chained", [], ahead.num_tokens))  # the stream goes on from there
    assert verdict(await call.read()) == verdict(third)
    call.cancel()


async def test_plans_for_another_verdict_or_round_are_ignored(stub):
    (first, second) = await sent_rounds(stub, "sent", [[1, 2], [3]])
    call = stub.VerifyStream()
    num_tokens = await prefill(stub, "ignored")
    await call.write(plan("ignored", num_tokens - 1, (first.num_accepted, first.token_id, [8])))  # an earlier round
    await call.write(plan("ignored", num_tokens, (first.num_accepted, (first.token_id + 1) % 64, [8])))
    await call.write(verify("ignored", [1, 2], num_tokens))
    answer = await call.read()
    assert not answer.chained and verdict(answer) == verdict(first)
    await call.write(verify("ignored", [3], answer.num_tokens))  # nothing was started behind the caller's back
    assert verdict(await call.read()) == verdict(second)
    call.cancel()


async def test_malformed_plans_name_their_field(stub):
    num_tokens = await prefill(stub, "bad")
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Verify(plan("bad", num_tokens, (0, 1, [2])))
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unary.value.details().startswith("branches:")

    (first,) = await sent_rounds(stub, "learn", [[1, 2]])
    call = stub.VerifyStream()
    bad = plan("bad", num_tokens, (first.num_accepted, first.token_id, [3]))
    bad.branches[0].next.num_tokens += 1
    await call.write(bad)
    await call.write(verify("bad", [1, 2], num_tokens))
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        await call.read()
    assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert streamed.value.details().startswith("branches.next.num_tokens:")


async def test_autonomous_rounds_decode_by_themselves_as_sent_rounds_would(stub):
    sent = await sent_rounds(stub, "sent", [[]] * 6)
    call = stub.VerifyStream()
    num_tokens = await prefill(stub, "alone")
    request = verify("alone", [], num_tokens)
    request.autonomous_rounds = 4
    await call.write(request)
    answers = [await call.read() for _ in range(5)]  # one request, five verdicts
    assert [a.chained for a in answers] == [True, True, True, True, False]  # the budget is spent
    assert [verdict(a) for a in answers] == [verdict(r) for r in sent[:5]]
    await call.write(verify("alone", [], answers[-1].num_tokens))  # the caller takes over again
    assert verdict(await call.read()) == verdict(sent[5])
    call.cancel()


async def test_a_request_on_the_stream_ends_autonomous_rounds(stub):
    call = stub.VerifyStream()
    num_tokens = await prefill(stub, "interrupted")
    request = verify("interrupted", [], num_tokens)
    request.autonomous_rounds = 30
    await call.write(request)
    first = await call.read()
    assert first.chained
    # the round chained after `first` may have produced more; the next request is for what follows
    answers = [first]
    while answers[-1].chained:
        if len(answers) == 1:
            await call.write(verify("interrupted", [1, 2], 0))  # num_tokens 0: whatever the sequence has
        answers.append(await call.read())
    assert len(answers) < 31  # it stopped before its budget: the request was taken next
    assert answers[-1].num_tokens == num_tokens + len(answers)  # one token per autonomous round
    last = await call.read()  # the request's own verdict
    assert not last.chained and last.num_tokens > answers[-1].num_tokens
    call.cancel()


def extension(seq_id: str, num_tokens: int, rounds: int) -> target_pb2.VerifyRequest:
    return target_pb2.VerifyRequest(seq_id=seq_id, num_tokens=num_tokens, autonomous_rounds=rounds,
                                    extends_autonomy=True)


async def test_an_extension_plan_raises_the_autonomous_budget_of_its_round(stub):
    sent = await sent_rounds(stub, "sent", [[]] * 6)
    call = stub.VerifyStream()
    num_tokens = await prefill(stub, "extended")
    await call.write(extension("extended", num_tokens + 1, 3))  # for the second round: three more after it
    await call.write(extension("extended", num_tokens - 1, 20))  # for a round long past: ignored
    request = verify("extended", [], num_tokens)
    request.autonomous_rounds = 1
    await call.write(request)
    answers = [await call.read() for _ in range(5)]  # 1 + 1 sent, 3 from the plan
    assert [a.chained for a in answers] == [True, True, True, True, False]
    assert [verdict(a) for a in answers] == [verdict(r) for r in sent[:5]]
    await call.write(verify("extended", [], answers[-1].num_tokens))  # nothing went on behind the caller's back
    assert verdict(await call.read()) == verdict(sent[5])
    call.cancel()


async def test_malformed_extension_plans_name_their_field(stub):
    num_tokens = await prefill(stub, "bad")
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Verify(extension("bad", num_tokens, 3))
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unary.value.details().startswith("extends_autonomy:")
    call = stub.VerifyStream()
    bad = extension("bad", num_tokens, 3)
    bad.draft_token_ids.append(1)
    await call.write(bad)
    await call.write(verify("bad", [], num_tokens))
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        await call.read()
    assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert streamed.value.details().startswith("extends_autonomy:")


@pytest.mark.parametrize("draft,rounds,message", [([], -1, "must be >= 0"), ([1, 2], 3, "only a target-only round")])
async def test_malformed_autonomous_rounds_name_their_field(stub, draft, rounds, message):
    num_tokens = await prefill(stub, "bad")
    request = verify("bad", draft, num_tokens)
    request.autonomous_rounds = rounds
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Verify(request)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unary.value.details().startswith("autonomous_rounds:")
    call = stub.VerifyStream()
    await call.write(request)
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        await call.read()
    assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert streamed.value.details().startswith("autonomous_rounds:") and message in streamed.value.details()


async def test_a_slow_grammar_compile_does_not_hold_up_other_requests(tiny):
    """A constrained prefill's grammar compiles off the event loop: an unconstrained prefill sent
    meanwhile is answered before the compile ends."""
    import asyncio
    import time

    from splitspec.constraints import GrammarCompiler

    class SlowCompiler(GrammarCompiler):
        def compile(self, spec):
            time.sleep(2.0)
            return GrammarCompiler.compile(self, spec)

    server = await start_target(tiny["target"], cache=CacheConfig(num_blocks=64))
    engine = server.state
    engine._grammars = SlowCompiler(engine.loaded.tokenizer, engine.vocab_size, tuple(engine.loaded.eos_token_ids))
    channel = make_channel(server.address)
    try:
        stub = target_pb2_grpc.TargetWorkerStub(channel)
        constrained = common_pb2.SamplingParams(temperature=0.0, top_p=1.0, repetition_penalty=1.0, seed=1,
                                                num_prompt_tokens=len(PROMPT),
                                                constraint=common_pb2.Constraint(regex="[a-z]{1,8}"))
        started = time.perf_counter()
        slow = asyncio.ensure_future(stub.Prefill(target_pb2.PrefillRequest(
            seq_id="constrained", token_ids=PROMPT, sampling=constrained, max_new_tokens=8, num_lookahead_slots=4)))
        await asyncio.sleep(0.2)
        assert await prefill(stub, "plain") == len(PROMPT) + 1
        plain_done = time.perf_counter() - started
        assert (await slow).num_tokens == len(PROMPT) + 1
        assert plain_done < 1.5 < time.perf_counter() - started
    finally:
        await channel.close()
        await server.stop(0)
