"""`splitspec up`'s core plan: which cores the target gets, and which the drafts (with a draft) or
the coordinator and gateway (without) share."""

from __future__ import annotations

import pytest

from entrypoints import cli


@pytest.mark.parametrize("cores, with_draft, target, others", [
    ([0], True, [], []),                          # one core: nothing pinned
    ([0, 1], True, [1], [0]),                     # draft and target apart
    ([0, 1, 2, 3, 4, 5, 6, 7], True, [2, 3, 4, 5, 6, 7], [0, 1]),  # a quarter for the drafts
    ([0, 1], False, [0, 1], [0]),                 # target only, 2 cores: it takes both
    ([0, 1, 2, 3], False, [1, 2, 3], [0]),        # more: one left to the services
])
def test_split_cores(monkeypatch, cores, with_draft, target, others):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(cores))
    assert cli._split_cores(with_draft) == (target, others)
