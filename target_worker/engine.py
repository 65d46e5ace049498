"""The target's batched engine: each step packs every runnable prefill and verification into one
forward pass over the paged KV pool, then samples, accepts/resamples and rolls back per sequence.

Invariant: a sequence's KV holds every token except the last one (the pending token, which this
worker sampled and feeds first in the next verify). Admission: a prefill runs only when blocks for
its prompt plus `num_lookahead_slots` are free. Memory pressure: when a verification cannot get its
k + 1 slots, the newest sequence is preempted (its blocks freed, its generator state kept); its
next verify answers `preempted` and the coordinator resumes it with a prefill of its history.
All methods run on the worker's single model thread.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from splitspec.constraints import GrammarCompiler, Matcher, output_of
from splitspec.codec import check_proposal_probs, decode_sparse, decode_tensor
from splitspec.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, check_token_ids
from splitspec.limits import MAX_LOGPROBS
from splitspec.models import LoadedModel
from splitspec.paged.block_manager import BlockManager
from splitspec.paged.runner import Chunk, PagedRunner
from splitspec.paged.stats import EngineStats
from splitspec.rejection import rejection_sample
from splitspec.sampling import (
    SamplingParams,
    TokenLogprobs,
    draw_exponentials,
    draw_uniforms,
    logits_context,
    make_generator,
    process_logits,
    sample,
    token_logprobs,
)
from splitspec.v1 import common_pb2
from target_worker.cores import CorePlan

TARGET_STREAM = 1


@dataclass(slots=True)
class PrefillItem:
    seq_id: str
    token_ids: list[int]
    params: SamplingParams
    max_new_tokens: int = 0
    num_lookahead_slots: int = 1
    resume: bool = False  # recompute KV for token_ids[:-1]; token_ids[-1] is the pending token
    num_prompt_logprobs: int | None = None  # the logprobs of token_ids[1:], with this many top ones

    @property
    def scores_prompt(self) -> bool:
        return self.num_prompt_logprobs is not None


@dataclass(slots=True)
class VerifyItem:
    seq_id: str
    draft_token_ids: list[int]
    draft_probs: common_pb2.Tensor | common_pb2.SparseProbs | None = None
    expected_num_tokens: int = 0


@dataclass(slots=True)
class ReleaseItem:
    seq_id: str


@dataclass(slots=True)
class PrefillOutcome:
    token_id: int          # first generated token; -1 for a resume
    num_tokens: int
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # the first token's, when asked for
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # token_ids[1:]'s, when asked for


@dataclass(slots=True)
class VerifyOutcome:
    num_accepted: int
    token_id: int
    is_bonus: bool
    acceptance_probs: list[float]
    num_tokens: int
    preempted: bool = False
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per emitted token, when asked for


PREEMPTED = VerifyOutcome(0, -1, False, [], 0, preempted=True)


@dataclass(slots=True)
class TargetSequence:
    seq_id: str
    token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    admitted: int  # admission order: the largest is the newest
    matcher: Matcher | None = None  # structured output: the grammar's state

    def allowed(self, proposal: list[int]) -> torch.Tensor | None:
        """The grammar's tokens at each of the len(proposal) + 1 scored positions (None: unconstrained)."""
        if self.matcher is None:
            return None
        return self.matcher.allowed_rows(output_of(self.token_ids, self.params.num_prompt_tokens), proposal)


@dataclass(slots=True)
class _Planned:
    index: int
    sequence: TargetSequence
    chunk: Chunk
    item: Any
    draft_probs: torch.Tensor | None = None
    num_cached: int = 0
    allowed: torch.Tensor | None = None  # structured output: the grammar's tokens at each scored position


@dataclass(slots=True)
class TargetEngine:
    loaded: LoadedModel
    blocks: BlockManager
    runner: PagedRunner
    max_num_seqs: int = 256
    max_batch_tokens: int = 4096
    batching: bool = True
    cores: CorePlan | None = None  # all cores for target-only steps, the target's own beside busy drafts
    sequences: dict[str, TargetSequence] = field(default_factory=dict)
    suspended: dict[str, torch.Tensor] = field(default_factory=dict)  # preempted: generator state
    stats: EngineStats = field(default_factory=EngineStats)
    _admissions: itertools.count = field(default_factory=itertools.count)
    _grammars: GrammarCompiler | None = None
    _masker: ThreadPoolExecutor | None = None

    @property
    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            self._grammars = GrammarCompiler.for_model(self.loaded)
        return self._grammars

    @property
    def vocab_size(self) -> int:
        return self.loaded.vocab_size

    # --- checks that need no model state (run before queueing) -------------------------------
    def check_prefill(self, item: PrefillItem) -> None:
        if not item.seq_id:
            raise InvalidArgument("seq_id", "must not be empty")
        if len(item.token_ids) < 1 + item.resume:
            raise InvalidArgument("token_ids", "must not be empty" if not item.resume else
                                  "a resume carries the sequence's history and its pending token: at least 2 tokens")
        limit = self.loaded.max_model_len
        if len(item.token_ids) >= limit + item.resume:
            raise InvalidArgument("token_ids", f"{len(item.token_ids)} tokens leave no room in the target's {limit}-token context")
        check_token_ids("token_ids", item.token_ids, self.vocab_size)
        item.params.validate(self.vocab_size)
        constraint = item.params.constraint
        if constraint is not None:
            if not 0 < item.params.num_prompt_tokens <= len(item.token_ids):
                raise InvalidArgument("sampling.num_prompt_tokens",
                                      "a constrained sequence must say where its output starts (1..len(token_ids))")
        if item.scores_prompt and (item.resume or not 0 <= item.num_prompt_logprobs <= MAX_LOGPROBS):
            raise InvalidArgument("num_prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], and not with resume")
        if item.max_new_tokens < 0 or item.num_lookahead_slots < 1:
            raise InvalidArgument("max_new_tokens", "max_new_tokens must be >= 0 and num_lookahead_slots >= 1")
        worst = len(item.token_ids) + item.max_new_tokens + item.num_lookahead_slots
        needed = self.blocks.blocks_for(min(worst, limit + item.num_lookahead_slots))
        if needed > self.blocks.num_blocks:
            raise ResourceExhausted(
                f"prompt ({len(item.token_ids)} tokens) + max_tokens ({item.max_new_tokens}) + lookahead "
                f"({item.num_lookahead_slots}) needs {needed} KV blocks of {self.blocks.block_size} tokens; "
                f"the pool has {self.blocks.num_blocks} (--num-blocks / --kv-cache-memory)"
            )

    # --- one step ------------------------------------------------------------------------------
    def step(self, items: list[Any]) -> tuple[dict[int, Any], list[Any]]:
        with self.stats.timing_step():
            return self._step(items)

    def _step(self, items: list[Any]) -> tuple[dict[int, Any], list[Any]]:
        outcomes: dict[int, Any] = {}
        waiting: list[Any] = []
        planned: list[_Planned] = []
        budget = self.max_batch_tokens
        for index, item in enumerate(items):
            if isinstance(item, ReleaseItem):
                outcomes[index] = self.release(item.seq_id)
        for index, item in enumerate(items):
            if isinstance(item, VerifyItem):
                budget = self._plan_verify(index, item, planned, outcomes, waiting, budget)
        blocked = False
        for index, item in enumerate(items):
            if isinstance(item, PrefillItem):
                if blocked:  # first come, first served: no overtaking a waiting prefill
                    waiting.append(item)
                    continue
                budget, blocked = self._plan_prefill(index, item, planned, outcomes, waiting, budget)
        if planned:
            self._run(planned, outcomes)
        return outcomes, waiting

    def _room_for_another(self, planned: list[_Planned], tokens: int, budget: int) -> bool:
        if not planned:
            return True
        return self.batching and tokens <= budget

    def _plan_verify(self, index: int, item: VerifyItem, planned: list[_Planned], outcomes: dict[int, Any],
                     waiting: list[Any], budget: int) -> int:
        sequence = self.sequences.get(item.seq_id)
        try:
            if sequence is None:
                if item.seq_id in self.suspended:
                    outcomes[index] = PREEMPTED
                    return budget
                raise NotFound(f"sequence {item.seq_id} is not on this target (never prefilled, released, or lost)")
            draft_probs = self._check_verify(sequence, item)
        except Exception as exc:  # noqa: BLE001 - an outcome for this item only
            outcomes[index] = exc
            return budget
        k = len(item.draft_token_ids)
        if not self._room_for_another(planned, k + 1, budget):
            waiting.append(item)
            return budget
        busy = {p.sequence.seq_id for p in planned}
        while not self.blocks.can_append(sequence.seq_id, k + 1):
            candidates = [s for s in self.sequences.values() if s.seq_id not in busy]
            victim = max(candidates, key=lambda s: s.admitted)
            self._preempt(victim)
            if victim is sequence:
                outcomes[index] = PREEMPTED
                return budget
        start = len(sequence.token_ids) - 1
        slots, copies = self.blocks.append_slots(sequence.seq_id, k + 1)
        self.runner.copy_blocks(copies)
        chunk = Chunk([sequence.token_ids[-1], *item.draft_token_ids], start, slots,
                      list(self.blocks.tables[sequence.seq_id].block_ids), k + 1)
        planned.append(_Planned(index, sequence, chunk, item, draft_probs))
        return budget - (k + 1)

    def _check_verify(self, sequence: TargetSequence, item: VerifyItem) -> torch.Tensor | None:
        if item.expected_num_tokens and item.expected_num_tokens != len(sequence.token_ids):
            raise FailedPrecondition(
                f"sequence {sequence.seq_id} has {len(sequence.token_ids)} tokens here, the caller expected "
                f"{item.expected_num_tokens}"
            )
        k = len(item.draft_token_ids)
        if len(sequence.token_ids) + k > self.loaded.max_model_len:
            raise InvalidArgument(
                "draft_token_ids",
                f"{k} draft tokens after {len(sequence.token_ids)} tokens exceed the target's "
                f"{self.loaded.max_model_len}-token context",
            )
        check_token_ids("draft_token_ids", item.draft_token_ids, self.vocab_size)
        if sequence.params.greedy or k == 0:
            return None
        if item.draft_probs is None:
            raise InvalidArgument("draft_probs", "required for sampled (temperature > 0) requests")
        if isinstance(item.draft_probs, common_pb2.SparseProbs):
            probs, field = decode_sparse(item.draft_probs, "draft_sparse_probs", (k, self.vocab_size)), "draft_sparse_probs"
        else:
            probs, field = decode_tensor(item.draft_probs, "draft_probs", (k, self.vocab_size)), "draft_probs"
        return check_proposal_probs(probs, item.draft_token_ids, field)

    def _plan_prefill(self, index: int, item: PrefillItem, planned: list[_Planned], outcomes: dict[int, Any],
                      waiting: list[Any], budget: int) -> tuple[int, bool]:
        if item.seq_id in self.sequences:
            outcomes[index] = FailedPrecondition(f"sequence {item.seq_id} already exists on this target")
            return budget, False
        cache_tokens = item.token_ids[:-1] if item.resume else item.token_ids
        reuse = not item.scores_prompt  # scoring the prompt needs logits at every position
        fits = (
            len(self.sequences) < self.max_num_seqs
            and self._room_for_another(planned, len(cache_tokens), budget)
            and self.blocks.can_allocate(cache_tokens, item.num_lookahead_slots, reuse)
        )
        if not fits:
            waiting.append(item)
            return budget, True
        state = self.suspended.pop(item.seq_id, None) if item.resume else None
        generator = make_generator(item.params.seed, TARGET_STREAM)
        if state is not None:
            generator.set_state(state)
        sequence = TargetSequence(item.seq_id, list(item.token_ids), item.params, generator, next(self._admissions))
        if item.params.constraint is not None:
            sequence.matcher = self.grammars.matcher(item.params.constraint)
        self.sequences[item.seq_id] = sequence
        cached = self.blocks.allocate(item.seq_id, cache_tokens, reuse)
        num_logits = 0 if item.resume else len(cache_tokens) if item.scores_prompt else 1
        chunk = Chunk(cache_tokens[cached:], cached, self.blocks.slots(item.seq_id, cached, len(cache_tokens)),
                      list(self.blocks.tables[item.seq_id].block_ids), num_logits)
        planned.append(_Planned(index, sequence, chunk, item, num_cached=cached))
        return budget - len(chunk.token_ids), False

    def _run(self, planned: list[_Planned], outcomes: dict[int, Any]) -> None:
        constrained = [p for p in planned if p.sequence.matcher is not None and not getattr(p.item, "resume", False)]
        masking = self._mask_thread().submit(self._masks, constrained) if constrained else None
        if self.cores is not None:
            self.cores.use(drafts_busy=any(isinstance(p.item, VerifyItem) and p.item.draft_token_ids for p in planned))
        started = time.perf_counter()
        logits = self.runner.forward([p.chunk for p in planned])  # the grammar masks are computed meanwhile
        forward_seconds = time.perf_counter() - started
        if masking is not None:
            waited = time.perf_counter()
            masking.result()
            self.stats.mask_wait_seconds += time.perf_counter() - waited
        self.stats.record_step(len(planned), sum(len(p.chunk.token_ids) for p in planned), forward_seconds)
        verifies = []
        for plan, rows in zip(planned, logits):
            if isinstance(plan.item, PrefillItem):
                outcomes[plan.index] = self._finish_prefill(plan, rows)
            else:
                verifies.append((plan, rows))
        if verifies:
            for plan, outcome in zip((p for p, _ in verifies), self._accept(verifies)):
                outcomes[plan.index] = outcome

    def _mask_thread(self) -> ThreadPoolExecutor:
        if self._masker is None:
            self._masker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        return self._masker

    def _masks(self, planned: list[_Planned]) -> None:
        """Each constrained plan's grammar masks at the positions its step scores (they depend on
        the tokens only, not on the logits)."""
        start = time.perf_counter()
        for plan in planned:
            proposal = plan.item.draft_token_ids if isinstance(plan.item, VerifyItem) else []
            plan.allowed = plan.sequence.allowed(proposal)
            self.stats.masked_rows += len(proposal) + 1
        self.stats.mask_seconds += time.perf_counter() - start

    def _finish_prefill(self, plan: _Planned, logits: torch.Tensor) -> PrefillOutcome:
        """logits: [num_logits, vocab], the last row the first new token's."""
        sequence, item = plan.sequence, plan.item
        outcome = PrefillOutcome(-1, len(sequence.token_ids), plan.num_cached)
        if not item.resume:
            params, last = sequence.params, logits[-1:]
            probs = process_logits(last, params, logits_context(params, sequence.token_ids, [], self.vocab_size),
                                   plan.allowed)
            exponentials = draw_exponentials(self.vocab_size, params.greedy, sequence.generator)
            sequence.token_ids.append(int(sample(probs[0], exponentials)))
            outcome.token_id, outcome.num_tokens = sequence.token_ids[-1], len(sequence.token_ids)
            if params.num_logprobs is not None:
                outcome.logprobs = token_logprobs(last, sequence.token_ids[-1:], params.num_logprobs)
            if item.scores_prompt:
                outcome.prompt_logprobs = token_logprobs(logits[:-1], item.token_ids[1:], item.num_prompt_logprobs)
        self.blocks.commit(sequence.seq_id, sequence.token_ids[:-1])
        return outcome

    def _accept(self, verifies: list[tuple[_Planned, torch.Tensor]]) -> list[VerifyOutcome]:
        """Batched rejection sampling over sequences with different k and sampling settings."""
        vocab = self.vocab_size
        k_max = max(len(p.item.draft_token_ids) for p, _ in verifies)
        batch = len(verifies)
        target_probs = torch.zeros(batch, k_max + 1, vocab)
        draft_probs = torch.zeros(batch, k_max, vocab)
        draft_ids = torch.zeros(batch, k_max, dtype=torch.long)
        uniforms = torch.zeros(batch, k_max)
        exponentials = torch.ones(batch, vocab)
        num_draft = torch.zeros(batch, dtype=torch.long)
        for row, (plan, logits) in enumerate(verifies):
            sequence, proposal = plan.sequence, plan.item.draft_token_ids
            params, k = sequence.params, len(proposal)
            context = logits_context(params, sequence.token_ids, proposal, vocab)
            target_probs[row, : k + 1] = process_logits(logits, params, context, plan.allowed)
            if k:
                ids = torch.tensor(proposal, dtype=torch.long)
                draft_ids[row, :k] = ids
                draft_probs[row, :k] = plan.draft_probs if plan.draft_probs is not None else \
                    torch.nn.functional.one_hot(ids, vocab).float()
            uniforms[row, :k] = draw_uniforms(k, params.greedy, sequence.generator)
            exponentials[row] = draw_exponentials(vocab, params.greedy, sequence.generator)
            num_draft[row] = k
        result = rejection_sample(target_probs, draft_probs, draft_ids, uniforms, exponentials, num_draft)
        outcomes = []
        for row, (plan, logits) in enumerate(verifies):
            sequence, proposal = plan.sequence, plan.item.draft_token_ids
            accepted, token = int(result.num_accepted[row]), int(result.token_ids[row])
            emitted = [*proposal[:accepted], token]
            top = sequence.params.num_logprobs
            logprobs = [] if top is None else token_logprobs(logits[: accepted + 1], emitted, top)
            sequence.token_ids.extend(emitted)
            self.blocks.truncate(sequence.seq_id, len(sequence.token_ids) - 1)
            self.blocks.commit(sequence.seq_id, sequence.token_ids[:-1])
            outcomes.append(VerifyOutcome(accepted, token, bool(result.is_bonus[row]),
                                          result.acceptance_probs[row, : len(proposal)].tolist(),
                                          len(sequence.token_ids), logprobs=logprobs))
        return outcomes

    # --- lifecycle -----------------------------------------------------------------------------
    def _preempt(self, sequence: TargetSequence) -> None:
        self.blocks.free(sequence.seq_id)
        del self.sequences[sequence.seq_id]
        self.suspended[sequence.seq_id] = sequence.generator.get_state()
        self.stats.preemptions += 1

    def release(self, seq_id: str) -> bool:
        held = self.sequences.pop(seq_id, None) is not None
        self.blocks.free(seq_id)
        return held or self.suspended.pop(seq_id, None) is not None
