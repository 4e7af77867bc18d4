"""BlockPool: the KV-cache blocks, their reference counts and the free queue.

A block is a slot range of ``block_size`` tokens in every layer's KV tensor.
Blocks are handed out from the head of a doubly linked free queue and returned
to its tail, so the queue is in least-recently-freed order; prefix caching will
evict from the head and take cached blocks out of the middle in O(1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One KV block.

    Attributes:
        block_id: index into the layer KV tensors' block dimension.
        ref_cnt: number of requests holding the block.
    """

    block_id: int
    ref_cnt: int = 0
    prev_free: KVCacheBlock | None = None
    next_free: KVCacheBlock | None = None
    in_free_queue: bool = False

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt})"


class FreeBlockQueue:
    """Doubly linked list of free blocks; O(1) pop from the head, append to the
    tail and removal from the middle."""

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self._head: KVCacheBlock | None = None
        self._tail: KVCacheBlock | None = None
        self.num_free_blocks = 0
        for b in blocks:
            self.append(b)

    def append(self, block: KVCacheBlock) -> None:
        assert not block.in_free_queue, f"{block} is already free"
        block.prev_free, block.next_free = self._tail, None
        if self._tail is None:
            self._head = block
        else:
            self._tail.next_free = block
        self._tail = block
        block.in_free_queue = True
        self.num_free_blocks += 1

    def popleft(self) -> KVCacheBlock:
        if self._head is None:
            raise ValueError("no free blocks")
        block = self._head
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        assert block.in_free_queue, f"{block} is not in the free queue"
        if block.prev_free is None:
            self._head = block.next_free
        else:
            block.prev_free.next_free = block.next_free
        if block.next_free is None:
            self._tail = block.prev_free
        else:
            block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        block.in_free_queue = False
        self.num_free_blocks -= 1

    def block_ids(self) -> list[int]:
        """Free block ids, head first (for tests and debugging)."""
        out, b = [], self._head
        while b is not None:
            out.append(b.block_id)
            b = b.next_free
        return out


class BlockPool:
    """All KV blocks of the engine.

    Args:
        num_blocks: total blocks (every layer has this many).

    NOTE: a block is in the free queue iff its ref_cnt is 0.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)

    def get_num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` free blocks, each with ref_cnt 1.

        Raises:
            ValueError: fewer than ``num_blocks`` are free.
        """
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(f"cannot get {num_blocks} blocks: only {self.get_num_free_blocks()} are free")
        out = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            assert block.ref_cnt == 0
            block.ref_cnt = 1
            out.append(block)
        return out

    def free_blocks(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference to each block; blocks reaching 0 go to the free
        queue's tail in the given order (so pass tail blocks first to have them
        reused first)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"{block} freed twice"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def get_usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - self.get_num_free_blocks() / self.num_blocks
