"""Structured outputs under speculation are lossless: greedy output under a grammar is token for
token `transformers.generate` of the target alone with xgrammar's own logits processor (k 0, 1, 4;
overlap on and off; a model draft, and an n-gram draft that ignores the grammar), and sampled
tokens follow the exact masked target distribution."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time

import numpy as np
import pytest
import torch

from splitspec.constraints import ConstraintSpec, GrammarCompiler
from splitspec.convert import constraint_to_proto
from splitspec.sampling import SamplingParams, process_logits
from splitspec.v1 import coordinator_pb2
from tests.e2e.test_sampling_distribution import pvalue
from tests.support import collect, start_stack

SCHEMA = {  # an enum and a nested object
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "mood": {"enum": ["happy", "sad"]},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                 "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
                "required": ["kind", "legs"], "additionalProperties": False},
    },
    "required": ["name", "mood", "pet"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}( [a-z]{2,6}){1,3}\."
CONSTRAINTS = {
    "json": ConstraintSpec("json_object"),
    "schema": ConstraintSpec("json_schema", json.dumps(SCHEMA)),
    "regex": ConstraintSpec("regex", REGEX),
}
MAX_TOKENS = 40


def reference(loaded, prompt_ids: list[int], spec: ConstraintSpec, max_tokens: int = MAX_TOKENS) -> list[int]:
    """transformers' greedy generate of the target alone with xgrammar's logits processor."""
    import xgrammar as xgr

    processor = xgr.contrib.hf.LogitsProcessor(GrammarCompiler.for_model(loaded).compile(spec))
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                                    logits_processor=[processor], eos_token_id=list(loaded.eos_token_ids),
                                    pad_token_id=loaded.eos_token_ids[0])
    return out[0, len(prompt_ids):].tolist()


def check_valid(text: str, name: str) -> None:
    if name == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        value = json.loads(text)
        assert isinstance(value, dict)
        if name == "schema":
            assert set(value) == {"name", "mood", "pet"} and value["mood"] in ("happy", "sad")
            assert value["pet"]["kind"] in ("cat", "dog") and isinstance(value["pet"]["legs"], int)


async def greedy_identity(target, draft, prompt: str, overlap: bool, ngram: tuple[int, int] | None = None) -> None:
    stack = await start_stack(target, draft, k=4, max_k=8, overlap=overlap, ngram=ngram)
    prompt_ids = target.tokenizer(prompt).input_ids
    try:
        for name, spec in CONSTRAINTS.items():
            expected = reference(target, prompt_ids, spec)
            for k in (0, 1, 4):
                result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
                    prompt_token_ids=prompt_ids, max_tokens=MAX_TOKENS, temperature=0.0, k=k,
                    constraint=constraint_to_proto(spec)))
                assert result["token_ids"] == expected, (name, k, result["text"])
                if result["last"].finish_reason == "stop":  # complete: EOS ended it
                    check_valid(result["text"], name)
    finally:
        await stack.stop()


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
async def test_greedy_under_constraints_is_the_target_alone_on_tiny_models(tiny, overlap):
    await greedy_identity(tiny["target"], tiny["draft_close"], "abc", overlap)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
async def test_greedy_under_constraints_is_the_target_alone_on_the_real_pair(real, overlap):
    await greedy_identity(real["target"], real["draft"], "Once upon a time", overlap)


async def test_a_draft_that_ignores_the_grammar_never_makes_the_target_emit_an_invalid_token(real):
    """The n-gram drafter proposes tokens without looking at the grammar: the masked target rejects
    every invalid one, and the output is still the target alone's."""
    await greedy_identity(real["target"], None, "Once upon a time", overlap=False, ngram=(1, 3))


def record_masks_and_forwards(engine, monkeypatch) -> tuple[list[tuple[float, float]], list[float]]:
    """From now on: the (start, end) of each forward of `engine`'s runner, and when each
    computation of grammar masks began. (Whether a step then waits for its masks less than they
    took depends on the machine's load: with two test processes on two cores the mask thread
    sometimes starts only after the forward.)"""
    forwards: list[tuple[float, float]] = []
    mask_starts: list[float] = []
    forward, masks = engine.runner.forward, type(engine)._masks

    def timed_forward(chunks):
        start = time.perf_counter()
        try:
            return forward(chunks)
        finally:
            forwards.append((start, time.perf_counter()))

    def timed_masks(self, planned):
        mask_starts.append(time.perf_counter())
        return masks(self, planned)

    monkeypatch.setattr(engine.runner, "forward", timed_forward)
    monkeypatch.setattr(type(engine), "_masks", timed_masks)
    return forwards, mask_starts


async def test_every_output_is_valid_at_concurrency_16_with_unconstrained_requests_in_the_batch(real, monkeypatch):
    target = real["target"]
    stack = await start_stack(target, real["draft"], k=4, max_k=8, overlap=True)
    forwards, mask_starts = record_masks_and_forwards(stack.target.state, monkeypatch)
    try:
        requests = []
        for i in range(16):  # bounded grammars, so that every constrained request completes
            name = ("schema", "regex", "schema", None)[i % 4]
            message = coordinator_pb2.GenerateRequest(prompt=f"Once upon a time {i}", max_tokens=200,
                                                      temperature=0.0 if i % 2 else 0.9, seed=i, k=4)
            if name is not None:
                message.constraint.CopyFrom(constraint_to_proto(CONSTRAINTS[name]))
            requests.append((name, message))
        results = await asyncio.gather(*(collect(stack.stub, m) for _, m in requests))
        finished = 0
        for (name, message), result in zip(requests, results):
            if name is None:
                continue
            if result["last"].finish_reason == "stop":
                check_valid(result["text"], name)
                finished += 1
            else:  # cut by max_tokens: still a prefix the grammar accepts
                matcher = GrammarCompiler.for_model(target).matcher(CONSTRAINTS[name])
                assert matcher.allowed(result["token_ids"]) is not None, result["text"]
        assert finished == 12, finished
        stats = stack.target.state.stats  # the masks were counted, and computed beside the forward
        assert stats.masked_rows > 0 and stats.mask_seconds > 0 and stats.mask_wait_seconds > 0
        beside = sum(any(start < at < end for start, end in forwards) for at in mask_starts)
        assert beside > 0, f"none of {len(mask_starts)} mask computations began during a forward"
    finally:
        await stack.stop()


# --- sampled: the first constrained positions follow the exact masked target distribution ---
N = 1000
SAMPLED = SamplingParams(temperature=1.0, top_k=8)
SAMPLE_SPEC = ConstraintSpec("regex", r"[a-h][a-h0-9 ]{3,}")
SAMPLE_PROMPT = "abc"


def masked_marginals(loaded, prompt: list[int], depth: int, params: SamplingParams,
                     spec: ConstraintSpec | None) -> list[dict[int, float]]:
    """Exact marginals of output tokens 1..depth under `params`, masked by `spec` (None: not)."""
    params = dataclasses.replace(params, num_prompt_tokens=len(prompt))
    matcher = GrammarCompiler.for_model(loaded).matcher(spec) if spec is not None else None
    paths: dict[tuple[int, ...], float] = {(): 1.0}
    marginals = []
    for _ in range(depth):
        new_paths: dict[tuple[int, ...], float] = {}
        marginal: dict[int, float] = {}
        for context, mass in paths.items():
            with torch.inference_mode():
                logits = loaded.model(torch.tensor([prompt + list(context)])).logits[:, -1].float()
            allowed = matcher.allowed(list(context)).unsqueeze(0) if matcher is not None else None
            row = process_logits(logits, params, None, allowed)[0].double()
            for token in torch.nonzero(row).flatten().tolist():
                new_paths[context + (token,)] = mass * float(row[token])
                marginal[token] = marginal.get(token, 0.0) + mass * float(row[token])
        paths = new_paths
        marginals.append(marginal)
    return marginals


async def test_sampled_tokens_follow_the_masked_target_distribution(tiny):
    """k = 2, 4 tokens: token 1 from prefill, tokens 2 and 3 from one speculative round. The power
    checks: samples from the masked draft's marginal, or from the unmasked target's, fail."""
    target, draft = tiny["target"], tiny["draft_noisy"]
    stack = await start_stack(target, draft, k=2)
    try:
        async def one(seed: int) -> dict:
            return await collect(stack.stub, coordinator_pb2.GenerateRequest(
                prompt=SAMPLE_PROMPT, max_tokens=4, k=2, seed=seed, temperature=SAMPLED.temperature,
                top_k=SAMPLED.top_k, constraint=constraint_to_proto(SAMPLE_SPEC)))

        results = []
        for start in range(0, N, 50):
            results += await asyncio.gather(*(one(seed) for seed in range(start, start + 50)))
    finally:
        await stack.stop()
    origins = [r["origins"] for r in results]
    accepted = sum(o[1] == coordinator_pb2.TOKEN_ORIGIN_ACCEPTED for o in origins)
    assert 0.05 * N < accepted < 0.95 * N, "the test needs both accepted and rejected draft tokens"
    prompt = target.tokenizer(SAMPLE_PROMPT).input_ids
    exact = masked_marginals(target, prompt, 3, SAMPLED, SAMPLE_SPEC)
    for position in (0, 1, 2):
        samples = [r["token_ids"][position] for r in results]
        assert pvalue(samples, exact[position]) > 1e-3, f"token {position + 1}"
    rng = np.random.default_rng(0)
    for wrong in (masked_marginals(draft, prompt, 2, SAMPLED, SAMPLE_SPEC)[1],
                  masked_marginals(target, prompt, 2, SAMPLED, None)[1]):
        like = rng.choice(list(wrong), size=N, p=np.array(list(wrong.values())) / sum(wrong.values()))
        merged = {t: exact[1].get(t, 1e-12) for t in set(exact[1]) | set(wrong)}
        assert pvalue(like.tolist(), merged) < 1e-12
