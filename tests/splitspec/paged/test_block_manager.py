"""Block manager: unit tests and a hypothesis state machine over allocate / append / rollback /
commit / fork / free that also simulates the pool's contents, so prefix reuse and copy-on-write
are checked for what each slot holds, not only for bookkeeping."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from splitspec.paged.block_manager import BlockManager

BLOCK = 4


def test_allocate_append_truncate_free():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    assert manager.allocate("a", list(range(6))) == 0
    assert len(manager.tables["a"].block_ids) == 2 and manager.num_free_blocks == 6
    slots, copies = manager.append_slots("a", 5)  # 11 tokens -> 3 blocks
    assert len(slots) == 5 and copies == [] and manager.num_free_blocks == 5
    manager.truncate("a", 7)  # rejected draft tokens: third block empties and returns at once
    assert len(manager.tables["a"].block_ids) == 2 and manager.num_free_blocks == 6
    assert manager.free("a") and manager.num_free_blocks == 8


def test_prefix_blocks_are_shared_and_survive_their_owner():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    prompt = list(range(10))
    manager.allocate("a", prompt)
    manager.commit("a", prompt)
    assert manager.allocate("b", prompt + [99]) == 8  # two full blocks reused
    shared = manager.tables["a"].block_ids[:2]
    assert manager.tables["b"].block_ids[:2] == shared
    assert [manager.blocks[b].ref_count for b in shared] == [2, 2]
    manager.free("a")
    manager.free("b")
    assert manager.allocate("c", prompt) == 8  # still cached after both finished
    assert manager.stats().prefix_hit_rate == pytest.approx(4 / 6)  # a: 0 of 2, b: 2 of 2, c: 2 of 2


def test_whole_prompt_cached_still_computes_its_last_token():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    manager.allocate("a", list(range(8)))
    manager.commit("a", list(range(8)))
    assert manager.allocate("b", list(range(8))) == 4  # the block holding token 7 is recomputed


def test_fork_copies_a_shared_partial_block_on_write():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    manager.allocate("a", list(range(6)))
    manager.fork("a", "b")
    slots, copies = manager.append_slots("b", 1)
    src = manager.tables["a"].block_ids[1]
    assert copies == [(src, manager.tables["b"].block_ids[1])] and src != copies[0][1]
    assert slots == [copies[0][1] * BLOCK + 2]


def test_a_fork_that_rolls_back_into_a_cached_block_writes_a_copy():
    """Found by the state machine: b forked a before a committed block 0; b may roll back into it,
    but its next write must not change what the prefix cache serves."""
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    manager.allocate("a", [0, 1, 2, 3])
    manager.fork("a", "b")
    manager.commit("a", [0, 1, 2, 3])
    manager.free("a")
    cached_block = manager.tables["b"].block_ids[0]
    manager.truncate("b", 1)
    slots, copies = manager.append_slots("b", 1)
    assert copies == [(cached_block, manager.tables["b"].block_ids[0])] and slots[0] // BLOCK != cached_block
    assert manager.allocate("c", [0, 1, 2, 3, 4]) == 4 and manager.tables["c"].block_ids[0] == cached_block


def test_cannot_allocate_beyond_the_pool():
    manager = BlockManager(num_blocks=2, block_size=BLOCK)
    assert manager.can_allocate(list(range(8)))
    assert not manager.can_allocate(list(range(8)), lookahead=1)
    with pytest.raises(MemoryError):
        manager.allocate("a", list(range(9)))
    assert manager.num_free_blocks == 2 and manager.tables == {}


def test_committed_tokens_cannot_be_rolled_back():
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    manager.allocate("a", list(range(9)))
    manager.commit("a", list(range(9)))
    with pytest.raises(ValueError):
        manager.truncate("a", 7)


class BlockMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(4, 24))
    def setup(self, num_blocks):
        self.manager = BlockManager(num_blocks, BLOCK)
        self.pool: dict[int, int] = {}         # slot -> token written there
        self.tokens: dict[str, list[int]] = {}  # what each sequence's slots must hold
        self.committed: dict[str, int] = {}
        self.next_id = 0

    def write(self, seq_id, slots, copies, tokens):
        for src, dst in copies:
            for offset in range(BLOCK):
                if src * BLOCK + offset in self.pool:
                    self.pool[dst * BLOCK + offset] = self.pool[src * BLOCK + offset]
        for slot, token in zip(slots, tokens):
            self.pool[slot] = token

    @rule(data=st.data(), length=st.integers(1, 14))
    def allocate(self, data, length):
        # tokens from a tiny alphabet with a common stem, so prefixes repeat
        tokens = [0, 1, 2, 3, 4, 5][: min(length, 6)] + data.draw(st.lists(st.integers(0, 2), min_size=max(0, length - 6), max_size=max(0, length - 6)))
        seq_id = f"s{self.next_id}"
        self.next_id += 1
        if not self.manager.can_allocate(tokens):
            with pytest.raises(MemoryError):
                self.manager.allocate(seq_id, tokens)
            return
        cached = self.manager.allocate(seq_id, tokens)
        assert cached < len(tokens) and cached % BLOCK == 0
        for position in range(cached):  # reused blocks already hold these tokens
            assert self.pool[self.manager.slots(seq_id, position, position + 1)[0]] == tokens[position]
        self.write(seq_id, self.manager.slots(seq_id, cached, len(tokens)), [], tokens[cached:])
        self.tokens[seq_id], self.committed[seq_id] = tokens, 0

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), count=st.integers(1, 9))
    def append(self, data, count):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        new = data.draw(st.lists(st.integers(0, 2), min_size=count, max_size=count))
        if not self.manager.can_append(seq_id, count):
            with pytest.raises(MemoryError):
                self.manager.append_slots(seq_id, count)
            return
        slots, copies = self.manager.append_slots(seq_id, count)
        self.write(seq_id, slots, copies, new)
        self.tokens[seq_id] = self.tokens[seq_id] + new

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def rollback(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        low = self.manager.tables[seq_id].num_committed_blocks * BLOCK
        keep = data.draw(st.integers(low, len(self.tokens[seq_id])))
        self.manager.truncate(seq_id, keep)
        self.tokens[seq_id] = self.tokens[seq_id][:keep]
        self.committed[seq_id] = min(self.committed[seq_id], keep)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def commit(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        upto = data.draw(st.integers(self.committed[seq_id], len(self.tokens[seq_id])))
        self.manager.commit(seq_id, self.tokens[seq_id][:upto])
        self.committed[seq_id] = upto

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = f"s{self.next_id}"
        self.next_id += 1
        self.manager.fork(parent, child)
        self.tokens[child], self.committed[child] = list(self.tokens[parent]), self.committed[parent]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        assert self.manager.free(seq_id)
        del self.tokens[seq_id], self.committed[seq_id]

    @invariant()
    def bookkeeping_is_consistent(self):
        manager = self.manager
        holders = {b.block_id: 0 for b in manager.blocks}
        for table in manager.tables.values():
            assert len(table.block_ids) == manager.blocks_for(table.num_tokens)
            assert len(set(table.block_ids)) == len(table.block_ids)
            for block_id in table.block_ids:
                holders[block_id] += 1
        for block in manager.blocks:
            assert block.ref_count == holders[block.block_id]
            assert (block.block_id in manager.free_ids) == (block.ref_count == 0)
        for key, block_id in manager.cached.items():
            assert manager.blocks[block_id].key == key

    @invariant()
    def every_sequence_reads_its_own_tokens(self):
        for seq_id, tokens in self.tokens.items():
            slots = self.manager.slots(seq_id, 0, len(tokens))
            assert [self.pool.get(slot) for slot in slots] == tokens

    def teardown(self):
        for seq_id in list(self.tokens):
            self.manager.free(seq_id)
        assert self.manager.num_free_blocks == self.manager.num_blocks


TestBlockMachine = BlockMachine.TestCase
TestBlockMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
