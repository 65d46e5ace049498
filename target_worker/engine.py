"""The target's per-sequence state machine: prefill, verify (accept/resample/bonus), release.

Invariant: a sequence's KV cache holds every token except the last one (the pending token,
which this worker sampled and feeds first in the next verify). All methods run on the worker's
single model thread, so they never race with each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitspec.codec import decode_tensor
from splitspec.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from splitspec.kv_cache import SequenceKVCache
from splitspec.models import LoadedModel
from splitspec.rejection import rejection_sample
from splitspec.sampling import (
    SamplingParams,
    draw_exponentials,
    draw_uniforms,
    make_generator,
    process_logits,
    sample,
    penalty_context,
)
from splitspec.v1 import common_pb2

TARGET_STREAM = 1


@dataclass(slots=True)
class TargetSequence:
    seq_id: str
    token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    cache: SequenceKVCache


@dataclass(slots=True)
class VerifyOutcome:
    num_accepted: int
    token_id: int
    is_bonus: bool
    acceptance_probs: list[float]
    num_tokens: int


@dataclass(slots=True)
class TargetEngine:
    loaded: LoadedModel
    max_num_seqs: int = 256
    sequences: dict[str, TargetSequence] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.loaded.vocab_size

    def _check_token_ids(self, field_name: str, token_ids: list[int]) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgument(field_name, f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")

    def prefill(self, seq_id: str, token_ids: list[int], params: SamplingParams) -> tuple[int, int]:
        """Cache the prompt's KV and sample the first token. Returns (token_id, num_tokens)."""
        if not seq_id:
            raise InvalidArgument("seq_id", "must not be empty")
        if not token_ids:
            raise InvalidArgument("token_ids", "must not be empty")
        if len(token_ids) >= self.loaded.max_model_len:
            raise InvalidArgument(
                "token_ids", f"{len(token_ids)} tokens leave no room in the target's {self.loaded.max_model_len}-token context"
            )
        self._check_token_ids("token_ids", token_ids)
        params.validate()
        if seq_id in self.sequences:
            raise FailedPrecondition(f"sequence {seq_id} already exists on this target")
        if len(self.sequences) >= self.max_num_seqs:
            raise ResourceExhausted(f"target holds --max-num-seqs={self.max_num_seqs} sequences")
        sequence = TargetSequence(
            seq_id, list(token_ids), params, make_generator(params.seed, TARGET_STREAM), SequenceKVCache(self.loaded.model)
        )
        self.sequences[seq_id] = sequence
        try:
            logits = sequence.cache.extend(token_ids, logits_to_keep=1)
            probs = process_logits(logits, params, penalty_context(params, token_ids, [], self.vocab_size))
            token = int(sample(probs[0], draw_exponentials(self.vocab_size, params.greedy, sequence.generator)))
        except BaseException:
            self.release(seq_id)
            raise
        sequence.token_ids.append(token)
        return token, len(sequence.token_ids)

    def verify(
        self,
        seq_id: str,
        draft_token_ids: list[int],
        draft_probs: common_pb2.Tensor | None,
        expected_num_tokens: int = 0,
    ) -> VerifyOutcome:
        """Score pending token + proposal in one forward pass and accept a prefix of the proposal."""
        sequence = self.sequences.get(seq_id)
        if sequence is None:
            raise NotFound(f"sequence {seq_id} is not on this target (never prefilled, released, or lost)")
        if expected_num_tokens and expected_num_tokens != len(sequence.token_ids):
            raise FailedPrecondition(
                f"sequence {seq_id} has {len(sequence.token_ids)} tokens here, the caller expected {expected_num_tokens}"
            )
        k = len(draft_token_ids)
        if len(sequence.token_ids) + k > self.loaded.max_model_len:
            raise InvalidArgument(
                "draft_token_ids",
                f"{k} draft tokens after {len(sequence.token_ids)} tokens exceed the target's {self.loaded.max_model_len}-token context",
            )
        self._check_token_ids("draft_token_ids", draft_token_ids)
        params = sequence.params
        proposal = torch.tensor(draft_token_ids, dtype=torch.long)
        if params.greedy or k == 0:
            q = torch.nn.functional.one_hot(proposal, self.vocab_size).float()
        elif draft_probs is None:
            raise InvalidArgument("draft_probs", "required for sampled (temperature > 0) requests")
        else:
            q = decode_tensor(draft_probs, "draft_probs", (k, self.vocab_size))

        logits = sequence.cache.extend([sequence.token_ids[-1], *draft_token_ids], logits_to_keep=k + 1)
        p = process_logits(logits, params, penalty_context(params, sequence.token_ids, draft_token_ids, self.vocab_size))
        result = rejection_sample(
            target_probs=p.unsqueeze(0),
            draft_probs=q.unsqueeze(0),
            draft_token_ids=proposal.unsqueeze(0),
            uniforms=draw_uniforms(k, params.greedy, sequence.generator).unsqueeze(0),
            exponentials=draw_exponentials(self.vocab_size, params.greedy, sequence.generator).unsqueeze(0),
        )
        num_accepted = int(result.num_accepted[0])
        token = int(result.token_ids[0])
        sequence.token_ids.extend([*draft_token_ids[:num_accepted], token])
        sequence.cache.truncate(len(sequence.token_ids) - 1)
        return VerifyOutcome(
            num_accepted=num_accepted,
            token_id=token,
            is_bonus=bool(result.is_bonus[0]),
            acceptance_probs=result.acceptance_probs[0].tolist(),
            num_tokens=len(sequence.token_ids),
        )

    def release(self, seq_id: str) -> bool:
        return self.sequences.pop(seq_id, None) is not None
