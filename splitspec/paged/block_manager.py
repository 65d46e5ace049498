"""Pure-Python block manager: free list, per-sequence block tables, reference counts, prefix cache.

A sequence's KV lives in fixed-size blocks; slot s of block b is pool position b * block_size + s.
Blocks whose tokens are all *committed* (accepted, never to be rolled back) are registered under a
content key (parent block's key, the block's token ids), so a later sequence whose tokens start the
same way reuses them (reference counted). Freed blocks keep their content until reallocated (the
free list is oldest-first), so a finished request's prefix stays reusable. Writing into a block
that another table also holds first copies it (copy-on-write); the copies are reported to the
caller, which moves the tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

ContentKey = tuple[int, tuple[int, ...]]  # (parent content id, token ids of the block)


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    key: ContentKey | None = None  # set once the block is full of committed tokens
    content_id: int = -1           # unique id of `key`, the parent link of the next block


@dataclass(slots=True)
class BlockTable:
    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0            # slots in use
    num_committed_blocks: int = 0  # leading blocks registered in the prefix cache


@dataclass(slots=True)
class BlockStats:
    num_blocks: int
    num_free: int
    prefix_queries: int
    prefix_hits: int

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def utilization(self) -> float:
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[ContentKey, int] = {}
        self.tables: dict[str, BlockTable] = {}
        self._next_content_id = 0
        self.prefix_queries = 0  # full prompt blocks looked up
        self.prefix_hits = 0     # of which found in the cache

    # --- sizes -----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def stats(self) -> BlockStats:
        return BlockStats(self.num_blocks, self.num_free_blocks, self.prefix_queries, self.prefix_hits)

    # --- prefix cache ------------------------------------------------------------------------
    def _cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Blocks already holding a prefix of `token_ids`; never the block of the last token,
        whose logits the caller needs to compute."""
        found: list[int] = []
        parent = -1
        for start in range(0, len(token_ids) - 1 - (len(token_ids) - 1) % self.block_size, self.block_size):
            block_id = self.cached.get((parent, tuple(token_ids[start : start + self.block_size])))
            if block_id is None:
                break
            found.append(block_id)
            parent = self.blocks[block_id].content_id
        return found

    def _take_free(self, block_id: int | None = None) -> Block:
        if block_id is None:
            block_id, _ = self.free_ids.popitem(last=False)
            block = self.blocks[block_id]
            if block.key is not None:  # evict the old content
                del self.cached[block.key]
                block.key, block.content_id = None, -1
        else:
            del self.free_ids[block_id]
            block = self.blocks[block_id]
        block.ref_count = 1
        return block

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_ids[block_id] = None

    # --- allocation ---------------------------------------------------------------------------
    def can_allocate(self, token_ids: list[int], lookahead: int = 0, reuse: bool = True) -> bool:
        cached = self._cached_prefix(token_ids) if reuse else []
        reusable_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        needed = self.blocks_for(len(token_ids) + lookahead) - len(cached)
        return needed + reusable_free <= self.num_free_blocks

    def allocate(self, seq_id: str, token_ids: list[int], reuse: bool = True) -> int:
        """Create `seq_id`'s table for `token_ids`. Returns how many leading tokens are already
        cached (their KV need not be computed); the rest get fresh slots. `reuse=False`: none are
        taken from the prefix cache (the caller needs logits at every position)."""
        if seq_id in self.tables:
            raise KeyError(f"sequence {seq_id} already has blocks")
        if not self.can_allocate(token_ids, reuse=reuse):
            raise MemoryError("not enough free blocks")
        cached = self._cached_prefix(token_ids) if reuse else []
        self.prefix_queries += (len(token_ids) - 1) // self.block_size
        self.prefix_hits += len(cached)
        for block_id in cached:
            if self.blocks[block_id].ref_count == 0:
                self._take_free(block_id)
            else:
                self.blocks[block_id].ref_count += 1
        table = BlockTable(list(cached), len(cached) * self.block_size, len(cached))
        self.tables[seq_id] = table
        self.append_slots(seq_id, len(token_ids) - table.num_tokens)
        return len(cached) * self.block_size

    def can_append(self, seq_id: str, num_new: int) -> bool:
        return self._blocks_to_append(self.tables[seq_id], num_new) <= self.num_free_blocks

    def _blocks_to_append(self, table: BlockTable, num_new: int) -> int:
        needed = self.blocks_for(table.num_tokens + num_new) - len(table.block_ids)
        if num_new and table.num_tokens % self.block_size and self._read_only(table.block_ids[-1]):
            needed += 1  # copy-on-write of the partly filled last block
        return needed

    def _read_only(self, block_id: int) -> bool:
        """Shared with another sequence, or registered in the prefix cache (a sequence that forked
        before the commit may have rolled back into it): writes go to a copy."""
        block = self.blocks[block_id]
        return block.ref_count > 1 or block.key is not None

    def append_slots(self, seq_id: str, num_new: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Reserve `num_new` slots at the end of the sequence. Returns (slot ids, copies), where
        copies are (src block, dst block) pairs the caller must copy before writing."""
        table = self.tables[seq_id]
        if self._blocks_to_append(table, num_new) > self.num_free_blocks:
            raise MemoryError("not enough free blocks")
        copies: list[tuple[int, int]] = []
        if num_new and table.num_tokens % self.block_size:
            last = table.block_ids[-1]
            if self._read_only(last):
                fresh = self._take_free()
                copies.append((last, fresh.block_id))
                self._release(last)
                table.block_ids[-1] = fresh.block_id
        start = table.num_tokens
        table.num_tokens += num_new
        while len(table.block_ids) < self.blocks_for(table.num_tokens):
            table.block_ids.append(self._take_free().block_id)
        return self.slots(seq_id, start, table.num_tokens), copies

    def slots(self, seq_id: str, start: int, end: int) -> list[int]:
        table, size = self.tables[seq_id], self.block_size
        return [table.block_ids[p // size] * size + p % size for p in range(start, end)]

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Roll back to `num_tokens` slots; blocks left empty return to the pool at once."""
        table = self.tables[seq_id]
        if num_tokens > table.num_tokens:
            raise ValueError("truncate cannot grow a sequence")
        if num_tokens < table.num_committed_blocks * self.block_size:
            raise ValueError("cannot roll back committed tokens")
        table.num_tokens = num_tokens
        while len(table.block_ids) > self.blocks_for(num_tokens):
            self._release(table.block_ids.pop())

    def commit(self, seq_id: str, token_ids: list[int]) -> None:
        """`token_ids` are the sequence's committed tokens (a prefix of its slots); register every
        block they fill completely in the prefix cache."""
        table = self.tables[seq_id]
        full = min(len(token_ids), table.num_tokens) // self.block_size
        size = self.block_size
        for index in range(table.num_committed_blocks, full):
            block = self.blocks[table.block_ids[index]]
            parent = self.blocks[table.block_ids[index - 1]].content_id if index else -1
            key = (parent, tuple(token_ids[index * size : (index + 1) * size]))
            if block.key is None and key not in self.cached:
                block.key, block.content_id = key, self._next_content_id
                self._next_content_id += 1
                self.cached[key] = block.block_id
            elif block.key is None:  # same content computed twice: keep the first copy cached
                block.content_id = self.blocks[self.cached[key]].content_id
        table.num_committed_blocks = max(table.num_committed_blocks, full)

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares all of the parent's blocks (copy-on-write on its next append)."""
        parent = self.tables[parent_id]
        for block_id in parent.block_ids:
            self.blocks[block_id].ref_count += 1
        self.tables[child_id] = BlockTable(list(parent.block_ids), parent.num_tokens, parent.num_committed_blocks)

    def rename(self, seq_id: str, new_id: str) -> None:
        """Hand `seq_id`'s table to `new_id` (a speculative fork that turned out right)."""
        if new_id in self.tables:
            raise KeyError(f"sequence {new_id} already has blocks")
        self.tables[new_id] = self.tables.pop(seq_id)

    def free(self, seq_id: str) -> bool:
        table = self.tables.pop(seq_id, None)
        if table is None:
            return False
        for block_id in reversed(table.block_ids):  # tail first: prefix blocks stay cached longest
            self._release(block_id)
        return True
