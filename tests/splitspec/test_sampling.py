"""process_logits must equal Hugging Face's processors/warpers applied in generate's order."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from splitspec.errors import InvalidArgument
from splitspec.sampling import (
    SamplingParams,
    draw_exponentials,
    logits_context,
    make_generator,
    process_logits,
    sample,
)

VOCAB = 40


def openai_penalties(scores: torch.Tensor, output: list[int], params: SamplingParams) -> torch.Tensor:
    """OpenAI's documented formula: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty."""
    counts = torch.zeros(scores.shape[-1])
    for token in output:
        counts[token] += 1
    return scores - counts * params.frequency_penalty - (counts > 0).float() * params.presence_penalty


def hf_probs(logits: torch.Tensor, history: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The reference, in the documented order: bias, penalties, min-tokens mask, warpers."""
    scores = logits.clone()
    if params.logit_bias:
        scores = SequenceBiasLogitsProcessor({(t,): b for t, b in params.logit_bias})(history, scores)
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(history, scores)
    scores = openai_penalties(scores, history[0, params.num_prompt_tokens:].tolist(), params)
    if params.min_tokens:
        scores = MinNewTokensLengthLogitsProcessor(params.num_prompt_tokens, params.min_tokens,
                                                   list(params.min_tokens_banned))(history, scores)
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
    presence_penalty=st.floats(-2.0, 2.0),
    frequency_penalty=st.floats(-2.0, 2.0),
    logit_bias=st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=4),
    min_tokens=st.integers(0, 6),
    num_prompt_tokens=st.integers(0, 7),
)
def test_matches_hugging_face_processors(seed, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                                         frequency_penalty, logit_bias, min_tokens, num_prompt_tokens):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, VOCAB, generator=generator) * 3
    history = torch.randint(0, VOCAB, (1, 7), generator=generator)
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, logit_bias=tuple(sorted(logit_bias.items())),
                            min_tokens=min_tokens, min_tokens_banned=(0, 3), num_prompt_tokens=num_prompt_tokens)
    ours = process_logits(logits, params, logits_context(params.validate(VOCAB), history[0].tolist(), [], VOCAB))
    theirs = hf_probs(logits, history, params)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_greedy_is_one_hot_at_penalized_argmax():
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    probs = process_logits(logits, params, logits_context(params, [1], [], 4))
    assert probs.tolist() == [[0.0, 0.0, 1.0, 0.0]]  # 3.0 / 1.5 = 2.0 < 2.9


@pytest.mark.parametrize("params,expected", [
    (SamplingParams(temperature=0.0, presence_penalty=1.5), 2),       # 3.0 - 1.5 < 2.9
    (SamplingParams(temperature=0.0, frequency_penalty=0.05), 1),     # 3.0 - 2 * 0.05 > 2.9
    (SamplingParams(temperature=0.0, frequency_penalty=0.1), 2),      # 3.0 - 2 * 0.1 < 2.9
    (SamplingParams(temperature=0.0, logit_bias=((0, 2.5),)), 0),     # 1.0 + 2.5 > 3.0
    (SamplingParams(temperature=0.0, min_tokens=4, min_tokens_banned=(1,), num_prompt_tokens=1), 2),
    (SamplingParams(temperature=0.0, min_tokens=2, min_tokens_banned=(1,), num_prompt_tokens=1), 1),
])
def test_greedy_follows_each_penalty_and_bias(params, expected):
    """History [3, 1, 1]: a one-token prompt, then token 1 twice in the output."""
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    probs = process_logits(logits, params, logits_context(params, [3, 1, 1], [], 4))
    assert int(probs.argmax()) == expected and float(probs.max()) == 1.0


def test_context_rows_include_earlier_proposal_tokens():
    params = SamplingParams(repetition_penalty=1.1, frequency_penalty=0.5, num_prompt_tokens=1)
    context = logits_context(params, [0, 4], [2, 4], 5)
    assert context.seen.tolist() == [
        [True, False, False, False, True],
        [True, False, True, False, True],
        [True, False, True, False, True],
    ]
    assert context.output_counts.tolist() == [[0, 0, 0, 0, 1], [0, 0, 1, 0, 1], [0, 0, 1, 0, 2]]
    assert context.num_output.tolist() == [1, 2, 3]
    context.append(3)
    assert context.num_output.tolist() == [2, 3, 4] and context.output_counts[:, 3].tolist() == [1, 1, 1]
    assert logits_context(SamplingParams(logit_bias=((1, 5.0),)), [0], [], 5) is None  # needs no context


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
        ("presence_penalty", SamplingParams(presence_penalty=2.01)),
        ("presence_penalty", SamplingParams(presence_penalty=math.nan)),
        ("frequency_penalty", SamplingParams(frequency_penalty=-2.5)),
        ("logit_bias.3", SamplingParams(logit_bias=((3, 100.5),))),
        ("logit_bias", SamplingParams(logit_bias=((40, 1.0),))),
        ("min_tokens", SamplingParams(min_tokens=-1)),
        ("min_tokens_banned", SamplingParams(min_tokens=1, min_tokens_banned=(40,))),
        ("min_tokens_banned", SamplingParams(min_tokens=1, min_tokens_banned=tuple(range(VOCAB)))),
    ],
)
def test_validate_names_the_field(field, params):
    with pytest.raises(InvalidArgument) as info:
        params.validate(VOCAB)
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


# --- the numeric edge: extreme settings give a distribution, and a token from it -------------
EXTREME_TEMPERATURES = [1e-45, 1e-30, 1e-6, 0.5, 1.0, 1e6, 1e30, 3.4e38]


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4, 1e30]),
    temperature=st.sampled_from(EXTREME_TEMPERATURES),
    top_k=st.sampled_from([0, 1, VOCAB - 1, VOCAB, VOCAB + 1, 2**31 - 1]),
    top_p=st.sampled_from([1e-7, 1e-3, 0.5, math.nextafter(1.0, 0.0), 1.0]),
    min_p=st.sampled_from([0.0, 1e-7, 0.5, 1.0]),
    repetition_penalty=st.sampled_from([1e-30, 1e-6, 1.0, 2.0, 1e6, 3.4e38]),
    penalties=st.sampled_from([(0.0, 0.0), (2.0, 2.0), (-2.0, -2.0), (2.0, -2.0)]),
    logit_bias=st.sampled_from([(), ((0, 100.0),), ((0, -100.0), (1, 100.0))]),
    min_tokens=st.sampled_from([0, 1, 1000]),
)
def test_extreme_settings_give_a_distribution_and_a_valid_token(seed, scale, temperature, top_k, top_p, min_p,
                                                                 repetition_penalty, penalties, logit_bias,
                                                                 min_tokens):
    """Temperatures from subnormal to float32's max, top-p and min-p at their bounds, penalties at
    their limits (every token seen): p is finite, sums to 1, and the draw is a token p allows; the
    rejection sampler, given that p and a valid q, returns no NaN."""
    from splitspec.rejection import rejection_sample

    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, VOCAB, generator=generator) * scale
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty=penalties[0],
                            frequency_penalty=penalties[1], logit_bias=logit_bias, min_tokens=min_tokens,
                            min_tokens_banned=tuple(range(VOCAB - 1)), num_prompt_tokens=VOCAB // 2).validate(VOCAB)
    everything = list(range(VOCAB)) * 3  # every token seen, half of them in the output
    probs = process_logits(logits, params, logits_context(params, everything, [0, 1], VOCAB))
    assert bool(torch.isfinite(probs).all()) and bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    tokens = sample(probs, torch.stack([draw_exponentials(VOCAB, False, generator) for _ in range(3)]))
    assert bool((probs.gather(-1, tokens.unsqueeze(-1)) > 0).all())

    q = torch.softmax(torch.randn(1, 2, VOCAB, generator=generator), dim=-1)
    proposal = torch.multinomial(q[0], 1, generator=generator).T
    result = rejection_sample(probs.unsqueeze(0), q, proposal, torch.rand(1, 2, generator=generator),
                              draw_exponentials(VOCAB, False, generator).unsqueeze(0))
    assert not bool(torch.isnan(result.acceptance_probs).any())
    assert 0 <= int(result.token_ids[0]) < VOCAB and int(result.num_accepted[0]) <= 2
    final = probs[int(result.num_accepted[0])]
    if bool(result.is_bonus[0]):
        assert float(final[result.token_ids[0]]) > 0


@pytest.mark.parametrize("temperature", [1e-45, 1e-38])
def test_a_temperature_near_zero_is_the_greedy_limit(temperature):
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    assert process_logits(logits, SamplingParams(temperature=temperature)).tolist() == [[0.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_an_all_masked_row_is_a_clear_error_not_nan(temperature):
    logits = torch.tensor([[0.5, 1.0], [-math.inf, -math.inf]])
    with pytest.raises(InvalidArgument) as info:
        process_logits(logits, SamplingParams(temperature=temperature))
    assert info.value.field == "logits"


def test_a_huge_penalty_on_every_token_keeps_a_distribution():
    logits = torch.tensor([[-2.0, -1.0, -3.0]])
    params = SamplingParams(temperature=1.0, repetition_penalty=3.4e38)
    probs = process_logits(logits, params, logits_context(params, [0, 1, 2], [], 3))
    assert bool(torch.isfinite(probs).all()) and abs(float(probs.sum()) - 1) < 1e-6
