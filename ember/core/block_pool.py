"""BlockPool: the KV-cache blocks, their reference counts, the free queue and
the prefix-cache map.

A block is a slot range of ``block_size`` tokens in every layer's KV tensor.
Blocks are handed out from the head of a doubly linked free queue and returned
to its tail, so the queue is in least-recently-freed order. A full block that
was computed for some request keeps its hash (see ``kv_cache_utils``) when
freed: until the free queue hands it out again, a new request with the same
prefix can take it back out of the middle of the queue in O(1) (a cache hit).
Handing it out for new tokens evicts it (its hash is dropped), so cached blocks
are evicted least-recently-used first. Design as in vLLM's v1 ``BlockPool``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ember.core.kv_cache_utils import BlockHash


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One KV block.

    Attributes:
        block_id: index into the layer KV tensors' block dimension.
        ref_cnt: number of requests holding the block.
        block_hash: the prefix-cache hash of its content when it is a cached
            full block (kept while it sits in the free queue), else None.
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    prev_free: KVCacheBlock | None = None
    next_free: KVCacheBlock | None = None
    in_free_queue: bool = False

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else f", hash={self.block_hash[:4].hex()}"
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}{cached})"


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
        num_partitions: equal ranges of consecutive block ids, each with its
            own free queue (data-parallel attention: partition r is rank r's
            cache); a request takes all its blocks from one. ``num_blocks``
            must be a multiple.

    NOTE: a block is in the free queue iff its ref_cnt is 0; a block is in
    ``cached_block_hash_to_block`` iff its ``block_hash`` is set, and then it
    is the map's value for that hash.
    """

    def __init__(self, num_blocks: int, num_partitions: int = 1) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if num_partitions < 1 or num_blocks % num_partitions:
            raise ValueError(f"num_blocks {num_blocks} is not a multiple of num_partitions {num_partitions}")
        self.num_blocks, self.num_partitions = num_blocks, num_partitions
        self.blocks_per_partition = per = num_blocks // num_partitions
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queues = [FreeBlockQueue(self.blocks[p * per: (p + 1) * per]) for p in range(num_partitions)]
        self.free_block_queue = self.free_block_queues[0]  # the only one with one partition
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}
        self.num_evicted_blocks = 0

    def get_num_free_blocks(self, partition: int | None = None) -> int:
        """Free blocks of ``partition`` (None: of all partitions)."""
        if partition is None and self.num_partitions > 1:
            return sum(q.num_free_blocks for q in self.free_block_queues)
        return self.free_block_queues[partition or 0].num_free_blocks

    def _queue_of(self, block: KVCacheBlock) -> FreeBlockQueue:
        if self.num_partitions == 1:
            return self.free_block_queue
        return self.free_block_queues[block.block_id // self.blocks_per_partition]

    def get_new_blocks(self, num_blocks: int, partition: int = 0) -> list[KVCacheBlock]:
        """Take ``num_blocks`` free blocks of ``partition``, each with ref_cnt
        1, from the head of its free queue (least recently freed first),
        evicting cached ones.

        Raises:
            ValueError: fewer than ``num_blocks`` are free there.
        """
        queue = self.free_block_queues[partition]
        if num_blocks > queue.num_free_blocks:
            raise ValueError(f"cannot get {num_blocks} blocks: only {queue.num_free_blocks} are free")
        out = []
        for _ in range(num_blocks):
            block = queue.popleft()
            assert block.ref_cnt == 0
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        del self.cached_block_hash_to_block[block.block_hash]
        block.block_hash = None
        self.num_evicted_blocks += 1

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        """The cached block with this hash, if any (no reference is taken)."""
        return self.cached_block_hash_to_block.get(block_hash)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take one more reference to each (cache-hit) block; a block nobody
        held leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._queue_of(block).remove(block)
            block.ref_cnt += 1

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Register a held, full block under ``block_hash``.

        A block already cached (a cache hit) is left alone. If another block
        holds this hash already (two requests computed the same prefix at
        once), the map keeps that one and ``block`` stays uncached: it is
        reused as a plain block once freed.
        """
        assert block.ref_cnt > 0, f"{block} is not held"
        if block.block_hash is not None:
            assert block.block_hash == block_hash, f"{block} is cached under another hash"
            return
        if block_hash in self.cached_block_hash_to_block:
            return
        block.block_hash = block_hash
        self.cached_block_hash_to_block[block_hash] = block

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference to each block; blocks reaching 0 go to the free
        queue's tail in the given order (so pass tail blocks first to have them
        reused first). Cached blocks keep their hash there."""
        for block in blocks:
            assert block.ref_cnt > 0, f"{block} freed twice"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._queue_of(block).append(block)

    def get_usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - self.get_num_free_blocks() / self.num_blocks
