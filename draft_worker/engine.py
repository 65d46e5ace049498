"""Drafting for one sequence: roll back to the accepted prefix, absorb new tokens, propose k.

After a proposal d_1..d_k the cache holds history + d_1..d_{k-1} (d_k was sampled, never fed).
The next request says how many were accepted (a) and which tokens follow (the recovered or bonus
token): the cache is cut to history + d_1..d_a and the first forward of the next proposal feeds
whatever is not cached yet, d_k included when all were accepted. So the bonus token costs no
extra round trip and no extra forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitspec.errors import InvalidArgument
from splitspec.kv_cache import SequenceKVCache
from splitspec.models import LoadedModel
from splitspec.sampling import (
    SamplingParams,
    draw_exponentials,
    make_generator,
    process_logits,
    sample,
    penalty_context,
)

DRAFT_STREAM = 2


@dataclass(slots=True)
class DraftSequence:
    seq_id: str
    params: SamplingParams
    generator: torch.Generator
    cache: SequenceKVCache
    token_ids: list[int] = field(default_factory=list)
    proposal: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Proposal:
    token_ids: list[int]
    probs: torch.Tensor | None  # q: [k, vocab] float32; None for greedy (one-hot at token_ids)
    num_tokens: int


@dataclass(slots=True)
class DraftEngine:
    loaded: LoadedModel
    max_k: int = 16

    def start(self, seq_id: str, params: SamplingParams) -> DraftSequence:
        if not seq_id:
            raise InvalidArgument("seq_id", "the first message of a stream must name the sequence")
        params.validate()
        return DraftSequence(
            seq_id, params, make_generator(params.seed, DRAFT_STREAM), SequenceKVCache(self.loaded.model)
        )

    def max_proposal(self, num_tokens: int) -> int:
        """Largest k this draft can propose after `num_tokens` tokens without passing its context."""
        return max(0, min(self.max_k, self.loaded.max_model_len + 1 - num_tokens))

    def propose(self, sequence: DraftSequence, num_accepted: int, new_token_ids: list[int], k: int) -> Proposal:
        vocab = self.loaded.vocab_size
        if not 0 <= num_accepted <= len(sequence.proposal):
            raise InvalidArgument(
                "num_accepted", f"must be in [0, {len(sequence.proposal)}] (the last proposal's length), got {num_accepted}"
            )
        if not new_token_ids:
            raise InvalidArgument("new_token_ids", "must hold at least the token that follows the accepted prefix")
        bad = [t for t in new_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument("new_token_ids", f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        history_len = len(sequence.token_ids)
        limit = self.max_proposal(history_len + num_accepted + len(new_token_ids))
        if not 1 <= k <= limit:
            raise InvalidArgument(
                "k", f"must be in [1, {limit}] here (--max-k {self.max_k}, draft context {self.loaded.max_model_len}), got {k}"
            )
        sequence.token_ids.extend([*sequence.proposal[:num_accepted], *new_token_ids])
        sequence.cache.truncate(history_len + num_accepted)
        sequence.proposal = []
        return self._draft(sequence, k)

    def _draft(self, sequence: DraftSequence, k: int) -> Proposal:
        params, vocab = sequence.params, self.loaded.vocab_size
        seen = penalty_context(params, sequence.token_ids, [], vocab)
        feed = sequence.token_ids[len(sequence.cache) :]
        drafted: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(k):
            logits = sequence.cache.extend(feed, logits_to_keep=1)
            q = process_logits(logits, params, seen)
            token = int(sample(q[0], draw_exponentials(vocab, params.greedy, sequence.generator)))
            drafted.append(token)
            rows.append(q[0])
            if seen is not None:
                seen[:, token] = True
            feed = [token]
        sequence.proposal = drafted
        probs = None if params.greedy else torch.stack(rows)
        return Proposal(drafted, probs, len(sequence.token_ids))
