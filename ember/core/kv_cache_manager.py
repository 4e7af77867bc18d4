"""KVCacheManager: which blocks each request holds (its block table), prefix
hits, and the host-memory (swap) pool.

Prefix caching: when a request is admitted, every leading full block whose
chained hash is already cached is taken as is (:meth:`get_computed_blocks`);
only the remaining tokens are computed. Full blocks are registered in the cache
as soon as they are allocated for tokens the step computes (as vLLM's v1
``allocate_slots`` does), so requests admitted in the same step share them too.

NOTE: that sharing relies on every attention backend writing a step's new K/V
into the cache before any request of the step attends (write, then attend, per
layer): a request may hit a block another request of the same step is filling.
It also relies on no request being preempted in the step it was scheduled (the
scheduler only preempts requests it has not scheduled yet), so a cached block
always ends the step computed.
"""

from __future__ import annotations

from collections import deque

from ember.core.block_pool import BlockPool, KVCacheBlock
from ember.core.kv_cache_utils import update_block_hashes
from ember.core.stats import PrefixCacheStats
from ember.request import Request


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


class KVCacheManager:
    """Allocates and frees KV blocks for requests.

    Args:
        num_blocks: blocks in the (device) pool.
        block_size: tokens per block.
        enable_caching: share full blocks across requests by prefix hash.
        num_host_blocks: blocks in the host-memory pool that preemption by
            swap copies a request's blocks into (0: no swapping).
        num_partitions: data-parallel attention over this many ranks: the
            pool is cut into equal ranges of block ids (rank r's cache holds
            range r) and each request takes all its blocks from one range,
            the one with the most free blocks when it is admitted (see
            :mod:`ember.distributed.dp_attention`).

    Raises:
        ValueError: several partitions with prefix caching or swap space (a
            hit or a swap-in could cross partitions), or ``num_blocks`` not a
            multiple of ``num_partitions``.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 num_host_blocks: int = 0, num_partitions: int = 1) -> None:
        if num_partitions > 1 and (enable_caching or num_host_blocks):
            raise ValueError("a KV pool in several partitions supports neither prefix caching nor swap space")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.num_partitions = num_partitions
        self.block_pool = BlockPool(num_blocks, num_partitions)
        # req_id -> its partition (several partitions only), while it holds blocks.
        self.req_to_partition: dict[str, int] = {}
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # req_id -> how many leading blocks of its table went through cache_block.
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()
        self.num_host_blocks = num_host_blocks
        self.free_host_blocks: deque[int] = deque(range(num_host_blocks))
        self.req_to_host_blocks: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of KV blocks in use, in [0, 1]."""
        return self.block_pool.get_usage()

    # ---------------------------------------------------------- prefix cache
    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of leading full blocks of ``request`` that is cached.

        At most ``num_tokens - 1`` tokens are taken from the cache, so that at
        least one token is computed and there are logits to sample from. No
        reference is taken (pass the blocks to :meth:`allocate_slots`). A
        request that wants prompt log-probabilities takes none: the logits of
        every prompt position must be computed; nor does a pooling request (its
        pooling may need every position's hidden state).

        Returns:
            The cached blocks and the number of tokens they hold.
        """
        if not self.enable_caching or request.prompt_logprobs is not None or request.pooling_params is not None:
            return [], 0
        hashes = update_block_hashes(request, self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in hashes[:max_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_cache_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admission's lookup (tokens queried, tokens hit)."""
        if self.enable_caching:
            s = self.prefix_cache_stats
            s.requests += 1
            s.queries += num_tokens
            s.hits += num_hit_tokens

    def _cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the full blocks among the first ``num_tokens`` tokens."""
        if not self.enable_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = update_block_hashes(request, self.block_size)
        blocks = self.req_to_blocks[request.request_id]
        for i in range(start, num_full):
            self.block_pool.cache_block(blocks[i], hashes[i])
        self.num_cached_blocks[request.request_id] = num_full

    # ------------------------------------------------------------ partitions
    def partition_of(self, request: Request) -> int:
        """The partition ``request``'s blocks come from: its own while it
        holds blocks, else the one with the most free blocks (the lowest on
        a tie); always 0 with one partition."""
        if self.num_partitions == 1:
            return 0
        p = self.req_to_partition.get(request.request_id)
        if p is None:
            free = self.block_pool.get_num_free_blocks
            p = max(range(self.num_partitions), key=lambda q: (free(q), -q))
        return p

    def num_free_blocks(self, request: Request) -> int:
        """Free blocks that ``request`` could take (those of its partition)."""
        return self.block_pool.get_num_free_blocks(self.partition_of(request))

    # ------------------------------------------------------------ allocation
    def num_blocks_to_allocate(self, request: Request, num_new_tokens: int,
                               new_computed_blocks: list[KVCacheBlock] | None = None) -> int:
        """Free blocks :meth:`allocate_slots` would consume: new blocks plus
        cache hits that sit in the free queue."""
        hits = new_computed_blocks or []
        held = len(self.req_to_blocks.get(request.request_id, ()))
        total = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        new = max(0, cdiv(total, self.block_size) - held - len(hits))
        return new + sum(1 for b in hits if b.ref_cnt == 0)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None,
                       num_lookahead_tokens: int = 0) -> list[KVCacheBlock] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``.

        Args:
            num_new_tokens: tokens to compute this step, after
                ``num_computed_tokens`` and the cache hits.
            new_computed_blocks: cache hits from :meth:`get_computed_blocks`
                (only when the request holds no blocks yet); they join its
                block table and the caller adds their tokens to
                ``num_computed_tokens``.
            num_lookahead_tokens: slots to reserve past those tokens (a
                draft model's proposals); they hold no known token.
        Returns:
            The newly allocated blocks (possibly empty), or None if the pool has
            too few free blocks (nothing is allocated or referenced then).
        """
        hits = new_computed_blocks or []
        blocks = self.req_to_blocks.get(request.request_id)
        if not hits and blocks:
            total = request.num_computed_tokens + num_new_tokens
            if total + num_lookahead_tokens <= len(blocks) * self.block_size:
                # NOTE: the common decode step: its token fits the last block. Same
                # result as the general path below, without its bookkeeping (this
                # runs for every running request every step).
                self._cache_blocks(request, total)
                return []
        assert not hits or not blocks, "cache hits only at admission"
        partition = self.partition_of(request)
        if (self.num_blocks_to_allocate(request, num_new_tokens + num_lookahead_tokens, hits)
                > self.block_pool.get_num_free_blocks(partition)):
            return None
        if self.num_partitions > 1:
            self.req_to_partition[request.request_id] = partition
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        self.block_pool.touch(hits)
        blocks.extend(hits)
        total = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        new_blocks = self.block_pool.get_new_blocks(
            max(0, cdiv(total + num_lookahead_tokens, self.block_size) - len(blocks)), partition)
        blocks.extend(new_blocks)
        self._cache_blocks(request, total)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release every block of ``request`` (device and host); tail blocks
        are freed first so that they are the first to be reused (evicted)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.req_to_partition.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))
        self.free_host_blocks.extend(self.req_to_host_blocks.pop(request.request_id, ()))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    # ------------------------------------------------------------------ swap
    def num_blocks_to_swap(self, request: Request) -> int:
        """Blocks holding ``request``'s computed tokens (what a swap copies)."""
        return cdiv(request.num_computed_tokens, self.block_size)

    def can_swap_out(self, request: Request) -> bool:
        n = self.num_blocks_to_swap(request)
        return 0 < n <= len(self.free_host_blocks)

    def swap_out(self, request: Request) -> list[tuple[int, int]]:
        """Move ``request``'s computed blocks to host blocks and free its device
        blocks (cached ones keep their hash, so they may still be hit).

        Returns:
            (device_block_id, host_block_id) pairs the runner must copy before
            the next forward pass (before the freed blocks are overwritten).
        """
        assert self.can_swap_out(request), f"{request} cannot be swapped out"
        n = self.num_blocks_to_swap(request)
        blocks = self.req_to_blocks.pop(request.request_id)
        self.num_cached_blocks.pop(request.request_id, None)
        host = [self.free_host_blocks.popleft() for _ in range(n)]
        self.req_to_host_blocks[request.request_id] = host
        pairs = [(b.block_id, h) for b, h in zip(blocks[:n], host)]
        self.block_pool.free_blocks(reversed(blocks))
        return pairs

    def is_swapped(self, request_id: str) -> bool:
        return request_id in self.req_to_host_blocks

    def _swap_in_hits(self, request: Request) -> list[KVCacheBlock]:
        """Leading blocks of a swapped request still in the prefix cache: they
        need no copy. Only fully computed blocks qualify."""
        hits, _ = self.get_computed_blocks(request)
        return hits[: request.num_computed_tokens // self.block_size]

    def num_blocks_to_swap_in(self, request: Request, num_new_tokens: int) -> int:
        """Free device blocks :meth:`swap_in` would consume."""
        hits = self._swap_in_hits(request)
        total = request.num_computed_tokens + num_new_tokens
        return cdiv(total, self.block_size) - len(hits) + sum(1 for b in hits if b.ref_cnt == 0)

    def swap_in(self, request: Request, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Give a swapped request device blocks for its computed tokens and
        ``num_new_tokens`` more, and release its host blocks.

        Returns:
            (device_block_id, host_block_id) pairs the runner must copy before
            the forward pass, or None if too few device blocks are free
            (nothing changes then).
        """
        host = self.req_to_host_blocks[request.request_id]
        if self.num_blocks_to_swap_in(request, num_new_tokens) > self.block_pool.get_num_free_blocks():
            return None
        hits = self._swap_in_hits(request)
        self.block_pool.touch(hits)
        total = request.num_computed_tokens + num_new_tokens
        blocks = hits + self.block_pool.get_new_blocks(cdiv(total, self.block_size) - len(hits))
        self.req_to_blocks[request.request_id] = blocks
        del self.req_to_host_blocks[request.request_id]
        # NOTE: the scheduler swaps in only after every swap-out of the step, so a
        # host block freed here is not refilled before the runner reads it.
        self.free_host_blocks.extend(host)
        self._cache_blocks(request, total)
        return [(blocks[i].block_id, host[i]) for i in range(len(hits), len(host))]
