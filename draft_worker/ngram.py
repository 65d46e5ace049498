"""N-gram prompt lookup: proposals copied from the request's own history, no model at all.

The last n tokens (n from --ngram-max down to --ngram-min) are looked up in the earlier history;
the tokens that followed their most recent earlier occurrence are the proposal, up to k of them.
Nothing matches: the proposal is empty and the round is the target's alone. A proposal is a
deterministic choice, so its q is one-hot at each token, which keeps rejection sampling exact:
token x is accepted with probability p(x), and a rejection resamples from p without x.
Speculative (overlap) requests get an empty proposal: lookup costs microseconds, so there is
nothing to overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from draft_worker.engine import (
    CloseItem,
    DraftSequence,
    Proposal,
    ProposeItem,
    check_request,
    open_sequence,
)
from splitspec.errors import InvalidArgument
from splitspec.models import LoadedModel
from splitspec.paged.stats import EngineStats, worker_stats
from splitspec.sampling import SamplingParams
from splitspec.v1 import common_pb2


def lookup(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix
    n-gram (max_n >= n >= min_n) of `token_ids`; [] when none occurs earlier."""
    if k < 1 or len(token_ids) < min_n + 1:
        return []
    tokens = torch.tensor(token_ids)
    for n in range(min(max_n, len(token_ids) - 1), min_n - 1, -1):
        windows = tokens[:-1].unfold(0, n, 1)  # every n-gram that has at least one token after it
        matches = (windows == tokens[-n:]).all(dim=1).nonzero()
        if len(matches):
            start = int(matches[-1]) + n
            return token_ids[start : start + k]
    return []


@dataclass(slots=True)
class NgramEngine:
    vocabulary: LoadedModel  # the target's config and tokenizer (model=None)
    min_n: int = 1
    max_n: int = 4
    max_k: int = 16
    stats: EngineStats = field(default_factory=EngineStats)
    open_sequences: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise InvalidArgument("--ngram-min", f"must be in [1, --ngram-max {self.max_n}], got {self.min_n}")

    def start(self, seq_id: str, params: SamplingParams) -> DraftSequence:
        return open_sequence(seq_id, params, self.vocabulary.vocab_size)

    def check(self, item: ProposeItem) -> None:
        check_request(item, self.vocabulary, self.max_k)

    def info(self) -> common_pb2.ModelInfo:
        info = self.vocabulary.info(max_k=self.max_k)
        info.model = f"ngram[{self.min_n}..{self.max_n}] over {self.vocabulary.name}"
        return info

    def worker_stats(self, waiting: int) -> common_pb2.WorkerStats:
        return worker_stats(None, self.stats, self.open_sequences, waiting)

    def step(self, items: list[Any]) -> tuple[dict[int, Any], list[Any]]:
        outcomes: dict[int, Any] = {}
        for index, item in enumerate(items):
            if isinstance(item, ProposeItem):
                outcomes[index] = self.propose(item)
            elif isinstance(item, CloseItem):
                outcomes[index] = None
        proposed = [o for o in outcomes.values() if isinstance(o, Proposal)]
        self.stats.record_step(len(proposed), sum(len(p.token_ids) for p in proposed))
        return outcomes, []

    def propose(self, item: ProposeItem) -> Proposal:
        sequence = item.sequence
        if item.speculative:
            return Proposal([], None, len(sequence.token_ids))
        sequence.token_ids = [*sequence.token_ids, *sequence.proposal[: item.num_accepted], *item.new_token_ids]
        sequence.proposal = lookup(sequence.token_ids, item.k, self.min_n, self.max_n)
        probs = None
        if not sequence.params.greedy and sequence.proposal:
            probs = torch.nn.functional.one_hot(torch.tensor(sequence.proposal),
                                                self.vocabulary.vocab_size).float()
        return Proposal(list(sequence.proposal), probs, len(sequence.token_ids))
