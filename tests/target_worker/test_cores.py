"""The target's core plan: the model thread's affinity and torch's threads, step by step."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from target_worker.cores import CorePlan

needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a process on 2 or more cores")


def _on_a_thread(fn):
    """fn's result, run on a thread of its own (the plan changes the calling thread's affinity)."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    thread.join()
    return result["value"]


@needs_two_cores
def test_the_plan_moves_the_calling_thread_between_its_cores_and_all():
    every = frozenset(sorted(os.sched_getaffinity(0)))
    own = frozenset(sorted(every)[1:])

    def steps():
        plan, seen = CorePlan(every, own), []
        for busy in (True, True, False, True):
            plan.use(drafts_busy=busy)
            seen.append((frozenset(os.sched_getaffinity(0)), torch.get_num_threads()))
        return seen

    threads = torch.get_num_threads()
    assert _on_a_thread(steps) == [(own, len(own)), (own, len(own)), (every, len(every)), (own, len(own))]
    assert os.sched_getaffinity(0) == set(every)  # other threads keep theirs
    torch.set_num_threads(threads)


def test_verify_cores_outside_the_target_are_refused():
    with pytest.raises(ValueError, match="--verify-cores"):
        CorePlan(frozenset({0, 1}), frozenset({2}))
    with pytest.raises(ValueError, match="--verify-cores"):
        CorePlan(frozenset({0, 1}), frozenset())
