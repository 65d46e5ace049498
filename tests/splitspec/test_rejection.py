"""The rejection sampler's output is distributed as the target (in the style of vLLM's
test_rejection_sampling_approximates_target_distribution), and greedy acceptance is exact match."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from splitspec.rejection import rejection_sample

VOCAB = 8
ROWS = 200_000
# Fixed seeds make this deterministic; p < 1e-3 would mean a real bias. A sampler that skips the
# residual (resampling from p after a rejection) fails this by many orders of magnitude: see
# test_skipping_the_residual_is_detected.
ALPHA = 1e-3


def chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=VOCAB).double().numpy()
    expected = (probs.double() / probs.double().sum()).numpy() * len(tokens)
    return float(chisquare(observed, expected).pvalue)


def run(k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    p = torch.rand(k + 1, VOCAB, generator=generator) ** 3  # peaked, so p and q differ a lot
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(k, VOCAB, generator=generator) ** 3
    q = q / q.sum(-1, keepdim=True)
    proposal = torch.stack([torch.multinomial(q[i], ROWS, replacement=True, generator=generator) for i in range(k)], 1)
    result = rejection_sample(
        target_probs=p.expand(ROWS, k + 1, VOCAB),
        draft_probs=q.expand(ROWS, k, VOCAB),
        draft_token_ids=proposal,
        uniforms=torch.rand(ROWS, k, generator=generator),
        exponentials=torch.empty(ROWS, VOCAB).exponential_(generator=generator),
    )
    return p, q, proposal, result


def emitted_at(position: int, proposal: torch.Tensor, result) -> torch.Tensor:
    """Tokens emitted at `position` by rows that reached it."""
    final_here = result.num_accepted == position
    if position == proposal.shape[1]:
        return result.token_ids[final_here]
    accepted_here = result.num_accepted > position
    return torch.cat([proposal[accepted_here, position], result.token_ids[final_here]])


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_position_follows_the_target(k, seed):
    p, _, proposal, result = run(k, seed)
    for position in range(k + 1):
        tokens = emitted_at(position, proposal, result)
        assert chi2_pvalue(tokens, p[position]) > ALPHA, f"position {position}"


def test_skipping_the_residual_is_detected():
    """Power check: resampling from p (not max(0, p - q)) after a rejection is caught."""
    p, q, proposal, result = run(1, 0)
    wrong = result.token_ids.clone()
    rejected = result.num_accepted == 0
    wrong[rejected] = torch.multinomial(p[0], int(rejected.sum()), replacement=True)
    tokens = torch.cat([proposal[~rejected, 0], wrong[rejected]])
    assert chi2_pvalue(tokens, p[0]) < 1e-12


def test_acceptance_rate_is_sum_of_min_p_q():
    p, q, _, result = run(1, 3)
    expected = torch.minimum(p[0], q[0]).sum()
    observed = (result.num_accepted >= 1).float().mean()
    assert abs(float(observed - expected)) < 4 * (0.25 / ROWS) ** 0.5


def test_greedy_accepts_exact_matches_then_corrects():
    one_hot = torch.nn.functional.one_hot
    target_argmax = torch.tensor([3, 5, 1, 6])
    proposal = torch.tensor([[3, 5, 2]])
    result = rejection_sample(
        target_probs=one_hot(target_argmax, VOCAB).float().unsqueeze(0),
        draft_probs=one_hot(proposal[0], VOCAB).float().unsqueeze(0),
        draft_token_ids=proposal,
        uniforms=torch.zeros(1, 3),
        exponentials=torch.ones(1, VOCAB),
    )
    assert result.num_accepted.tolist() == [2]
    assert result.token_ids.tolist() == [1]
    assert result.is_bonus.tolist() == [False]


def test_all_accepted_gives_bonus_from_last_position():
    one_hot = torch.nn.functional.one_hot
    result = rejection_sample(
        target_probs=one_hot(torch.tensor([4, 7]), VOCAB).float().unsqueeze(0),
        draft_probs=one_hot(torch.tensor([4]), VOCAB).float().unsqueeze(0),
        draft_token_ids=torch.tensor([[4]]),
        uniforms=torch.zeros(1, 1),
        exponentials=torch.ones(1, VOCAB),
    )
    assert (result.num_accepted.item(), result.token_ids.item(), result.is_bonus.item()) == (1, 7, True)


def test_zero_draft_tokens_samples_the_target():
    p = torch.tensor([[[0.0, 1.0] + [0.0] * (VOCAB - 2)]])
    result = rejection_sample(p, torch.zeros(1, 0, VOCAB), torch.zeros(1, 0, dtype=torch.long),
                              torch.zeros(1, 0), torch.ones(1, VOCAB))
    assert (result.num_accepted.item(), result.token_ids.item(), result.is_bonus.item()) == (0, 1, True)


def test_rows_with_shorter_proposals_get_their_bonus_at_their_own_length():
    one_hot = torch.nn.functional.one_hot
    target = one_hot(torch.tensor([[4, 6, 1], [4, 6, 1]]), VOCAB).float()
    draft = one_hot(torch.tensor([[4, 6], [4, 0]]), VOCAB).float()
    result = rejection_sample(target, draft, torch.tensor([[4, 6], [4, 0]]), torch.zeros(2, 2),
                              torch.ones(2, VOCAB), num_draft_tokens=torch.tensor([2, 1]))
    assert result.num_accepted.tolist() == [2, 1]
    assert result.token_ids.tolist() == [1, 6]  # row 1: bonus from its position 1, the padding is ignored
    assert result.is_bonus.tolist() == [True, True]
