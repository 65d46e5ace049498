"""Lossless speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

Accept draft token x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection sample
the recovered token from normalize(max(0, p_i - q_i)); if all k are accepted, sample the bonus
token from p_{k+1}. The output is distributed exactly as sampling from p alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitspec.sampling import sample


@dataclass(slots=True)
class RejectionResult:
    num_accepted: torch.Tensor      # [batch] long
    token_ids: torch.Tensor         # [batch] long: recovered or bonus token
    is_bonus: torch.Tensor          # [batch] bool
    acceptance_probs: torch.Tensor  # [batch, k] float32: min(1, p(x)/q(x)) per position


def rejection_sample(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    uniforms: torch.Tensor,
    exponentials: torch.Tensor,
    num_draft_tokens: torch.Tensor | None = None,
) -> RejectionResult:
    """Accept a prefix of each proposal and sample the one token that follows it.

    target_probs:    [batch, k + 1, vocab]  processed p at each proposed position plus the bonus position
    draft_probs:     [batch, k, vocab]      processed q the draft sampled each token from
    draft_token_ids: [batch, k]             the proposal
    uniforms:        [batch, k]             U[0, 1) acceptance draws
    exponentials:    [batch, vocab]         Exp(1) noise for the final draw (ones = argmax)
    num_draft_tokens: [batch]               real proposal length of each row (rows are padded to k);
                                            default k for every row
    """
    batch, k = draft_token_ids.shape
    rows = torch.arange(batch)
    num_draft = torch.full((batch,), k, dtype=torch.long) if num_draft_tokens is None else num_draft_tokens.long()
    if k:
        index = draft_token_ids.long().unsqueeze(-1)
        p_x = target_probs[:, :k].gather(-1, index).squeeze(-1)
        q_x = draft_probs.gather(-1, index).squeeze(-1)
        in_proposal = torch.arange(k).unsqueeze(0) < num_draft.unsqueeze(1)
        accepted = (uniforms * q_x < p_x) & in_proposal
        num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)
        acceptance_probs = torch.where(q_x > 0, p_x / q_x, torch.ones_like(p_x)).clamp(max=1.0) * in_proposal
    else:
        num_accepted = torch.zeros(batch, dtype=torch.long)
        acceptance_probs = torch.zeros(batch, 0)
    is_bonus = num_accepted == num_draft
    p_next = target_probs[rows, num_accepted]
    if k:
        q_next = draft_probs[rows, num_accepted.clamp(max=k - 1)]
        residual = (p_next - q_next).clamp(min=0.0)
        mass = residual.sum(dim=-1, keepdim=True)
        # mass == 0 only when p == q at that position, where a rejection cannot occur.
        recovered = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_next)
        final = torch.where(is_bonus.unsqueeze(-1), p_next, recovered)
    else:
        final = p_next
    return RejectionResult(
        num_accepted=num_accepted,
        token_ids=sample(final, exponentials),
        is_bonus=is_bonus,
        acceptance_probs=acceptance_probs,
    )
