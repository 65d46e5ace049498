"""A round in flight (proposal, its verification, and overlap's speculation beside it) and the
statistics of a finished one: the request's SpecStats and the coordinator's metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from coordinator.metrics import CoordinatorMetrics
from splitspec.v1 import coordinator_pb2, draft_pb2


@dataclass(slots=True)
class Round:
    proposal: draft_pb2.DraftResponse | None
    verifying: asyncio.Task
    speculation: asyncio.Task | None  # overlap: the next round's branches, drafted meanwhile
    proposed_at: float
    exposed_draft: float              # seconds the round waited for the draft
    chained: bool = False             # the target started it on its own, from the last round's plan

    @property
    def draft_length(self) -> int:
        """k of the round: 0 for a target-only round (no proposal, or an empty one)."""
        return len(self.proposal.token_ids) if self.proposal is not None else 0


def count_round(spec: coordinator_pb2.SpecStats, metrics: CoordinatorMetrics, current: Round, verdict: Any,
                start: float, end: float) -> None:
    """Count the round, and where its time (`start` to `end`, verdict to verdict) went: draft,
    verify, and (the rest) coordinator and network. The draft's share is what the round waited
    for it: its step time, or for a proposal drafted during the last verify only the wait for
    it after that verdict."""
    proposal = current.proposal
    if current.draft_length == 0:
        spec.target_rounds += 1
        spec.target_round_seconds += end - start
        spec.empty_proposals += int(proposal is not None)
        return
    k, accepted = current.draft_length, verdict.num_accepted
    spec.rounds += 1
    spec.draft_tokens += k
    spec.accepted_tokens += accepted
    metrics.record_round(k, accepted)
    spec.round_seconds += end - start
    spec.draft_seconds += current.proposed_at - start
    spec.verify_seconds += end - current.proposed_at
    spec.draft_step_seconds += current.exposed_draft
    spec.verify_step_seconds += verdict.step_seconds
    spec.draft_payload_bytes += proposal.ByteSize()
    spec.chained_rounds += int(current.chained)
    while len(spec.proposed_per_position) < k:
        spec.proposed_per_position.append(0)
        spec.accepted_per_position.append(0)
    for position in range(k):
        spec.proposed_per_position[position] += 1
        spec.accepted_per_position[position] += int(position < accepted)
