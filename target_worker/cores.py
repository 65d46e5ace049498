"""The target's cores step by step: only its own while a step verifies a proposal (the drafts work
beside it), every core it may use for the other steps (target-only rounds, prefills).

On a 2-core machine the draft has one core and the target the other while they speculate (with
overlap the draft proposes the next rounds during each verify). Where the coordinator's goodput
choice is k = 0 (a large batch), the draft idles and the target's autonomous steps take both
cores, as `splitspec up --target T` alone would: speculation then costs nothing against the
target alone. The choice is per step, on the model thread: its affinity (Linux: a thread's own)
and torch's thread count, which the CPU kernels and inductor's OpenMP regions follow. Compiled
graphs are compiled per thread count, so the worker compiles them for both before it serves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(slots=True)
class CorePlan:
    every: frozenset[int]          # the cores of a step the drafts are idle for
    beside_drafts: frozenset[int]  # the target's own, for a step the drafts work beside
    current: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if not self.beside_drafts or not self.beside_drafts <= self.every:
            raise ValueError(f"--verify-cores {sorted(self.beside_drafts)} must be some of the target's cores "
                             f"{sorted(self.every)}")

    @classmethod
    def for_this_process(cls, beside_drafts: set[int]) -> "CorePlan":
        """Every core this process may run on (its --cpu-cores), keeping to `beside_drafts` when asked."""
        return cls(frozenset(os.sched_getaffinity(0)), frozenset(beside_drafts))

    def use(self, drafts_busy: bool) -> None:
        """Run the calling thread's next parallel regions on the plan's cores for this step."""
        cores = self.beside_drafts if drafts_busy else self.every
        if cores != self.current:
            os.sched_setaffinity(0, cores)  # 0: the calling thread
            torch.set_num_threads(len(cores))
            self.current = cores

    def warm_up(self, compile_graphs: Callable[[], None]) -> None:
        """Run `compile_graphs` at each kind of step's thread count (torch.compile guards on it: the
        first steps beside the drafts otherwise compiled two graphs again while serving, 14.7 and
        8.8 s on this 2-core VM, every sequence waiting). Every core's count runs again although the
        graphs were built there: with the fewer threads' graph compiled, a step on every core
        compiled once more. Leaves torch on every core's count."""
        try:
            for drafts_busy in (True, False):
                self.use(drafts_busy)
                compile_graphs()
        finally:
            self.current = None  # the calling thread is not the model thread: that one sets its own
