"""Which callers will post their next item soon, and how long they take to.

A caller that answers each outcome with its next item (a sequence's verify stream) is *expected*
from the moment its outcome goes out until that item arrives, after about the gap such callers
have taken lately. The step loop holds a batch for expected callers not in it yet when the step
they would otherwise miss is worth more than the wait of those present, and never longer than a
step costs: without holds, sequences whose rounds all cross the network split into alternating
partial batches for good (measured at concurrency 4: steps of 1 and 3 sequences, never 4), each
costing nearly a full forward. Nothing expected, no hold.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

GAP_WINDOW = 32        # recent gaps kept per kind of caller
GAP_QUANTILE = 0.9     # hold for this quantile of the recent gaps ...
GAP_MARGIN = 1.25      # ... times this ...
GAP_SLACK = 0.0005     # ... plus this (event-loop and scheduler jitter), in seconds
MIN_GAPS = 4           # gaps measured before the quantile is trusted (until then: hold up to the limit)


@dataclass(slots=True)
class Expected:
    since: float       # monotonic time the caller's outcome went out
    quick: bool        # will be answered in this process (an autonomous round): held for as such callers take
    held: bool = True  # still worth holding for (False once a hold for it ran out)


@dataclass(slots=True)
class Arrivals:
    expected: dict[str, Expected] = field(default_factory=dict)
    gaps: dict[bool, deque[float]] = field(
        default_factory=lambda: {quick: deque(maxlen=GAP_WINDOW) for quick in (False, True)})
    holds: int = 0             # batches held for expected callers
    hold_seconds: float = 0.0  # spent holding
    late: int = 0              # callers a hold ran out on

    def expect(self, key: str, quick: bool, now: float) -> None:
        self.expected[key] = Expected(now, quick)

    def arrived(self, key: str, now: float, quick: bool = False) -> None:
        """`quick`: posted in this process right after the outcome (timed apart from network gaps)."""
        entry = self.expected.pop(key, None)
        if entry is not None:
            self.gaps[quick].append(now - entry.since)

    def forget(self, key: str) -> None:
        """The caller is gone (its stream ended)."""
        self.expected.pop(key, None)

    def gap(self, quick: bool) -> float | None:
        """How long to wait for such a caller after its outcome (None: too few gaps measured)."""
        recent = sorted(self.gaps[quick])
        if len(recent) < MIN_GAPS:
            return None
        return recent[min(len(recent) - 1, int(GAP_QUANTILE * len(recent)))] * GAP_MARGIN + GAP_SLACK

    def hold_until(self, present: set[str], num_present: int, now: float, step_cost: float,
                   limit: float) -> float | None:
        """When to stop holding a batch of `num_present` items (from the callers in `present`)
        for expected others; None: do not hold. Holding until the j-th expected arrival pays
        when the j callers it brings in, each spared the wait for the next step (`step_cost`),
        outweigh the wait of those present: j * step_cost > num_present * (due_j - now). Never
        past `limit` seconds from now. Four sequences whose rounds all cross the network then
        share each step; one late sequence among three chained rounds joins the next step."""
        gaps = {quick: self.gap(quick) for quick in (False, True)}
        dues = []
        for key, entry in self.expected.items():
            if key in present or not entry.held:
                continue
            gap = gaps[entry.quick]
            due = entry.since + (limit if gap is None else gap)
            if now < due <= now + limit:
                dues.append(due)
        best, best_gain = None, 0.0
        for joined, due in enumerate(sorted(dues), start=1):
            gain = joined * step_cost - num_present * (due - now)
            if gain > best_gain:
                best, best_gain = due, gain
        return best

    def give_up(self, present: set[str]) -> None:
        """A hold ran out: the callers still missing are not held for again until they arrive."""
        for key, entry in self.expected.items():
            if key not in present and entry.held:
                entry.held = False
                self.late += 1
