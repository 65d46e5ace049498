"""N-gram prompt lookup: the proposal rule, and the engine's proposals and q."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from draft_worker.engine import ProposeItem
from draft_worker.ngram import NgramEngine, lookup
from splitspec.errors import InvalidArgument
from splitspec.sampling import SamplingParams


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # most recent earlier occurrence first
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_lookup_takes_the_longest_suffix_and_its_most_recent_occurrence():
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [7, 1, 2, 3, 9, 1, 2, 4, 5, 1, 2]
    assert lookup(tokens, 3, 1, 4) == [4, 5, 1]  # "1 2" last occurred at 5..6, followed by 4 5 1
    assert lookup([5, 1, 2, 3, 8, 2, 3, 1, 2, 3], 2, 1, 3) == [8, 2]  # "1 2 3" beats the later "2 3"
    assert lookup([1, 2, 3, 4], 4, 1, 4) == []
    assert lookup([4, 4, 4], 5, 1, 2) == [4]  # the continuation stops at the end of the history
    assert lookup([1, 2, 1, 2], 0, 1, 2) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=30), st.integers(1, 6), st.integers(1, 3), st.integers(0, 2))
def test_lookup_matches_brute_force(tokens, k, min_n, extra):
    assert lookup(tokens, k, min_n, min_n + extra) == brute_force(tokens, k, min_n, min_n + extra)


def _engine(tiny, **kwargs) -> NgramEngine:
    return NgramEngine(tiny["target"], **kwargs)


def test_engine_proposes_from_history_with_one_hot_q_when_sampling(tiny):
    engine = _engine(tiny, min_n=1, max_n=3, max_k=8)
    sampled = engine.start("s", SamplingParams(temperature=1.0, seed=1))
    history = [1, 10, 11, 12, 13, 20, 10, 11]
    item = ProposeItem(sampled, 0, history, 3)
    engine.check(item)
    outcomes, waiting = engine.step([item])
    proposal = outcomes[0]
    assert waiting == [] and proposal.token_ids == [12, 13, 20] and proposal.num_tokens == len(history)
    assert proposal.probs.shape == (3, engine.vocabulary.vocab_size)
    assert proposal.probs.sum(dim=-1).tolist() == [1.0, 1.0, 1.0]
    assert proposal.probs.argmax(dim=-1).tolist() == [12, 13, 20]
    # 2 of 3 accepted, then the recovered token 30: history + 12 13 + 30, no earlier "13 30" or "30"
    nxt = ProposeItem(sampled, 2, [30], 3)
    engine.check(nxt)
    empty = engine.step([nxt])[0][0]
    assert empty.token_ids == [] and empty.probs is None and empty.num_tokens == len(history) + 3
    assert sampled.token_ids == [*history, 12, 13, 30]


def test_engine_greedy_sends_ids_only_and_speculative_requests_get_nothing(tiny):
    engine = _engine(tiny)
    greedy = engine.start("g", SamplingParams(temperature=0.0))
    first = engine.step([ProposeItem(greedy, 0, [1, 5, 6, 5], 2)])[0][0]
    assert first.token_ids == [6, 5] and first.probs is None
    speculative = ProposeItem(greedy, 0, [], 2, speculative=True)
    engine.check(speculative)
    ahead = engine.step([speculative])[0][0]
    assert ahead.token_ids == [] and ahead.branches == []
    assert greedy.token_ids == [1, 5, 6, 5] and greedy.proposal == [6, 5]  # state untouched


def test_engine_checks_requests_like_the_model_draft(tiny):
    engine = _engine(tiny, max_k=4)
    sequence = engine.start("c", SamplingParams(temperature=0.0))
    with pytest.raises(InvalidArgument, match="^k: must be in"):
        engine.check(ProposeItem(sequence, 0, [1, 2], 5))
    with pytest.raises(InvalidArgument, match="^new_token_ids:"):
        engine.check(ProposeItem(sequence, 0, [1, 999], 2))
    with pytest.raises(InvalidArgument, match="^--ngram-min:"):
        NgramEngine(tiny["target"], min_n=3, max_n=2)
    info = engine.info()
    assert info.vocab_size == tiny["target"].vocab_size and info.max_k == 4 and info.model.startswith("ngram[1..4]")
    assert engine.worker_stats(0).running_sequences == 0


def test_one_hot_q_keeps_rejection_sampling_exact():
    """Accepting x with probability p(x) and otherwise resampling from p without x gives p."""
    from splitspec.rejection import rejection_sample

    p = torch.tensor([0.5, 0.3, 0.2])
    rows = 200_000
    generator = torch.Generator().manual_seed(0)
    q = torch.nn.functional.one_hot(torch.tensor([1]), 3).float().expand(rows, 1, 3)
    result = rejection_sample(p.expand(rows, 2, 3), q, torch.ones(rows, 1, dtype=torch.long),
                              torch.rand(rows, 1, generator=generator),
                              torch.empty(rows, 3).exponential_(generator=generator))
    tokens = torch.where(result.num_accepted == 1, torch.ones(rows, dtype=torch.long), result.token_ids)
    frequencies = torch.bincount(tokens, minlength=3).float() / rows
    torch.testing.assert_close(frequencies, p, atol=4e-3, rtol=0)
