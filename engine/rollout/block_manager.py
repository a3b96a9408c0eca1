"""Fixed-size KV blocks: free list, reference counts, fork with copy-on-write.

A sequence owns a block table (physical block ids, in token order). `fork` gives a child
the parent's table and bumps every block's count: a GRPO group prefills its prompt once
and its G samples share those blocks. Before a sequence writes into a block that others
share (the partial last block of the prompt), `reserve` copies it to a fresh block —
copy-on-write — and reports the copy so the cache can move the data.
"""
from __future__ import annotations

from collections import deque


class NoFreeBlocks(RuntimeError):
    """The cache has no free block for this request; the scheduler preempts or waits."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.ref = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        if not self.free:
            raise NoFreeBlocks("no free KV block")
        block = self.free.popleft()
        self.ref[block] = 1
        return block

    def release(self, table: list[int]) -> None:
        for block in table:
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free.append(block)
        table.clear()

    def fork(self, table: list[int]) -> list[int]:
        for block in table:
            self.ref[block] += 1
        return list(table)

    def cost(self, table: list[int], num_cached: int, new_tokens: int) -> int:
        """Blocks `reserve` would take: new blocks plus a copy of a shared partial block."""
        need = self.blocks_for(num_cached + new_tokens) - len(table)
        if new_tokens and num_cached % self.block_size and self.ref[table[-1]] > 1:
            need += 1
        return max(need, 0)

    def reserve(self, table: list[int], num_cached: int, new_tokens: int) -> list[tuple[int, int]]:
        """Make room for `new_tokens` after `num_cached` tokens. -> copies (src, dst) to do
        before writing. All-or-nothing: raises NoFreeBlocks and changes nothing if short."""
        if self.cost(table, num_cached, new_tokens) > self.num_free:
            raise NoFreeBlocks(f"need {self.cost(table, num_cached, new_tokens)} blocks, {self.num_free} free")
        copies = []
        if new_tokens and num_cached % self.block_size and self.ref[table[-1]] > 1:
            src = table[-1]
            dst = self._take()
            self.ref[src] -= 1
            table[-1] = dst
            copies.append((src, dst))
        while len(table) < self.blocks_for(num_cached + new_tokens):
            table.append(self._take())
        return copies
