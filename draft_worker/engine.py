"""Batched drafting over the paged KV pool.

For each sequence in a step: roll back to the accepted prefix, absorb the new tokens, then draft.
All sequences draft together: draft step j is one forward pass over every sequence still short
of its k (the first pass feeds each sequence's uncached tokens, later passes one token each).

After a proposal d_1..d_k the cache holds history + d_1..d_{k-1} (d_k was sampled, never fed).
A proposal may end before k tokens (min_confidence): the same holds for its length.
The next request says how many were accepted (a) and which tokens follow (the recovered or bonus
token): the cache is cut to history + d_1..d_a and the first pass of the next proposal feeds
whatever is not cached yet, d_k included when all were accepted. So the bonus token costs no
extra round trip and no extra forward pass. All methods run on the worker's model thread, except
`start` and `check`, which only read the sequence that their own stream owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from splitspec.errors import InvalidArgument, ResourceExhausted
from splitspec.models import LoadedModel
from splitspec.paged.block_manager import BlockManager
from splitspec.paged.runner import Chunk, PagedRunner
from splitspec.paged.stats import EngineStats, worker_stats
from splitspec.sampling import (
    SamplingParams,
    check_confidence,
    draw_exponentials,
    make_generator,
    penalty_context,
    process_logits,
    sample,
    token_confidence,
)
from splitspec.v1 import common_pb2

DRAFT_STREAM = 2


@dataclass(slots=True)
class DraftSequence:
    seq_id: str
    params: SamplingParams
    generator: torch.Generator
    token_ids: list[int] = field(default_factory=list)
    proposal: list[int] = field(default_factory=list)
    snapshot: tuple[list[int], list[int]] | None = None  # (token_ids, proposal) before a speculative request

    def resolve(self, held: bool) -> None:
        """Settle a pending speculation: keep its state, or go back to the state before it."""
        if self.snapshot is not None and not held:
            self.token_ids, self.proposal = self.snapshot
        self.snapshot = None

    def effective_proposal(self, held: bool) -> list[int]:
        return self.snapshot[1] if self.snapshot is not None and not held else self.proposal


@dataclass(slots=True)
class ProposeItem:
    sequence: DraftSequence
    num_accepted: int
    new_token_ids: list[int]
    k: int
    speculative: bool = False
    speculation_held: bool = False
    min_confidence: float = 0.0  # stop after a drafted token less likely than this (0: k tokens)


@dataclass(slots=True)
class CloseItem:
    sequence: DraftSequence


@dataclass(slots=True)
class Proposal:
    token_ids: list[int]
    probs: torch.Tensor | None  # q: [k, vocab] float32; None for greedy (one-hot at token_ids)
    num_tokens: int
    guessed_token_id: int = -1   # speculative proposals: the bonus token they assume


def open_sequence(seq_id: str, params: SamplingParams) -> DraftSequence:
    """The state a proposal stream starts with (every drafting method)."""
    if not seq_id:
        raise InvalidArgument("seq_id", "the first message of a stream must name the sequence")
    params.validate()
    return DraftSequence(seq_id, params, make_generator(params.seed, DRAFT_STREAM))


def max_proposal(model: LoadedModel, max_k: int, num_tokens: int) -> int:
    """Largest k a draft can propose after `num_tokens` tokens without passing its context."""
    return max(0, min(max_k, model.max_model_len + 1 - num_tokens))


def check_request(item: ProposeItem, model: LoadedModel, max_k: int) -> None:
    """Refuse a request that does not fit the stream's state, the vocabulary or the context
    (every drafting method); errors name the field."""
    sequence, vocab = item.sequence, model.vocab_size
    check_confidence("min_confidence", item.min_confidence)
    proposal = sequence.effective_proposal(item.speculation_held)
    if item.speculative:
        if not proposal:
            raise InvalidArgument("speculative", "needs a previous proposal to assume accepted")
        limit = max_proposal(model, max_k, len(sequence.token_ids) + len(proposal) + 1)
        if not 1 <= item.k <= limit:
            raise InvalidArgument("k", f"must be in [1, {limit}] here, got {item.k}")
        return
    if not 0 <= item.num_accepted <= len(proposal):
        raise InvalidArgument(
            "num_accepted",
            f"must be in [0, {len(proposal)}] (the last proposal's length), got {item.num_accepted}",
        )
    if not item.new_token_ids:
        raise InvalidArgument("new_token_ids", "must hold at least the token that follows the accepted prefix")
    bad = [t for t in item.new_token_ids if not 0 <= t < vocab]
    if bad:
        raise InvalidArgument("new_token_ids", f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    history = sequence.snapshot[0] if sequence.snapshot is not None and not item.speculation_held \
        else sequence.token_ids
    limit = max_proposal(model, max_k, len(history) + item.num_accepted + len(item.new_token_ids))
    if not 1 <= item.k <= limit:
        raise InvalidArgument(
            "k", f"must be in [1, {limit}] here (--max-k {max_k}, draft context {model.max_model_len}), got {item.k}"
        )


@dataclass(slots=True)
class _Drafting:
    index: int
    item: ProposeItem
    slots: list[int]
    feed: list[int]
    start: int
    seen: torch.Tensor | None
    rows: list[torch.Tensor] = field(default_factory=list)
    guess: int | None = None       # speculative: None until the bonus guess is made, then the token
    stopped: bool = False          # a token fell below min_confidence: the proposal ends there

    @property
    def depth(self) -> int:
        return self.item.k + int(self.item.speculative)


@dataclass(slots=True)
class DraftEngine:
    loaded: LoadedModel
    blocks: BlockManager
    runner: PagedRunner
    max_k: int = 16
    stats: EngineStats = field(default_factory=EngineStats)
    open_sequences: int = 0

    def start(self, seq_id: str, params: SamplingParams) -> DraftSequence:
        return open_sequence(seq_id, params)

    def check(self, item: ProposeItem) -> None:
        check_request(item, self.loaded, self.max_k)

    def info(self) -> common_pb2.ModelInfo:
        return self.loaded.info(max_k=self.max_k)

    def worker_stats(self, waiting: int) -> common_pb2.WorkerStats:
        return worker_stats(self.blocks, self.stats, self.open_sequences, waiting)

    # --- one step ------------------------------------------------------------------------------
    def step(self, items: list[Any]) -> tuple[dict[int, Any], list[Any]]:
        outcomes: dict[int, Any] = {}
        drafting: list[_Drafting] = []
        for index, item in enumerate(items):
            if isinstance(item, CloseItem):
                outcomes[index] = self.blocks.free(item.sequence.seq_id)
        for index, item in enumerate(items):
            if isinstance(item, ProposeItem):
                try:
                    drafting.append(self._prepare(index, item))
                except ResourceExhausted as exc:
                    outcomes[index] = exc
        for depth in range(max((d.depth for d in drafting), default=0)):
            active = [d for d in drafting if depth < d.depth and not d.stopped]
            if not active:
                break
            chunks = []
            for d in active:
                table = list(self.blocks.tables[d.item.sequence.seq_id].block_ids)
                used = len(d.feed)
                chunks.append(Chunk(d.feed, d.start, d.slots[:used], table, 1))
                d.slots, d.start = d.slots[used:], d.start + used
            self.stats.record_step(len(chunks), sum(len(c.token_ids) for c in chunks))
            for d, logits in zip(active, self.runner.forward(chunks)):
                d.feed = [self._sample(d, logits)]
        for d in drafting:
            sequence = d.item.sequence
            if d.stopped:  # give back the slots reserved for the tokens not drafted
                self.blocks.truncate(sequence.seq_id, d.start)
            probs = None if sequence.params.greedy else torch.stack(d.rows)
            outcomes[d.index] = Proposal(list(sequence.proposal), probs, len(sequence.token_ids),
                                         d.guess if d.guess is not None else -1)
        return outcomes, []

    def _prepare(self, index: int, item: ProposeItem) -> _Drafting:
        """Roll back, absorb the new tokens, and reserve the slots the whole proposal will write."""
        sequence, seq_id = item.sequence, item.sequence.seq_id
        sequence.resolve(item.speculation_held)
        if item.speculative:
            return self._prepare_speculative(index, item)
        history_len = len(sequence.token_ids)
        tokens = [*sequence.token_ids, *sequence.proposal[: item.num_accepted], *item.new_token_ids]
        if seq_id in self.blocks.tables:
            cached = min(self.blocks.tables[seq_id].num_tokens, history_len + item.num_accepted)
            self.blocks.truncate(seq_id, cached)
            needed = len(tokens) - cached + item.k - 1
            if not self.blocks.can_append(seq_id, needed):
                raise ResourceExhausted(f"draft KV pool is full ({self.blocks.num_blocks} blocks)")
            slots, copies = self.blocks.append_slots(seq_id, needed)
            self.runner.copy_blocks(copies)
        else:
            if not self.blocks.can_allocate(tokens, item.k - 1):
                raise ResourceExhausted(f"draft KV pool is full ({self.blocks.num_blocks} blocks)")
            cached = self.blocks.allocate(seq_id, tokens)
            slots, _ = self.blocks.append_slots(seq_id, item.k - 1)
            slots = self.blocks.slots(seq_id, cached, len(tokens)) + slots
        sequence.token_ids, sequence.proposal = tokens, []
        self.blocks.commit(seq_id, tokens)
        seen = penalty_context(sequence.params, tokens, [], self.loaded.vocab_size)
        return _Drafting(index, item, slots, tokens[cached:], cached, seen)

    def _prepare_speculative(self, index: int, item: ProposeItem) -> _Drafting:
        """Assume the whole current proposal is accepted: feed it (its last token was never fed),
        guess the bonus token, and reserve slots for the guess and k - 1 more. Nothing new is
        committed to the prefix cache, so the whole speculation can be rolled back by truncation."""
        sequence, seq_id = item.sequence, item.sequence.seq_id
        sequence.snapshot = (list(sequence.token_ids), list(sequence.proposal))
        tokens = [*sequence.token_ids, *sequence.proposal]
        cached = min(self.blocks.tables[seq_id].num_tokens, len(tokens))
        self.blocks.truncate(seq_id, cached)
        needed = len(tokens) - cached + item.k
        if not self.blocks.can_append(seq_id, needed):
            sequence.resolve(held=False)
            raise ResourceExhausted(f"draft KV pool is full ({self.blocks.num_blocks} blocks)")
        slots, copies = self.blocks.append_slots(seq_id, needed)
        self.runner.copy_blocks(copies)
        sequence.token_ids, sequence.proposal = tokens, []
        seen = penalty_context(sequence.params, tokens, [], self.loaded.vocab_size)
        return _Drafting(index, item, slots, tokens[cached:], cached, seen)

    def _sample(self, drafting: _Drafting, logits: torch.Tensor) -> int:
        sequence = drafting.item.sequence
        params, vocab = sequence.params, self.loaded.vocab_size
        q = process_logits(logits, params, drafting.seen)
        if drafting.item.speculative and drafting.guess is None:  # the assumed bonus token: most likely one
            token = int(q[0].argmax())
            drafting.guess = token
            sequence.token_ids.append(token)
            if drafting.seen is not None:
                drafting.seen[:, token] = True
            return token
        token = int(sample(q[0], draw_exponentials(vocab, params.greedy, sequence.generator)))
        sequence.proposal.append(token)
        drafting.rows.append(q[0])
        threshold = drafting.item.min_confidence
        drafting.stopped = bool(threshold) and token_confidence(logits[0], q[0], token, params) < threshold
        if drafting.seen is not None:
            drafting.seen[:, token] = True
        return token
