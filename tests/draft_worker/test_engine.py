"""Draft engine: rollback to the accepted prefix and bonus absorption leave the cache exact;
proposals batched across sequences equal proposals made one at a time."""

from __future__ import annotations

import pytest
import torch

from draft_worker.engine import CloseItem, ProposeItem
from splitspec.errors import InvalidArgument
from splitspec.sampling import SamplingParams
from tests.support_engines import draft_engine, run_one

GREEDY = SamplingParams(temperature=0.0)
HISTORY = [1, 40, 50, 60]


def propose(engine, sequence, num_accepted, new, k):
    item = ProposeItem(sequence, num_accepted, new, k)
    engine.check(item)
    return run_one(engine, item)


def fresh_proposal(engine, history, k):
    seq_id = f"fresh{len(engine.blocks.tables)}"
    return propose(engine, engine.start(seq_id, GREEDY), 0, history, k).token_ids


@pytest.mark.parametrize("num_accepted", [0, 1, 2, 3])
def test_after_rollback_proposals_equal_a_fresh_drafts(tiny, num_accepted):
    engine = draft_engine(tiny["draft_noisy"])
    sequence = engine.start("s", GREEDY)
    first = propose(engine, sequence, 0, HISTORY, 3)
    assert len(first.token_ids) == 3 and first.probs is None
    follow = 77  # the target's recovered (or, when all 3 were accepted, bonus) token
    second = propose(engine, sequence, num_accepted, [follow], 4)
    history = HISTORY + first.token_ids[:num_accepted] + [follow]
    assert sequence.token_ids == history
    assert engine.blocks.tables["s"].num_tokens == len(history) + 4 - 1
    assert second.token_ids == fresh_proposal(engine, history, 4)


def test_batched_proposals_equal_one_at_a_time(tiny):
    histories = [[1] + list(range(20, 20 + n)) for n in (2, 9, 5, 14)]
    ks = [1, 4, 2, 6]
    solo = draft_engine(tiny["draft_noisy"])
    expected = [fresh_proposal(solo, h, k) for h, k in zip(histories, ks)]
    batched = draft_engine(tiny["draft_noisy"])
    items = [ProposeItem(batched.start(f"s{i}", GREEDY), 0, h, k) for i, (h, k) in enumerate(zip(histories, ks))]
    outcomes, _ = batched.step(items)
    assert [outcomes[i].token_ids for i in range(4)] == expected
    assert batched.stats.steps == max(ks) and batched.stats.max_batch_sequences == 4


def test_sampled_proposals_carry_the_distributions_they_came_from(tiny):
    engine = draft_engine(tiny["draft_noisy"])
    proposal = propose(engine, engine.start("s", SamplingParams(temperature=0.9, top_k=20, seed=3)), 0, HISTORY, 4)
    assert proposal.probs.shape == (4, 259)
    torch.testing.assert_close(proposal.probs.sum(-1), torch.ones(4))
    for token, row in zip(proposal.token_ids, proposal.probs):
        assert row[token] > 0 and int((row > 0).sum()) <= 20


def test_same_seed_same_proposal(tiny):
    engine = draft_engine(tiny["draft_noisy"])
    params = SamplingParams(temperature=1.0, seed=11)
    a = propose(engine, engine.start("a", params), 0, HISTORY, 6).token_ids
    b = propose(engine, engine.start("b", params), 0, HISTORY, 6).token_ids
    c = propose(engine, engine.start("c", SamplingParams(temperature=1.0, seed=12)), 0, HISTORY, 6).token_ids
    assert a == b and a != c


def test_close_frees_the_blocks(tiny):
    engine = draft_engine(tiny["draft_noisy"])
    sequence = engine.start("s", GREEDY)
    propose(engine, sequence, 0, HISTORY, 5)
    assert engine.blocks.num_free_blocks < engine.blocks.num_blocks
    assert run_one(engine, CloseItem(sequence)) is True
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_protocol_errors_name_the_field(tiny):
    engine = draft_engine(tiny["draft_short"], max_k=8)
    sequence = engine.start("s", GREEDY)
    with pytest.raises(InvalidArgument, match="^k: must be in \\[1, 8\\]"):
        propose(engine, sequence, 0, HISTORY, 9)
    propose(engine, sequence, 0, HISTORY, 2)
    with pytest.raises(InvalidArgument, match="^num_accepted: must be in \\[0, 2\\]"):
        propose(engine, sequence, 3, [5], 2)
    with pytest.raises(InvalidArgument, match="^new_token_ids: must hold"):
        propose(engine, sequence, 1, [], 2)
    with pytest.raises(InvalidArgument, match="^k: must be in \\[1, 1\\].*draft context 40"):
        propose(engine, sequence, 0, [5] * 36, 2)  # 4 + 36 = 40 tokens: room for 1
    with pytest.raises(InvalidArgument, match="^seq_id"):
        engine.start("", GREEDY)


def speculate(engine, sequence, k, width):
    item = ProposeItem(sequence, 0, [], k, speculative=True, branch_width=width)
    engine.check(item)
    return run_one(engine, item)


def test_speculation_drafts_one_branch_per_likely_verdict(tiny):
    engine = draft_engine(tiny["draft_noisy"])
    sequence = engine.start("s", GREEDY)
    first = propose(engine, sequence, 0, HISTORY, 3).token_ids
    ahead = speculate(engine, sequence, 3, 2)
    assert ahead.token_ids == [] and sequence.token_ids == HISTORY and sequence.proposal == first
    verdicts = [(b.num_accepted, b.token_id) for b in ahead.branches]
    assert sorted(a for a, _ in verdicts) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(token != first[a] for a, token in verdicts if a < 3)  # the target rejected d_(a+1)
    with torch.inference_mode():
        bonus_logits = tiny["draft_noisy"].model(torch.tensor([HISTORY + first])).logits[0, -1]
    assert [t for a, t in verdicts if a == 3] == bonus_logits.topk(2).indices.tolist()
    for branch in ahead.branches:
        history = HISTORY + first[: branch.num_accepted] + [branch.token_id]
        assert branch.proposal.num_tokens == len(history)
        assert branch.proposal.token_ids == fresh_proposal(engine, history, 3)
    assert len(engine.blocks.tables) == 1 + 8 + 8  # the sequence, its branches, the fresh drafts


@pytest.mark.parametrize("held", [None, 0, -1], ids=["none-held", "rejection-branch", "bonus-branch"])
def test_the_next_request_continues_from_the_held_branch_or_from_before(tiny, held):
    engine = draft_engine(tiny["draft_noisy"])
    sequence = engine.start("s", GREEDY)
    first = propose(engine, sequence, 0, HISTORY, 3).token_ids
    branches = speculate(engine, sequence, 3, 2).branches
    if held is None:  # say 1 of `first` was accepted, then token 66 (not a guessed one)
        nxt = ProposeItem(sequence, 1, [66], 2)
        history = HISTORY + first[:1] + [66]
    else:             # the held branch's verdict came true; 2 of its proposal accepted, then 55
        branch = branches[held]
        nxt = ProposeItem(sequence, 2, [55], 2, held_branch=held % len(branches))
        history = HISTORY + first[: branch.num_accepted] + [branch.token_id] + branch.proposal.token_ids[:2] + [55]
    engine.check(nxt)
    after = run_one(engine, nxt)
    assert sequence.token_ids == history and sequence.branches == []
    assert list(engine.blocks.tables) == ["s"]  # every other fork was freed
    assert engine.blocks.tables["s"].num_tokens == len(history) + 2 - 1
    assert after.token_ids == fresh_proposal(engine, history, 2)
    run_one(engine, CloseItem(sequence))
    assert list(engine.blocks.tables) == ["fresh1"]


def test_sampled_branches_carry_their_distributions_and_a_bad_held_branch_is_refused(tiny):
    engine = draft_engine(tiny["draft_noisy"])
    sequence = engine.start("s", SamplingParams(temperature=0.8, top_k=30, seed=5))
    propose(engine, sequence, 0, HISTORY, 2)
    branches = speculate(engine, sequence, 2, 1).branches
    assert len(branches) == 3
    for branch in branches:
        assert branch.proposal.probs.shape == (2, 259)
        assert all(row[t] > 0 for t, row in zip(branch.proposal.token_ids, branch.proposal.probs))
    with pytest.raises(InvalidArgument, match="^held_branch: must index the 3 pending branches, got 3"):
        engine.check(ProposeItem(sequence, 0, [7], 2, held_branch=3))


def draft_confidences(loaded, history, proposal):
    """Dense reference: the draft's softmax probability of each proposed token."""
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([history + proposal])).logits[0].float()
    rows = logits[len(history) - 1 : len(history) - 1 + len(proposal)].softmax(-1)
    return [float(row[token]) for row, token in zip(rows, proposal)]


def test_min_confidence_ends_the_proposal_after_the_first_unlikely_token(tiny):
    loaded = tiny["draft_noisy"]
    engine = draft_engine(loaded)
    full = fresh_proposal(engine, HISTORY, 8)
    confidences = draft_confidences(loaded, HISTORY, full)
    threshold = sorted(confidences[:7])[3] + 1e-6  # some tokens pass, some do not
    stop = next(i for i, c in enumerate(confidences) if c < threshold)
    sequence = engine.start("s", GREEDY)
    item = ProposeItem(sequence, 0, HISTORY, 8, min_confidence=threshold)
    engine.check(item)
    short = run_one(engine, item)
    assert short.token_ids == full[: stop + 1] and len(short.token_ids) < 8
    # the cache holds history + all but the last proposed token, as after a full proposal
    assert engine.blocks.tables["s"].num_tokens == len(HISTORY) + len(short.token_ids) - 1
    after = propose(engine, sequence, len(short.token_ids), [77], 4)  # all accepted, then the bonus
    assert after.token_ids == fresh_proposal(engine, HISTORY + short.token_ids + [77], 4)


def test_min_confidence_applies_per_sequence_in_a_batch(tiny):
    engine = draft_engine(tiny["draft_noisy"])
    expected = fresh_proposal(engine, HISTORY, 5)
    sampled = SamplingParams(temperature=1.0, seed=5)
    items = [ProposeItem(engine.start("one", GREEDY), 0, HISTORY, 5, min_confidence=1.0),
             ProposeItem(engine.start("all", GREEDY), 0, HISTORY, 5),
             ProposeItem(engine.start("q", sampled), 0, HISTORY, 5, min_confidence=1.0)]
    outcomes, _ = engine.step(items)
    assert outcomes[0].token_ids == expected[:1] and outcomes[1].token_ids == expected
    assert len(outcomes[2].token_ids) == 1 and outcomes[2].probs.shape == (1, 259)
    alone = run_one(engine, ProposeItem(engine.start("alone", GREEDY), 0, HISTORY, 5, min_confidence=1.0))
    assert alone.token_ids == expected[:1]  # every sequence stopped: the step ends early
    with pytest.raises(InvalidArgument, match="^min_confidence: must be in \\[0, 1\\]"):
        engine.check(ProposeItem(engine.start("bad", GREEDY), 0, HISTORY, 2, min_confidence=1.5))
