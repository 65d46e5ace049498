from __future__ import annotations

import pytest

from coordinator.request import DEFAULT_MAX_TOKENS, Limits, validate_request
from splitspec.errors import InvalidArgument
from splitspec.v1 import coordinator_pb2

LIMITS = Limits(max_model_len=64, vocab_size=259, default_k=3, max_k=6)
R = coordinator_pb2.GenerateRequest


def test_defaults(tiny):
    request = validate_request(R(prompt="hi"), tiny["target"].tokenizer, LIMITS)
    assert request.prompt_token_ids[0] == 1  # BOS added
    assert request.max_tokens == DEFAULT_MAX_TOKENS and request.k == 3
    assert request.params.temperature == 1.0 and request.params.top_p == 1.0
    other = validate_request(R(prompt="hi"), tiny["target"].tokenizer, LIMITS)
    assert request.params.seed != other.params.seed  # unseeded requests get fresh random seeds


def test_default_max_tokens_is_clamped_to_the_context(tiny):
    request = validate_request(R(prompt="x" * 55), tiny["target"].tokenizer, LIMITS)
    assert request.max_tokens == 64 - 56


def test_token_ids_take_precedence_and_zero_values_are_honoured(tiny):
    request = validate_request(R(prompt="ignored", prompt_token_ids=[1, 9], temperature=0.0, k=0, seed=0),
                               tiny["target"].tokenizer, LIMITS)
    assert request.prompt_token_ids == [1, 9]
    assert request.params.greedy and request.k == 0 and request.params.seed == 0


def test_error_names_field(tiny):
    with pytest.raises(InvalidArgument, match="^k: must be in \\[0, 6\\]"):
        validate_request(R(prompt="hi", k=7), tiny["target"].tokenizer, LIMITS)


def test_draft_confidence_defaults_to_the_coordinators_and_is_checked(tiny):
    tokenizer = tiny["target"].tokenizer
    assert validate_request(R(prompt="hi"), tokenizer, LIMITS).draft_confidence == 0.0
    limits = Limits(max_model_len=64, vocab_size=259, default_k=3, max_k=6, default_draft_confidence=0.4)
    assert validate_request(R(prompt="hi"), tokenizer, limits).draft_confidence == pytest.approx(0.4)
    assert validate_request(R(prompt="hi", draft_confidence=0.0), tokenizer, limits).draft_confidence == 0.0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidArgument, match="^draft_confidence: must be in \\[0, 1\\]"):
            validate_request(R(prompt="hi", draft_confidence=bad), tokenizer, LIMITS)

