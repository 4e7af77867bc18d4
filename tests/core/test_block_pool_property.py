"""Property-based test (hypothesis) of the block pool and KV cache manager.

Random sequences of admit (with prefix-cache hits) / compute / append a token /
finish / preempt by recompute / swap out / swap in run on a tiny pool (8 blocks
of 2 tokens, 6 host blocks) with prompts over a 2-token alphabet, so hits,
shared blocks, evictions and failed allocations are frequent. The model also
simulates the KV contents: computing position ``p`` of a request writes
``(salt, tokens[:p + 1])`` into its slot, swaps copy slots between the device
and host pools. After every step we check:

* reference counts equal the number of block tables holding each block, and a
  block is in the free queue exactly when nobody holds it (no leak, no double
  free: a double free also trips the pool's own assertion);
* the hash map and the blocks' hashes agree, and every cached block holds the
  contents its hash stands for;
* every computed token of every running request reads back its own K/V
  through its block table (hits, evictions and swaps never serve wrong data);
* host blocks are either free or held by exactly one swapped request.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ember.core.kv_cache_manager import KVCacheManager
from ember.request import Request
from ember.sampling_params import SamplingParams

NUM_BLOCKS, BLOCK_SIZE, NUM_HOST_BLOCKS = 8, 2, 6
TOKENS = st.integers(1, 2)


def expected(req: Request, pos: int) -> tuple:
    """What the K/V of ``req``'s token at ``pos`` stands for."""
    return (req.cache_salt, tuple(req.all_token_ids[: pos + 1]))


class KVCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mgr = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, enable_caching=True, num_host_blocks=NUM_HOST_BLOCKS)
        self.device = [[None] * BLOCK_SIZE for _ in range(NUM_BLOCKS)]
        self.host = [[None] * BLOCK_SIZE for _ in range(NUM_HOST_BLOCKS)]
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.content_of_hash: dict[bytes, list] = {}
        self.next_id = 0

    # ------------------------------------------------------------- helpers
    def _compute(self, req: Request, num_new: int) -> None:
        """The runner: write K/V of positions [computed, computed + num_new)."""
        table = self.mgr.get_block_ids(req.request_id)
        for pos in range(req.num_computed_tokens, req.num_computed_tokens + num_new):
            self.device[table[pos // BLOCK_SIZE]][pos % BLOCK_SIZE] = expected(req, pos)
        req.num_computed_tokens += num_new
        for i, h in enumerate(req.block_hashes[: req.num_computed_tokens // BLOCK_SIZE]):
            self.content_of_hash.setdefault(h, [expected(req, i * BLOCK_SIZE + j) for j in range(BLOCK_SIZE)])

    def _snapshot(self) -> list[int]:
        return [b.ref_cnt for b in self.mgr.block_pool.blocks]

    @staticmethod
    def _pick(reqs: list[Request], i: int) -> Request:
        return reqs[i % len(reqs)]

    # --------------------------------------------------------------- rules
    @rule(tokens=st.lists(TOKENS, min_size=1, max_size=9), salt=st.sampled_from([None, None, "s"]))
    def add_request(self, tokens, salt):
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.waiting.append(Request(rid, tokens, SamplingParams(max_tokens=64), max_model_len=128, cache_salt=salt))

    @precondition(lambda self: self.waiting)
    @rule(i=st.integers(0, 99), chunk=st.integers(1, 12))
    def admit(self, i, chunk):
        req = self._pick(self.waiting, i)
        hits, num_hit = self.mgr.get_computed_blocks(req)
        assert num_hit == len(hits) * BLOCK_SIZE and num_hit < req.num_tokens
        for k, block in enumerate(hits):  # a hit serves exactly the K/V of our prefix
            assert self.device[block.block_id] == [expected(req, k * BLOCK_SIZE + j) for j in range(BLOCK_SIZE)]
        num_new = min(chunk, req.num_tokens - num_hit)
        before = self._snapshot()
        if self.mgr.allocate_slots(req, num_new, hits) is None:
            assert self._snapshot() == before  # a refusal takes nothing
            return
        req.num_computed_tokens = num_hit
        self._compute(req, num_new)
        self.waiting.remove(req)
        self.running.append(req)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99), chunk=st.integers(1, 6), token=TOKENS)
    def step(self, i, chunk, token):
        req = self._pick(self.running, i)
        if req.num_computed_tokens == req.num_tokens:
            req.append_output_token(token)  # sampled: one more token to compute
        num_new = min(chunk, req.num_tokens - req.num_computed_tokens)
        before = self._snapshot()
        if self.mgr.allocate_slots(req, num_new) is None:
            assert self._snapshot() == before
            return
        self._compute(req, num_new)

    @precondition(lambda self: self.running or self.swapped)
    @rule(i=st.integers(0, 99))
    def finish(self, i):
        pool = self.running + self.swapped
        req = self._pick(pool, i)
        self.mgr.free(req)
        (self.running if req in self.running else self.swapped).remove(req)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99))
    def preempt_recompute(self, i):
        req = self._pick(self.running, i)
        self.mgr.free(req)
        req.num_computed_tokens = 0
        self.running.remove(req)
        self.waiting.append(req)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99))
    def swap_out(self, i):
        req = self._pick(self.running, i)
        if not self.mgr.can_swap_out(req):
            return
        for dev, host in self.mgr.swap_out(req):
            self.host[host] = list(self.device[dev])
        self.running.remove(req)
        self.swapped.append(req)

    @precondition(lambda self: self.swapped)
    @rule(i=st.integers(0, 99), chunk=st.integers(1, 6), token=TOKENS)
    def swap_in(self, i, chunk, token):
        req = self._pick(self.swapped, i)
        if req.num_computed_tokens == req.num_tokens:
            req.append_output_token(token)
        num_new = min(chunk, req.num_tokens - req.num_computed_tokens)
        before = self._snapshot()
        pairs = self.mgr.swap_in(req, num_new)
        if pairs is None:
            assert self._snapshot() == before and self.mgr.is_swapped(req.request_id)
            return
        for dev, host in pairs:
            self.device[dev] = list(self.host[host])
        self.swapped.remove(req)
        self.running.append(req)
        self._compute(req, num_new)

    # ----------------------------------------------------------- invariants
    @invariant()
    def ref_counts_equal_holders(self):
        holders = Counter(b for blocks in self.mgr.req_to_blocks.values() for b in (x.block_id for x in blocks))
        pool = self.mgr.block_pool
        for block in pool.blocks:
            assert block.ref_cnt == holders[block.block_id], block
            assert block.in_free_queue == (block.ref_cnt == 0), block
        free_ids = pool.free_block_queue.block_ids()
        assert len(free_ids) == len(set(free_ids)) == pool.get_num_free_blocks()
        assert set(free_ids) == {b.block_id for b in pool.blocks if b.ref_cnt == 0}
        assert set(self.mgr.req_to_blocks) <= {r.request_id for r in self.running}

    @invariant()
    def cache_map_is_consistent_and_correct(self):
        pool = self.mgr.block_pool
        for h, block in pool.cached_block_hash_to_block.items():
            assert block.block_hash == h
            assert self.device[block.block_id] == self.content_of_hash[h]
        assert sum(b.block_hash is not None for b in pool.blocks) == len(pool.cached_block_hash_to_block)

    @invariant()
    def running_requests_read_their_own_kv(self):
        for req in self.running:
            table = self.mgr.get_block_ids(req.request_id)
            assert len(table) * BLOCK_SIZE >= req.num_computed_tokens
            for pos in range(req.num_computed_tokens):
                assert self.device[table[pos // BLOCK_SIZE]][pos % BLOCK_SIZE] == expected(req, pos), (req, pos)

    @invariant()
    def host_blocks_are_free_or_held_once(self):
        held = [h for hs in self.mgr.req_to_host_blocks.values() for h in hs]
        assert sorted(held + list(self.mgr.free_host_blocks)) == list(range(NUM_HOST_BLOCKS))
        assert set(self.mgr.req_to_host_blocks) == {r.request_id for r in self.swapped}
        for req in self.swapped:
            hosts = self.mgr.req_to_host_blocks[req.request_id]
            for pos in range(req.num_computed_tokens):
                assert self.host[hosts[pos // BLOCK_SIZE]][pos % BLOCK_SIZE] == expected(req, pos)

    def teardown(self):
        for req in self.running + self.swapped:
            self.mgr.free(req)
        pool = self.mgr.block_pool
        assert pool.get_num_free_blocks() == NUM_BLOCKS and all(b.ref_cnt == 0 for b in pool.blocks)
        assert len(self.mgr.free_host_blocks) == NUM_HOST_BLOCKS


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestKVCacheManagerProperties = KVCacheMachine.TestCase
