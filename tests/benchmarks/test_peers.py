"""The peer benchmark's interleaved rounds (`benchmarks/peers.py --rounds`): the order systems are
measured in, and a cell as the median over rounds. No speed threshold: benchmarks are not timed
tests."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_benchmark", PEERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_system_is_measured_once_per_round_and_concurrency_and_none_always_goes_first(peers):
    order = peers.interleaved_order(3, [1, 4], rounds=3)
    assert Counter((r, c, s) for r, c, s in order) == Counter(
        {(r, c, s): 1 for r in range(3) for c in (1, 4) for s in range(3)})
    assert [c for _, c, _ in order] == [1, 1, 1, 4, 4, 4] * 3  # a concurrency on every system, then the next
    firsts = [order[i][2] for i in range(0, len(order), 3)]
    assert set(firsts) == {0, 1, 2}  # the systems' order rotates
    followers = Counter((order[i][2], order[i + 1][2]) for i in range(len(order) - 1) if i % 3 != 2)
    assert len(followers) > 3  # not always the same neighbour after the same system


def test_a_cell_is_the_median_round_with_every_rounds_figure(peers):
    rows = [peers.Row("a", 4, 32, 4096, seconds, round(4096 / seconds, 1), [f"round {i}"])
            for i, seconds in enumerate((16.0, 12.0, 20.0))]
    cell = peers.median_row(rows)
    assert cell.tokens_per_s == 256.0 and cell.seconds == 16.0  # 341.3, 256.0, 204.8: the middle one
    assert cell.runs == [256.0, 341.3, 204.8] and cell.texts == ["round 0"]
    line = peers.table([cell], [4], {"a": "32/32"}, "a").splitlines()[-1]
    assert line == "| a | 256.0 (204.8-341.3) | 32/32 |"
    assert peers.median_row(rows[:2]).tokens_per_s == 256.0  # of two, the lower
