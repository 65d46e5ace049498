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


@needs_two_cores
def test_graphs_are_compiled_for_both_thread_counts_before_serving(fresh):
    """torch.compile guards on torch's thread count: warmed up under the plan, a step beside the
    drafts (fewer threads) and one on every core run without compiling anything more."""
    from splitspec.paged.cache import CacheConfig, build_paged_cache
    from splitspec.paged.runner import Chunk

    every = frozenset(sorted(os.sched_getaffinity(0)))
    plan = CorePlan(every, frozenset(sorted(every)[1:]))
    threads = torch.get_num_threads()
    try:
        _, runner = _on_a_thread(lambda: build_paged_cache(fresh("target"), CacheConfig(num_blocks=64, block_size=4),
                                                           compile=True))
        _on_a_thread(lambda: plan.warm_up(runner.warm_up))
        compiled = runner.compiles
        assert plan.current is None  # the model thread sets its own cores at its first step

        def steps():
            for busy, chunk in ((True, Chunk([5, 6], 8, [8, 9], [0, 1, 2], 2)), (False, Chunk([5], 8, [8], [0, 1, 2], 1)),
                                (True, Chunk([5], 8, [8], [0, 1, 2], 1))):
                plan.use(drafts_busy=busy)
                runner.forward([chunk])

        _on_a_thread(steps)
        assert runner.compiles == compiled, f"{runner.compiles - compiled} graphs compiled while serving"
    finally:
        torch.set_num_threads(threads)
