"""process_logits must equal Hugging Face's processors/warpers applied in generate's order."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from splitspec.errors import InvalidArgument
from splitspec.sampling import SamplingParams, draw_exponentials, make_generator, process_logits, sample, seen_tokens

VOCAB = 40


def hf_probs(logits: torch.Tensor, history: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scores = logits.clone()
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(history, scores)
    scores = TemperatureLogitsWarper(params.temperature)(history, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(history, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(history, scores)
    if params.min_p > 0:
        scores = MinPLogitsWarper(params.min_p)(history, scores)
    return scores.softmax(dim=-1)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    temperature=st.floats(0.1, 3.0),
    top_k=st.integers(0, VOCAB + 5),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.5),
    repetition_penalty=st.floats(0.5, 2.0),
)
def test_matches_hugging_face_warpers(seed, temperature, top_k, top_p, min_p, repetition_penalty):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, VOCAB, generator=generator) * 3
    history = torch.randint(0, VOCAB, (1, 7), generator=generator)
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    ours = process_logits(logits, params, seen_tokens(history[0].tolist(), [], VOCAB))
    theirs = hf_probs(logits, history, params)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_greedy_is_one_hot_at_penalized_argmax():
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    seen = seen_tokens([1], [], 4)
    probs = process_logits(logits, SamplingParams(temperature=0.0, repetition_penalty=1.5), seen)
    assert probs.tolist() == [[0.0, 0.0, 1.0, 0.0]]  # 3.0 / 1.5 = 2.0 < 2.9


def test_seen_tokens_rows_include_earlier_proposal_tokens():
    seen = seen_tokens([0], [2, 3], 5)
    assert seen.tolist() == [
        [True, False, False, False, False],
        [True, False, True, False, False],
        [True, False, True, True, False],
    ]


@pytest.mark.parametrize(
    "field,params",
    [
        ("temperature", SamplingParams(temperature=-0.1)),
        ("temperature", SamplingParams(temperature=math.nan)),
        ("temperature", SamplingParams(temperature=math.inf)),
        ("top_k", SamplingParams(top_k=-1)),
        ("top_p", SamplingParams(top_p=0.0)),
        ("top_p", SamplingParams(top_p=1.01)),
        ("min_p", SamplingParams(min_p=-0.01)),
        ("min_p", SamplingParams(min_p=1.5)),
        ("repetition_penalty", SamplingParams(repetition_penalty=0.0)),
    ],
)
def test_validate_names_the_field(field, params):
    with pytest.raises(InvalidArgument) as info:
        params.validate()
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_exponential_race_samples_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    generator = make_generator(seed=7, stream=0)
    draws = torch.stack([draw_exponentials(4, False, generator) for _ in range(40_000)])
    counts = torch.bincount(sample(probs.expand(40_000, 4), draws), minlength=4).float() / 40_000
    torch.testing.assert_close(counts, probs, atol=0.01, rtol=0)


def test_generators_are_reproducible_and_streams_differ():
    a = torch.rand(5, generator=make_generator(3, 1))
    b = torch.rand(5, generator=make_generator(3, 1))
    c = torch.rand(5, generator=make_generator(3, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
