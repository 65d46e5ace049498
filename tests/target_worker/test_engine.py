"""Target engine: cache rollback after rejections, errors, release."""

from __future__ import annotations

import pytest
import torch

from splitspec.codec import encode_tensor
from splitspec.errors import FailedPrecondition, InvalidArgument, NotFound
from splitspec.sampling import SamplingParams
from target_worker.engine import TargetEngine

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [1, 70, 80, 90, 100]


def full_logits(loaded, token_ids):
    with torch.inference_mode():
        return loaded.model(torch.tensor([token_ids])).logits[0].float()


def test_verify_keeps_cache_equal_to_history_minus_pending(tiny):
    engine = TargetEngine(tiny["target"])
    token, n = engine.prefill("s", PROMPT, GREEDY)
    assert n == len(PROMPT) + 1
    proposals = [[5, 6, 7], [token, 9], [3], []]
    for proposal in proposals:
        outcome = engine.verify("s", proposal, None, 0)
        sequence = engine.sequences["s"]
        assert len(sequence.cache) == len(sequence.token_ids) - 1 == outcome.num_tokens - 1
    # the greedy tokens chosen must be the argmax of a fresh full forward pass at each position
    tokens = engine.sequences["s"].token_ids
    expected_next = full_logits(tiny["target"], tokens[:-1]).argmax(-1)
    generated_from = len(PROMPT) - 1
    # every emitted non-draft token is the argmax; accepted drafts are argmax too (greedy)
    assert tokens[generated_from + 1 :] == expected_next[generated_from:].tolist()


def test_greedy_acceptance_is_exact_match(tiny):
    engine = TargetEngine(tiny["target"])
    first, _ = engine.prefill("s", PROMPT, GREEDY)
    argmax = full_logits(tiny["target"], PROMPT + [first])[-1].argmax().item()
    wrong = (argmax + 1) % 259
    outcome = engine.verify("s", [argmax, wrong], None, 0)
    assert outcome.num_accepted == 1 and not outcome.is_bonus
    assert outcome.acceptance_probs == [1.0, 0.0]


def test_sampled_verify_requires_matching_probs(tiny):
    engine = TargetEngine(tiny["target"])
    engine.prefill("s", PROMPT, SamplingParams(temperature=1.0, seed=1))
    with pytest.raises(InvalidArgument, match="^draft_probs: required"):
        engine.verify("s", [4, 5], None, 0)
    with pytest.raises(InvalidArgument, match=r"^draft_probs: shape \[1, 259\]"):
        engine.verify("s", [4, 5], encode_tensor(torch.full((1, 259), 1 / 259)), 0)
    outcome = engine.verify("s", [4, 5], encode_tensor(torch.full((2, 259), 1 / 259)), 0)
    assert 0 <= outcome.num_accepted <= 2


def test_errors_name_the_problem(tiny):
    engine = TargetEngine(tiny["target"])
    with pytest.raises(NotFound):
        engine.verify("missing", [], None, 0)
    engine.prefill("s", PROMPT, GREEDY)
    with pytest.raises(FailedPrecondition, match="expected 3"):
        engine.verify("s", [], None, 3)
    with pytest.raises(InvalidArgument, match="^draft_token_ids: token ids \\[999\\]"):
        engine.verify("s", [999], None, 0)
    with pytest.raises(InvalidArgument, match="^token_ids: must not be empty"):
        engine.prefill("t", [], GREEDY)
    with pytest.raises(InvalidArgument, match="^token_ids: 160 tokens"):
        engine.prefill("t", [5] * 160, GREEDY)
    with pytest.raises(FailedPrecondition, match="already exists"):
        engine.prefill("s", PROMPT, GREEDY)


def test_release_frees_the_sequence(tiny):
    engine = TargetEngine(tiny["target"])
    engine.prefill("s", PROMPT, GREEDY)
    assert engine.release("s") is True
    assert engine.release("s") is False
    assert engine.sequences == {}
