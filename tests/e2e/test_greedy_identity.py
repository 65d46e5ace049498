"""Greedy output through the whole stack is token-for-token `transformers.generate` of the target."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from coordinator.generation import OVERLAP_MAX_BRANCHES
from splitspec.v1 import coordinator_pb2
from tests.support import collect, start_stack

K_VALUES = (1, 2, 4, 8)


def reference(loaded, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool) -> list[int]:
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
        # [] and not None: None falls back to the model's generation_config and stops at its EOS
        eos_token_id=list(loaded.eos_token_ids) if stop_at_eos else [],
    )
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([prompt_ids]), generation_config=config)
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("draft_name", ["draft_same", "draft_noisy", "draft_other", "draft_short"])
async def test_tiny_models_match_target_alone(tiny, draft_name):
    """draft_short has a 40-position context: requests run past it and finish target-only."""
    stack = await start_stack(tiny["target"], tiny[draft_name], k=4, max_k=8)
    try:
        for prompt in ("hello world", "The quick brown fox"):
            prompt_ids = tiny["target"].tokenizer(prompt).input_ids
            expected = reference(tiny["target"], prompt_ids, 60, stop_at_eos=False)
            for k in K_VALUES:
                result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
                    prompt=prompt, max_tokens=60, temperature=0.0, k=k, ignore_eos=True))
                assert result["token_ids"] == expected, (draft_name, prompt, k)
                spec = result["last"].spec
                assert spec.rounds > 0 and spec.draft_tokens >= spec.accepted_tokens
                if draft_name == "draft_same":  # identical weights: every greedy proposal is accepted
                    assert spec.accepted_tokens == spec.draft_tokens
    finally:
        await stack.stop()


@pytest.mark.xdist_group("compiled_stack")  # one worker compiles the shared stack
async def test_compiled_workers_match_target_alone(tiny, compiled_stack):
    """Both workers compiled (torch.compile, two graphs each): greedy output is still exactly the
    eager target's `generate`, speculative and target-only, one request and four at once."""
    stack = compiled_stack
    prompts = ("hello world", "The quick brown fox", "a", "once upon")
    expected = [reference(tiny["target"], tiny["target"].tokenizer(p).input_ids, 40, stop_at_eos=False)
                for p in prompts]
    for k in (0, 1, 4):
        results = await asyncio.gather(*(collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt=p, max_tokens=40, temperature=0.0, k=k, ignore_eos=True)) for p in prompts))
        assert [r["token_ids"] for r in results] == expected, k
    assert stack.target.state.runner.compiles == 2 and stack.draft.state.runner.compiles == 2


def _prompts(count: int) -> list[str]:
    path = Path(os.environ.get("SPLITSPEC_MODEL_DIR", "")).parent / "prompts" / "tinystories.jsonl"
    if path.is_file():
        return [json.loads(line)["prompt"] for line in path.read_text().splitlines()[:count]]
    return ["Once upon a time", "One day, a little girl named Lily", "Tom and his dog went to the park"][:count]


@pytest.mark.real_models
async def test_real_pair_matches_target_alone_past_the_draft_context(real):
    """300 new tokens: every request runs past the draft's 256 positions."""
    target = real["target"]
    stack = await start_stack(target, real["draft"], k=4, max_k=8)
    try:
        for prompt in _prompts(2):
            prompt_ids = target.tokenizer(prompt).input_ids
            expected = reference(target, prompt_ids, 300, stop_at_eos=False)
            for k in K_VALUES:
                result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
                    prompt=prompt, max_tokens=300, temperature=0.0, k=k, ignore_eos=True))
                assert result["token_ids"] == expected, (prompt, k)
                assert result["last"].spec.accepted_tokens > 0
    finally:
        await stack.stop()


@pytest.mark.real_models
async def test_real_pair_stops_at_a_stop_token_like_generate(real):
    """Greedy TinyStories never emits EOS (it loops); a stop token id taken from the reference run
    must end the stream right after its first occurrence, with the token kept in token_ids."""
    target = real["target"]
    stack = await start_stack(target, real["draft"], k=4)
    try:
        prompt_ids = target.tokenizer("Lily and Ben").input_ids
        expected = reference(target, prompt_ids, 120, stop_at_eos=False)
        stop_token = expected[60]
        cut = expected.index(stop_token) + 1
        result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt="Lily and Ben", max_tokens=120, temperature=0.0, stop_token_ids=[stop_token]))
        assert result["token_ids"] == expected[:cut]
        assert result["last"].finish_reason == "stop"
        assert result["last"].usage.completion_tokens == cut
    finally:
        await stack.stop()


async def test_adaptive_k_keeps_greedy_output_identical(tiny):
    from coordinator.adaptive import AUTO_K

    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=AUTO_K, max_k=6)
    try:
        target = tiny["target"]
        for prompt in ("auto one", "auto two, a little longer"):
            expected = reference(target, target.tokenizer(prompt).input_ids, 60, stop_at_eos=False)
            result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
                prompt=prompt, max_tokens=60, temperature=0.0, ignore_eos=True))
            assert result["token_ids"] == expected
        from coordinator.adaptive import EXPLORE

        measured = stack.coordinator.state.costs.buckets[1].seconds  # one request at a time: bucket 1
        assert set(EXPLORE) <= set(measured)  # each listed length was explored and measured, k = 0 included
    finally:
        await stack.stop()


@pytest.mark.parametrize("draft_name", ["draft_same", "draft_noisy", "draft_short"])
async def test_overlap_keeps_greedy_output_identical(tiny, draft_name):
    """Drafting round n+1 during round n's verification changes timing, never tokens."""
    stack = await start_stack(tiny["target"], tiny[draft_name], k=4, max_k=8, overlap=True)
    try:
        target = tiny["target"]
        for k in (1, 2, 4, 8):
            prompt = f"overlap {k}"
            expected = reference(target, target.tokenizer(prompt).input_ids, 60, stop_at_eos=False)
            result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
                prompt=prompt, max_tokens=60, temperature=0.0, k=k, ignore_eos=True))
            assert result["token_ids"] == expected, (draft_name, k)
        held, chained, missed = (stack.coordinator.registry.get_sample_value(
            "splitspec:overlap_speculations_total", {"outcome": outcome}) or 0 for outcome in ("held", "chained", "missed"))
        if draft_name == "draft_same":  # the draft is the target: every guess holds
            assert held + chained > 20 and missed == 0
    finally:
        await stack.stop()


async def test_overlap_speculates_beside_other_requests_on_its_draft(tiny):
    """Concurrent requests on one draft each get branches drafted during their verification, and
    their greedy output stays the target's."""
    stack = await start_stack(tiny["target"], tiny["draft_same"], k=3, overlap=True)
    registry = stack.coordinator.registry
    try:
        target, prompts = tiny["target"], ("busy draft", "a second request", "and a third")
        results = await asyncio.gather(*(collect(stack.stub, coordinator_pb2.GenerateRequest(
            prompt=prompt, max_tokens=30, temperature=0.0, k=3, ignore_eos=True)) for prompt in prompts))
        for prompt, result in zip(prompts, results):
            assert result["token_ids"] == reference(target, target.tokenizer(prompt).input_ids, 30, stop_at_eos=False)
        (draft,) = stack.coordinator.state.drafts.endpoints.values()
        assert draft.pinned == 0
        speculated = sum(registry.get_sample_value("splitspec:overlap_speculations_total", {"outcome": outcome}) or 0
                         for outcome in ("held", "chained", "missed"))
        assert speculated > 3 * len(prompts)
    finally:
        await stack.stop()


async def test_overlap_stops_when_the_branches_of_all_requests_on_the_draft_outgrow_a_pass(tiny):
    """Beyond OVERLAP_MAX_BRANCHES branches per drafting pass over the draft's requests, drafting
    them would outlast the verify: no branches then, and the same output."""
    stack = await start_stack(tiny["target"], tiny["draft_same"], k=3, overlap=True)
    registry = stack.coordinator.registry

    def speculations() -> float:
        return sum(registry.get_sample_value("splitspec:overlap_speculations_total", {"outcome": outcome}) or 0
                   for outcome in ("held", "chained", "missed"))
    try:
        target, prompt = tiny["target"], "busy draft"
        expected = reference(target, target.tokenizer(prompt).input_ids, 30, stop_at_eos=False)
        request = coordinator_pb2.GenerateRequest(prompt=prompt, max_tokens=30, temperature=0.0, k=3, ignore_eos=True)
        (draft,) = stack.coordinator.state.drafts.endpoints.values()
        others = OVERLAP_MAX_BRANCHES // ((3 + 1) * 3)  # with this request: one too many
        draft.pinned += others  # as if that many other requests were pinned to it
        assert (await collect(stack.stub, request))["token_ids"] == expected
        assert speculations() == 0
        draft.pinned -= 1  # now they fit
        assert (await collect(stack.stub, request))["token_ids"] == expected
        assert speculations() > 3
        draft.pinned -= others - 1
    finally:
        await stack.stop()


async def test_dynamic_draft_length_keeps_greedy_output_identical(tiny):
    """draft_confidence ends proposals early: shorter rounds, the same tokens."""
    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=6, max_k=6)
    try:
        target = tiny["target"]
        for confidence in (0.02, 1.0):
            prompt = f"confidence {confidence}"
            expected = reference(target, target.tokenizer(prompt).input_ids, 50, stop_at_eos=False)
            result = await collect(stack.stub, coordinator_pb2.GenerateRequest(
                prompt=prompt, max_tokens=50, temperature=0.0, ignore_eos=True, draft_confidence=confidence))
            spec = result["last"].spec
            assert result["token_ids"] == expected, confidence
            assert spec.rounds > 0 and spec.draft_tokens < 6 * spec.rounds
            if confidence == 1.0:  # no token is that sure: every proposal is one token
                assert spec.draft_tokens == spec.rounds
    finally:
        await stack.stop()
