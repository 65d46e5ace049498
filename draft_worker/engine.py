"""Batched drafting over the paged KV pool.

For each sequence in a step: roll back to the accepted prefix, absorb the new tokens, then draft.
All sequences draft together: draft step j is one forward pass over every sequence still short
of its k (the first pass feeds each sequence's uncached tokens, later passes one token each).

After a proposal d_1..d_k the cache holds history + d_1..d_{k-1} (d_k was sampled, never fed).
A proposal may end before k tokens (min_confidence): the same holds for its length.
The next request says how many were accepted (a) and which tokens follow (the recovered or bonus
token): the cache is cut to history + d_1..d_a and the first pass of the next proposal feeds
whatever is not cached yet, d_k included when all were accepted. So the bonus token costs no
extra round trip and no extra forward pass.

Overlap (a speculative request) drafts the next round while the target verifies this one, once
per likely verdict: a fork of the sequence per (accepted count, following token), drafted in the
same batched passes. The next request names the branch that held, whose blocks then become the
sequence's, or none; the other forks are freed. All methods run on the worker's model thread, except
`start` and `check`, which only read the sequence that their own stream owns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from splitspec.constraints import GrammarCompiler, Matcher, output_of
from splitspec.errors import InvalidArgument, ResourceExhausted, check_token_ids
from splitspec.models import LoadedModel
from splitspec.paged.block_manager import BlockManager
from splitspec.paged.runner import Chunk, PagedRunner
from splitspec.paged.stats import EngineStats, worker_stats
from splitspec.sampling import (
    LogitsContext,
    SamplingParams,
    check_confidence,
    draw_exponentials,
    make_generator,
    logits_context,
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
    rankings: list[torch.Tensor] = field(default_factory=list)  # per proposed token: the scores it was ranked by
    branches: list["Branch"] = field(default_factory=list)      # pending speculative next rounds
    matcher: Matcher | None = None  # structured output: the grammar (shared with this sequence's branches)

    def allowed(self) -> torch.Tensor | None:
        """[1, vocab] bool: the grammar's tokens after the history and the proposal so far (None:
        unconstrained, or a branch whose assumed verdict the grammar refuses: it can never hold)."""
        if self.matcher is None:
            return None
        row = self.matcher.allowed([*output_of(self.token_ids, self.params.num_prompt_tokens), *self.proposal])
        return None if row is None else row.unsqueeze(0)

    def after(self, held_branch: int | None) -> "DraftSequence":
        """The state a request continues from: the held branch's, or this one."""
        return self.branches[held_branch].sequence if held_branch is not None else self


@dataclass(slots=True)
class Branch:
    """A speculative next round: the verdict it assumes, and the draft's state after that verdict
    (its own block table, history and proposal)."""

    num_accepted: int
    token_id: int
    sequence: DraftSequence


@dataclass(slots=True)
class ProposeItem:
    sequence: DraftSequence
    num_accepted: int
    new_token_ids: list[int]
    k: int
    speculative: bool = False
    held_branch: int | None = None  # the pending branch whose verdict came true, if any
    min_confidence: float = 0.0     # stop after a drafted token less likely than this (0: k tokens)
    branch_width: int = 1           # speculative: candidate tokens per accept length (>= 1)


@dataclass(slots=True)
class CloseItem:
    sequence: DraftSequence


@dataclass(slots=True)
class Proposal:
    token_ids: list[int]
    probs: torch.Tensor | None  # q: [k, vocab] float32; None for greedy (one-hot at token_ids)
    num_tokens: int
    branches: list["BranchProposal"] = field(default_factory=list)  # speculative requests only


@dataclass(slots=True)
class BranchProposal:
    num_accepted: int
    token_id: int
    proposal: Proposal


def open_sequence(seq_id: str, params: SamplingParams, vocab_size: int) -> DraftSequence:
    """The state a proposal stream starts with (every drafting method)."""
    if not seq_id:
        raise InvalidArgument("seq_id", "the first message of a stream must name the sequence")
    params.validate(vocab_size)
    return DraftSequence(seq_id, params, make_generator(params.seed, DRAFT_STREAM))


def max_proposal(model: LoadedModel, max_k: int, num_tokens: int) -> int:
    """Largest k a draft can propose after `num_tokens` tokens without passing its context."""
    return max(0, min(max_k, model.max_model_len + 1 - num_tokens))


def check_request(item: ProposeItem, model: LoadedModel, max_k: int) -> None:
    """Refuse a request that does not fit the stream's state, the vocabulary or the context
    (every drafting method); errors name the field."""
    sequence, vocab = item.sequence, model.vocab_size
    check_confidence("min_confidence", item.min_confidence)
    if item.held_branch is not None and not 0 <= item.held_branch < len(sequence.branches):
        raise InvalidArgument(
            "held_branch", f"must index the {len(sequence.branches)} pending branches, got {item.held_branch}")
    state = sequence.after(item.held_branch)
    if item.speculative:
        if not state.proposal:
            raise InvalidArgument("speculative", "needs a previous proposal to branch from")
        limit = max_proposal(model, max_k, len(state.token_ids) + len(state.proposal) + 1)
        if not 1 <= item.k <= limit:
            raise InvalidArgument("k", f"must be in [1, {limit}] here, got {item.k}")
        return
    if not 0 <= item.num_accepted <= len(state.proposal):
        raise InvalidArgument(
            "num_accepted",
            f"must be in [0, {len(state.proposal)}] (the last proposal's length), got {item.num_accepted}",
        )
    if not item.new_token_ids:
        raise InvalidArgument("new_token_ids", "must hold at least the token that follows the accepted prefix")
    check_token_ids("new_token_ids", item.new_token_ids, vocab)
    limit = max_proposal(model, max_k, len(state.token_ids) + item.num_accepted + len(item.new_token_ids))
    if not 1 <= item.k <= limit:
        raise InvalidArgument(
            "k", f"must be in [1, {limit}] here (--max-k {max_k}, draft context {model.max_model_len}), got {item.k}"
        )


@dataclass(slots=True)
class _Drafting:
    index: int
    item: ProposeItem
    sequence: DraftSequence
    slots: list[int]
    feed: list[int]
    start: int
    context: LogitsContext | None
    remaining: int                 # forward passes still to run
    rows: list[torch.Tensor] = field(default_factory=list)
    stopped: bool = False          # a token fell below min_confidence: the proposal ends there
    verdict: tuple[int, int] | None = None  # a branch: the (num_accepted, token) it assumes
    root: bool = False             # feeds the last proposed token to rank the bonus candidates


@dataclass(slots=True)
class DraftEngine:
    loaded: LoadedModel
    blocks: BlockManager
    runner: PagedRunner
    max_k: int = 16
    stats: EngineStats = field(default_factory=EngineStats)
    open_sequences: int = 0
    _grammars: GrammarCompiler | None = None

    def start(self, seq_id: str, params: SamplingParams) -> DraftSequence:
        sequence = open_sequence(seq_id, params, self.loaded.vocab_size)
        if params.constraint is not None:  # q is masked like p: the draft follows the grammar too
            if self._grammars is None:
                self._grammars = GrammarCompiler.for_model(self.loaded)
            sequence.matcher = self._grammars.matcher(params.constraint)
        return sequence

    def check(self, item: ProposeItem) -> None:
        check_request(item, self.loaded, self.max_k)

    def info(self) -> common_pb2.ModelInfo:
        return self.loaded.info(max_k=self.max_k)

    def worker_stats(self, waiting: int) -> common_pb2.WorkerStats:
        return worker_stats(self.blocks, self.stats, self.open_sequences, waiting)

    # --- one step ------------------------------------------------------------------------------
    def step(self, items: list[Any]) -> tuple[dict[int, Any], list[Any]]:
        with self.stats.timing_step():
            return self._step(items)

    def _step(self, items: list[Any]) -> tuple[dict[int, Any], list[Any]]:
        outcomes: dict[int, Any] = {}
        drafting: list[_Drafting] = []
        for index, item in enumerate(items):
            if isinstance(item, CloseItem):
                self._settle(item.sequence, None)
                outcomes[index] = self.blocks.free(item.sequence.seq_id)
        for index, item in enumerate(items):
            if isinstance(item, ProposeItem):
                try:
                    drafting.extend(self._prepare(index, item))
                except ResourceExhausted as exc:
                    outcomes[index] = exc
                    continue
                if item.speculative:
                    outcomes[index] = Proposal([], None, len(item.sequence.token_ids))
        while active := [d for d in drafting if d.remaining and not d.stopped]:
            chunks = []
            for d in active:
                table = list(self.blocks.tables[d.sequence.seq_id].block_ids)
                used = len(d.feed)
                chunks.append(Chunk(d.feed, d.start, d.slots[:used], table, 1))
                d.slots, d.start = d.slots[used:], d.start + used
            started = time.perf_counter()
            rows = self.runner.forward(chunks)
            self.stats.record_step(len(chunks), sum(len(c.token_ids) for c in chunks), time.perf_counter() - started)
            for d, logits in zip(active, rows):
                d.remaining -= 1
                if d.root:
                    drafting.extend(self._bonus_branches(d, logits))
                else:
                    d.feed = [self._sample(d, logits)]
        for d in drafting:
            if d.root:
                continue
            sequence = d.sequence
            if d.stopped:  # give back the slots reserved for the tokens not drafted
                self.blocks.truncate(sequence.seq_id, d.start)
            probs = None if sequence.params.greedy else torch.stack(d.rows)
            proposal = Proposal(list(sequence.proposal), probs, len(sequence.token_ids))
            if d.verdict is None:
                outcomes[d.index] = proposal
            else:
                outcomes[d.index].branches.append(BranchProposal(*d.verdict, proposal))
                d.item.sequence.branches.append(Branch(*d.verdict, sequence))
        return outcomes, []

    def _settle(self, sequence: DraftSequence, held_branch: int | None) -> None:
        """Resolve the pending speculation: continue from the held branch (its blocks become the
        sequence's), or from the state before it; the other branches' blocks are freed."""
        branches, sequence.branches = sequence.branches, []
        for index, branch in enumerate(branches):
            if index == held_branch:
                self.blocks.free(sequence.seq_id)
                self.blocks.rename(branch.sequence.seq_id, sequence.seq_id)
                held = branch.sequence
                sequence.token_ids, sequence.proposal, sequence.rankings = held.token_ids, held.proposal, held.rankings
            else:
                self.blocks.free(branch.sequence.seq_id)

    def _prepare(self, index: int, item: ProposeItem) -> list[_Drafting]:
        """Roll back, absorb the new tokens, and reserve the slots the whole proposal will write."""
        sequence, seq_id = item.sequence, item.sequence.seq_id
        self._settle(sequence, item.held_branch)
        if item.speculative:
            return self._branch(index, item)
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
        sequence.token_ids, sequence.proposal, sequence.rankings = tokens, [], []
        self.blocks.commit(seq_id, tokens)
        context = logits_context(sequence.params, tokens, [], self.loaded.vocab_size)
        return [_Drafting(index, item, sequence, slots, tokens[cached:], cached, context, item.k)]

    def _branch(self, index: int, item: ProposeItem) -> list[_Drafting]:
        """Speculate on the verdict of the current proposal d_1..d_n. Each branch is a fork of the
        sequence cut back to d_1..d_a and fed one candidate token t (the draft's most likely tokens
        there other than d_(a+1), which the target rejected); the bonus branches (a = n) wait for
        the root pass, which feeds d_n to rank their candidates. Nothing is committed: a branch
        that does not hold is freed whole. Branches that find the pool full are left out."""
        sequence, seq_id = item.sequence, item.sequence.seq_id
        proposal = sequence.proposal
        tokens = [*sequence.token_ids, *proposal]
        cached = min(self.blocks.tables[seq_id].num_tokens, len(tokens) - 1)
        self.blocks.truncate(seq_id, cached)
        if not self.blocks.can_append(seq_id, len(tokens) - cached):
            return []
        slots, copies = self.blocks.append_slots(seq_id, len(tokens) - cached)
        self.runner.copy_blocks(copies)
        branches = [_Drafting(index, item, sequence, slots, tokens[cached:], cached, None, 1, root=True)]
        for accepted, ranking in enumerate(sequence.rankings):
            rejected = proposal[accepted]
            candidates = [t for t in self._ranked(ranking, item.branch_width + 1) if t != rejected]
            for token in candidates[: item.branch_width]:
                fork = self._fork(index, item, accepted, token)
                if fork is not None:
                    branches.append(fork)
        return branches

    def _bonus_branches(self, root: _Drafting, logits: torch.Tensor) -> list[_Drafting]:
        sequence, item = root.sequence, root.item
        allowed = sequence.allowed()
        ranking = _masked(logits, allowed)[0] if sequence.params.greedy else \
            process_logits(logits, sequence.params, None, allowed)[0]
        forks = (self._fork(root.index, item, len(sequence.proposal), token)
                 for token in self._ranked(ranking, item.branch_width))
        return [fork for fork in forks if fork is not None]

    def _fork(self, index: int, item: ProposeItem, num_accepted: int, token: int) -> _Drafting | None:
        """A branch assuming `num_accepted` tokens of the proposal were accepted, then `token`."""
        parent = item.sequence
        history = [*parent.token_ids, *parent.proposal[:num_accepted], token]
        branch = DraftSequence(f"{parent.seq_id}/{len(history)}:{token}", parent.params, parent.generator, history,
                               matcher=parent.matcher)
        self.blocks.fork(parent.seq_id, branch.seq_id)
        self.blocks.truncate(branch.seq_id, len(history) - 1)
        if not self.blocks.can_append(branch.seq_id, item.k):
            self.blocks.free(branch.seq_id)
            return None
        slots, copies = self.blocks.append_slots(branch.seq_id, item.k)
        self.runner.copy_blocks(copies)
        context = logits_context(parent.params, history, [], self.loaded.vocab_size)
        return _Drafting(index, item, branch, slots, [token], len(history) - 1, context, item.k,
                         verdict=(num_accepted, token))

    @staticmethod
    def _ranked(scores: torch.Tensor, count: int) -> list[int]:
        return [int(t) for t in scores.topk(min(count, scores.numel())).indices]

    def _sample(self, drafting: _Drafting, logits: torch.Tensor) -> int:
        sequence = drafting.sequence
        params, vocab = sequence.params, self.loaded.vocab_size
        allowed = sequence.allowed()
        q = process_logits(logits, params, drafting.context, allowed)
        token = int(sample(q[0], draw_exponentials(vocab, params.greedy, sequence.generator)))
        sequence.proposal.append(token)
        sequence.rankings.append(_masked(logits, allowed)[0] if params.greedy else q[0])
        drafting.rows.append(q[0])
        threshold = drafting.item.min_confidence
        drafting.stopped = bool(threshold) and token_confidence(logits[0], q[0], token, params) < threshold
        if drafting.context is not None:
            drafting.context.append(token)
        return token


def _masked(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Greedy rankings: the raw logits with the grammar's refused tokens last (a copy)."""
    return logits.clone() if allowed is None else logits.masked_fill(~allowed, -torch.inf)
