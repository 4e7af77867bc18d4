"""KVCacheManager: which blocks each request holds (its block table)."""

from __future__ import annotations

from ember.core.block_pool import BlockPool, KVCacheBlock
from ember.request import Request


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


class KVCacheManager:
    """Allocates and frees KV blocks for requests.

    Args:
        num_blocks: blocks in the pool.
        block_size: tokens per block.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of KV blocks in use, in [0, 1]."""
        return self.block_pool.get_usage()

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[KVCacheBlock] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``.

        The request must hold enough blocks for ``num_computed_tokens +
        num_new_tokens`` tokens afterwards.

        Returns:
            The newly allocated blocks (possibly empty), or None if the pool has
            too few free blocks (nothing is allocated then).
        """
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        needed = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size) - len(blocks)
        if needed <= 0:
            return []
        if needed > self.block_pool.get_num_free_blocks():
            return None
        new_blocks = self.block_pool.get_new_blocks(needed)
        blocks.extend(new_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release every block of ``request``; tail blocks are freed first so
        that they are the first to be reused."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.block_pool.free_blocks(list(reversed(blocks)))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]
