"""Target engine: batched steps, rollback, errors, admission, preemption, prefix reuse."""

from __future__ import annotations

import pytest
import torch

from splitspec.codec import encode_tensor
from splitspec.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from splitspec.sampling import SamplingParams
from target_worker.engine import PrefillItem, ReleaseItem, VerifyItem
from tests.support_engines import run_one, target_engine

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [1, 70, 80, 90, 100]


def full_logits(loaded, token_ids):
    with torch.inference_mode():
        return loaded.model(torch.tensor([token_ids])).logits[0].float()


def test_verify_rolls_back_and_keeps_greedy_tokens_exact(tiny):
    engine = target_engine(tiny["target"])
    token = run_one(engine, PrefillItem("s", PROMPT, GREEDY)).token_id
    for proposal in ([5, 6, 7], [token, 9], [3], [], [1, 2, 3, 4, 5, 6]):
        outcome = run_one(engine, VerifyItem("s", proposal))
        table = engine.blocks.tables["s"]
        assert table.num_tokens == len(engine.sequences["s"].token_ids) - 1 == outcome.num_tokens - 1
        assert len(table.block_ids) == engine.blocks.blocks_for(table.num_tokens)  # empty blocks returned
    tokens = engine.sequences["s"].token_ids
    expected_next = full_logits(tiny["target"], tokens[:-1]).argmax(-1)
    assert tokens[len(PROMPT) :] == expected_next[len(PROMPT) - 1 :].tolist()


def test_batched_verification_equals_one_at_a_time(tiny):
    prompts = {f"s{i}": [1] + list(range(10 + i, 10 + i + 3 * i + 2)) for i in range(6)}
    proposals = [[4, 5, 6, 7], [8], [], [9, 9], [1, 2, 3], [7, 7, 7, 7, 7]]
    solo = target_engine(tiny["target"])
    expected = {}
    for (seq_id, prompt), proposal in zip(prompts.items(), proposals):
        run_one(solo, PrefillItem(seq_id, prompt, GREEDY))
        expected[seq_id] = run_one(solo, VerifyItem(seq_id, proposal))
    batched = target_engine(tiny["target"])
    outcomes, _ = batched.step([PrefillItem(s, p, GREEDY) for s, p in prompts.items()])
    assert len(outcomes) == 6 and batched.stats.max_batch_sequences == 6
    outcomes, _ = batched.step([VerifyItem(s, p) for s, p in zip(prompts, proposals)])
    for index, seq_id in enumerate(prompts):
        got, want = outcomes[index], expected[seq_id]
        assert (got.num_accepted, got.token_id, got.is_bonus) == (want.num_accepted, want.token_id, want.is_bonus)
        assert batched.sequences[seq_id].token_ids == solo.sequences[seq_id].token_ids


def test_sampled_verify_requires_matching_probs(tiny):
    engine = target_engine(tiny["target"])
    run_one(engine, PrefillItem("s", PROMPT, SamplingParams(temperature=1.0, seed=1)))
    with pytest.raises(InvalidArgument, match="^draft_probs: required"):
        run_one(engine, VerifyItem("s", [4, 5]))
    with pytest.raises(InvalidArgument, match=r"^draft_probs: shape \[1, 259\]"):
        run_one(engine, VerifyItem("s", [4, 5], encode_tensor(torch.full((1, 259), 1 / 259))))
    outcome = run_one(engine, VerifyItem("s", [4, 5], encode_tensor(torch.full((2, 259), 1 / 259))))
    assert 0 <= outcome.num_accepted <= 2


def test_errors_name_the_problem(tiny):
    engine = target_engine(tiny["target"])
    with pytest.raises(NotFound):
        run_one(engine, VerifyItem("missing", []))
    run_one(engine, PrefillItem("s", PROMPT, GREEDY))
    with pytest.raises(FailedPrecondition, match="expected 3"):
        run_one(engine, VerifyItem("s", [], None, 3))
    with pytest.raises(InvalidArgument, match="^draft_token_ids: token ids \\[999\\]"):
        run_one(engine, VerifyItem("s", [999]))
    with pytest.raises(InvalidArgument, match="^token_ids: must not be empty"):
        engine.check_prefill(PrefillItem("t", [], GREEDY))
    with pytest.raises(InvalidArgument, match="^token_ids: a resume carries"):  # no history: nothing to recompute
        engine.check_prefill(PrefillItem("t", [5], GREEDY, resume=True))
    with pytest.raises(InvalidArgument, match="^token_ids: 160 tokens"):
        engine.check_prefill(PrefillItem("t", [5] * 160, GREEDY))
    with pytest.raises(FailedPrecondition, match="already exists"):
        run_one(engine, PrefillItem("s", PROMPT, GREEDY))


def test_a_request_that_can_never_fit_is_refused_naming_the_limit(tiny):
    engine = target_engine(tiny["target"], num_blocks=8, block_size=4)  # 32 slots
    engine.check_prefill(PrefillItem("ok", PROMPT, GREEDY, max_new_tokens=20, num_lookahead_slots=5))
    with pytest.raises(ResourceExhausted, match="needs 9 KV blocks .* the pool has 8"):
        engine.check_prefill(PrefillItem("big", PROMPT, GREEDY, max_new_tokens=26, num_lookahead_slots=5))


def test_admission_waits_for_blocks_and_release_frees_them(tiny):
    engine = target_engine(tiny["target"], num_blocks=6, block_size=4)
    run_one(engine, PrefillItem("a", [1] + [7] * 14, GREEDY, num_lookahead_slots=5))  # 15 + 5 slots: 5 blocks
    outcomes, waiting = engine.step([PrefillItem("b", [1, 2, 3, 4, 5], GREEDY, num_lookahead_slots=5)])
    assert outcomes == {} and len(waiting) == 1  # not admitted: 3 blocks needed, 2 free
    outcomes, waiting = engine.step([ReleaseItem("a"), waiting[0]])
    assert outcomes[0] is True and outcomes[1].token_id >= 0 and waiting == []
    assert engine.blocks.free("b") and engine.blocks.num_free_blocks == 6


def test_pool_pressure_preempts_the_newest_and_resume_is_exact(tiny):
    engine = target_engine(tiny["target"], num_blocks=7, block_size=4)
    first_a = run_one(engine, PrefillItem("a", [1] + [40] * 10, GREEDY)).token_id  # 11 tokens: 3 blocks
    first_b = run_one(engine, PrefillItem("b", [1] + [50] * 10, GREEDY)).token_id  # 3 blocks, 1 left
    outcomes, _ = engine.step([VerifyItem("a", [3, 4, 5, 6, 7, 8])])  # needs 2 more blocks: b must go
    assert not outcomes[0].preempted and engine.stats.preemptions == 1
    assert "b" not in engine.sequences and "b" in engine.suspended
    assert run_one(engine, VerifyItem("b", [1])).preempted
    history_b = [1] + [50] * 10 + [first_b]
    engine.step([ReleaseItem("a")])
    resumed = run_one(engine, PrefillItem("b", history_b, GREEDY, resume=True))
    assert resumed.token_id == -1 and resumed.num_tokens == len(history_b)
    after = run_one(engine, VerifyItem("b", []))
    assert after.token_id == full_logits(tiny["target"], history_b)[-1].argmax().item()
    assert first_a >= 0


def test_shared_prompt_prefix_is_reused(tiny):
    engine = target_engine(tiny["target"], num_blocks=32, block_size=4)
    system = [1] + list(range(30, 50))  # 21 tokens: 5 full blocks
    a = run_one(engine, PrefillItem("a", system + [60, 61], GREEDY))
    b = run_one(engine, PrefillItem("b", system + [70, 71, 72], GREEDY))
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 20
    assert engine.blocks.tables["a"].block_ids[:5] == engine.blocks.tables["b"].block_ids[:5]
    expected = full_logits(tiny["target"], system + [70, 71, 72])[-1].argmax().item()
    assert b.token_id == expected
    assert engine.blocks.stats().prefix_hit_rate == pytest.approx(5 / 10)


def test_release_frees_everything(tiny):
    engine = target_engine(tiny["target"])
    run_one(engine, PrefillItem("s", PROMPT, GREEDY))
    assert run_one(engine, ReleaseItem("s")) is True
    assert run_one(engine, ReleaseItem("s")) is False
    assert engine.sequences == {} and engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_stats_time_the_steps_and_their_forward_passes(tiny):
    from splitspec.paged.stats import worker_stats

    engine = target_engine(tiny["target"])
    forwards = []
    forward = engine.runner.forward
    engine.runner.forward = lambda chunks: forwards.append(len(chunks)) or forward(chunks)
    run_one(engine, PrefillItem("s", PROMPT, GREEDY))
    for proposal in ([5, 6], [], [7]):
        run_one(engine, VerifyItem("s", proposal))
    run_one(engine, ReleaseItem("s"))  # a step with no forward pass
    stats = engine.stats
    assert len(forwards) == stats.steps == 4
    assert 0 < stats.forward_seconds < stats.step_seconds
    reply = worker_stats(engine.blocks, stats, 0, 0)
    assert reply.step_seconds == pytest.approx(stats.step_seconds) and reply.forward_seconds == pytest.approx(stats.forward_seconds)


def test_steps_the_drafts_work_beside_keep_to_the_targets_own_cores(tiny):
    """A step that verifies a proposal leaves the drafts their cores; steps of target-only rounds
    and prefills take every core (the core plan is told which, step by step)."""
    told = []

    class Plan:
        def use(self, drafts_busy: bool) -> None:
            told.append(drafts_busy)

    engine = target_engine(tiny["target"])
    engine.cores = Plan()
    engine.step([PrefillItem("a", PROMPT, GREEDY), PrefillItem("b", PROMPT[:3], GREEDY)])
    engine.step([VerifyItem("a", []), VerifyItem("b", [])])
    engine.step([VerifyItem("a", [5, 6]), VerifyItem("b", [])])
    engine.step([VerifyItem("a", []), PrefillItem("c", PROMPT, GREEDY)])
    engine.step([ReleaseItem("c")])  # no forward pass: no plan
    assert told == [False, False, True, False]
