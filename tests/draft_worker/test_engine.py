"""Draft engine: rollback to the accepted prefix and bonus absorption leave the cache exact."""

from __future__ import annotations

import pytest
import torch

from draft_worker.engine import DraftEngine
from splitspec.errors import InvalidArgument
from splitspec.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
HISTORY = [1, 40, 50, 60]


def fresh_proposal(engine: DraftEngine, history: list[int], k: int) -> list[int]:
    sequence = engine.start("fresh", GREEDY)
    return engine.propose(sequence, 0, history, k).token_ids


@pytest.mark.parametrize("num_accepted", [0, 1, 2, 3])
def test_after_rollback_proposals_equal_a_fresh_drafts(tiny, num_accepted):
    engine = DraftEngine(tiny["draft_noisy"])
    sequence = engine.start("s", GREEDY)
    first = engine.propose(sequence, 0, HISTORY, 3)
    assert len(first.token_ids) == 3 and first.probs is None
    follow = 77  # the target's recovered (or, when all 3 were accepted, bonus) token
    second = engine.propose(sequence, num_accepted, [follow], 4)
    history = HISTORY + first.token_ids[:num_accepted] + [follow]
    assert sequence.token_ids == history
    assert second.token_ids == fresh_proposal(engine, history, 4)


def test_sampled_proposals_carry_the_distributions_they_came_from(tiny):
    engine = DraftEngine(tiny["draft_noisy"])
    sequence = engine.start("s", SamplingParams(temperature=0.9, top_k=20, seed=3))
    proposal = engine.propose(sequence, 0, HISTORY, 4)
    assert proposal.probs.shape == (4, 259)
    torch.testing.assert_close(proposal.probs.sum(-1), torch.ones(4))
    for token, row in zip(proposal.token_ids, proposal.probs):
        assert row[token] > 0
        assert int((row > 0).sum()) <= 20


def test_same_seed_same_proposal(tiny):
    engine = DraftEngine(tiny["draft_noisy"])
    params = SamplingParams(temperature=1.0, seed=11)
    a = engine.propose(engine.start("a", params), 0, HISTORY, 6).token_ids
    b = engine.propose(engine.start("b", params), 0, HISTORY, 6).token_ids
    c = engine.propose(engine.start("c", SamplingParams(temperature=1.0, seed=12)), 0, HISTORY, 6).token_ids
    assert a == b and a != c


def test_protocol_errors_name_the_field(tiny):
    engine = DraftEngine(tiny["draft_short"], max_k=8)
    sequence = engine.start("s", GREEDY)
    with pytest.raises(InvalidArgument, match="^k: must be in \\[1, 8\\]"):
        engine.propose(sequence, 0, HISTORY, 9)
    engine.propose(sequence, 0, HISTORY, 2)
    with pytest.raises(InvalidArgument, match="^num_accepted: must be in \\[0, 2\\]"):
        engine.propose(sequence, 3, [5], 2)
    with pytest.raises(InvalidArgument, match="^new_token_ids: must hold"):
        engine.propose(sequence, 1, [], 2)
    with pytest.raises(InvalidArgument, match="^k: must be in \\[1, 1\\].*draft context 40"):
        engine.propose(sequence, 0, [5] * 36, 2)  # 4 + 36 = 40 tokens: room for 1
    with pytest.raises(InvalidArgument, match="^seq_id"):
        engine.start("", GREEDY)
