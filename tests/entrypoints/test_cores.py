"""`splitspec up`'s core plan: which cores the target gets, which it keeps to while drafts work
beside it, and which the drafts (with a draft) or the coordinator and gateway (without) share."""

from __future__ import annotations

import argparse

import pytest

from entrypoints import cli


@pytest.mark.parametrize("cores, with_draft, target, verify, others", [
    ([0], True, [], [], []),                          # one core: nothing pinned
    ([0, 1], True, [0, 1], [1], [0]),                 # the draft's core borrowed for target-only steps
    ([0, 1, 2, 3, 4, 5, 6, 7], True, list(range(8)), [2, 3, 4, 5, 6, 7], [0, 1]),  # a quarter for the drafts
    ([0, 1], False, [0, 1], [], [0]),                 # target only, 2 cores: it takes both
    ([0, 1, 2, 3], False, [1, 2, 3], [], [0]),        # more: one left to the services
])
def test_split_cores(monkeypatch, cores, with_draft, target, verify, others):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(cores))
    assert cli._split_cores(with_draft) == cli.CoreSplit(target, verify, others)


def _target_args(verify: str | None, **overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"verify_cores": verify, "tensor_parallel_size": 1, "threads": None, **overrides})


def test_verify_cores_must_be_some_of_the_workers_cores(monkeypatch):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1})
    assert cli._verify_cores(_target_args("1")) == {1}
    assert cli._verify_cores(_target_args(None)) is None
    with pytest.raises(ValueError, match="--verify-cores"):
        cli._verify_cores(_target_args("2"))
    with pytest.raises(ValueError, match="--verify-cores 'x'"):
        cli._verify_cores(_target_args("x"))
    with pytest.raises(ValueError, match="--verify-cores .* --tensor-parallel-size or --threads"):
        cli._verify_cores(_target_args("1", threads=2))
