"""Same seed, same output; different seeds, different outputs (speculation on, temperature 1)."""

from __future__ import annotations

from splitspec.v1 import coordinator_pb2
from tests.support import collect, start_stack


async def test_seed_makes_a_request_reproducible(tiny):
    stack = await start_stack(tiny["target"], tiny["draft_noisy"], k=4)
    try:
        def request(seed: int) -> coordinator_pb2.GenerateRequest:
            return coordinator_pb2.GenerateRequest(prompt="seeded", max_tokens=40, temperature=1.0, seed=seed,
                                                   ignore_eos=True)

        first = await collect(stack.stub, request(1234))
        again = await collect(stack.stub, request(1234))
        others = [await collect(stack.stub, request(seed)) for seed in (1, 2, 3)]
        assert first["token_ids"] == again["token_ids"] and first["text"] == again["text"]
        assert all(other["token_ids"] != first["token_ids"] for other in others)
        assert len({tuple(o["token_ids"]) for o in others}) == 3
        assert first["last"].spec.draft_tokens > 0
    finally:
        await stack.stop()
