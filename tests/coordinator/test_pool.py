from __future__ import annotations

from coordinator.pool import Endpoint, WorkerPool, resolve
from splitspec.v1 import common_pb2


class FakeClient:
    async def close(self) -> None:
        pass


def test_resolve_expands_names_and_keeps_ips():
    assert resolve("127.0.0.1:5000") == ["127.0.0.1:5000"]
    assert resolve("localhost:5000") == ["127.0.0.1:5000"]  # one replica, not one per address family
    assert resolve("no-such-host.invalid:5000") == []


def test_pick_prefers_the_least_pinned_then_the_most_free_blocks():
    pool = WorkerPool("target", [], lambda address: FakeClient())
    a, b, c = (Endpoint(name, FakeClient(), healthy=True) for name in ("a", "b", "c"))
    a.pinned, b.pinned, c.pinned = 2, 1, 1
    b.stats = common_pb2.WorkerStats(blocks_free=10)
    c.stats = common_pb2.WorkerStats(blocks_free=50)
    pool.endpoints = {e.address: e for e in (a, b, c)}
    assert pool.pick() is c
    assert pool.pick(exclude={"c"}) is b
    pool.mark_failed(b)
    assert pool.pick(exclude={"c"}) is a
    assert pool.pick(exclude={"a", "c"}) is None
    tried: set[str] = {"c"}
    assert pool.pin(tried) is a and tried == {"a", "c"} and a.pinned == 3  # recorded and counted
    assert pool.pin(tried) is None and a.pinned == 3
