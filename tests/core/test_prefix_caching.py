"""Prefix caching on tiny configs: exact block ids, hits, reference counts and
LRU eviction, in the KV cache manager and through the scheduler."""

from ember.config import SchedulerConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.kv_cache_utils import hash_block_tokens, update_block_hashes
from ember.core.scheduler import Scheduler
from ember.request import Request
from ember.sampling_params import SamplingParams
from tests.core.test_scheduler import fake_run


def req(rid: str, tokens: list[int], max_tokens: int = 4, salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens), max_model_len=64, cache_salt=salt)


def admit(mgr: KVCacheManager, r: Request) -> list[int]:
    """What the scheduler does for a new request: hits, then allocate the rest
    (all of it in one chunk). Returns the block table."""
    hits, n = mgr.get_computed_blocks(r)
    assert mgr.allocate_slots(r, r.num_tokens - n, hits) is not None
    r.num_computed_tokens = r.num_tokens
    return mgr.get_block_ids(r.request_id)


def test_chained_hash_depends_on_parent_tokens_and_salt():
    a = hash_block_tokens(None, [1, 2, 3, 4])
    assert a == hash_block_tokens(None, (1, 2, 3, 4)) and len(a) == 32
    assert hash_block_tokens(a, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])
    assert hash_block_tokens(None, [1, 2, 3, 4], ("s",)) != a
    plain, salted = req("p", list(range(12))), req("s", list(range(12)), salt="tenant-1")
    hp, hs = update_block_hashes(plain, 4), update_block_hashes(salted, 4)
    assert len(hp) == 3 and all(x != y for x, y in zip(hp, hs))  # the salt reaches every block via the chain
    plain.append_output_token(99)
    assert update_block_hashes(plain, 4) == hp  # 13 tokens: still 3 full blocks, hashes kept


def test_shared_prefix_hits_exact_blocks_and_ref_counts():
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", list(range(10)))
    assert admit(mgr, a) == [0, 1, 2]
    pool = mgr.block_pool
    assert [pool.blocks[i].block_hash is not None for i in range(3)] == [True, True, False]  # block 2 is partial
    b = req("b", list(range(8)) + [50, 51, 52])
    hits, n = mgr.get_computed_blocks(b)
    assert [blk.block_id for blk in hits] == [0, 1] and n == 8
    assert mgr.allocate_slots(b, 3, hits) is not None
    assert mgr.get_block_ids("b") == [0, 1, 3]
    assert [pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    mgr.free(a)
    assert [pool.blocks[i].ref_cnt for i in range(4)] == [1, 1, 0, 1]
    assert pool.free_block_queue.block_ids() == [4, 5, 6, 7, 8, 9, 2]


def test_at_least_one_token_is_computed():
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    admit(mgr, req("a", list(range(8))))
    same = req("b", list(range(8)))
    hits, n = mgr.get_computed_blocks(same)  # 8 cached tokens, but the last must be computed for its logits
    assert [blk.block_id for blk in hits] == [0] and n == 4
    longer = req("c", list(range(9)))
    assert [blk.block_id for blk in mgr.get_computed_blocks(longer)[0]] == [0, 1]


def test_freed_cached_blocks_are_hit_from_the_free_queue_then_evicted_lru():
    mgr = KVCacheManager(num_blocks=6, block_size=2)
    pool = mgr.block_pool
    a = req("a", [1, 2, 3, 4, 5])
    assert admit(mgr, a) == [0, 1, 2]
    mgr.free(a)
    # Tail first: block 2 (partial, no hash) is freed first, then 1, then 0.
    assert pool.free_block_queue.block_ids() == [3, 4, 5, 2, 1, 0]
    assert len(pool.cached_block_hash_to_block) == 2
    # A hit takes cached blocks back out of the middle of the free queue (ref 0 -> 1).
    b = req("b", [1, 2, 3, 4, 9])
    assert admit(mgr, b) == [0, 1, 3]
    assert pool.free_block_queue.block_ids() == [4, 5, 2]
    mgr.free(b)
    assert pool.free_block_queue.block_ids() == [4, 5, 2, 3, 1, 0]
    # Unrelated requests consume the queue from the head; the cached blocks go last, LRU first.
    c = req("c", [7] * 9)  # 5 blocks: 4, 5, 2, 3 and then block 1 is evicted
    assert admit(mgr, c) == [4, 5, 2, 3, 1]
    assert pool.num_evicted_blocks == 1
    assert pool.blocks[1].block_hash is None and pool.blocks[0].block_hash is not None
    # Block 0 ([1, 2]) is still cached; [3, 4] is gone, so the hit stops there.
    hits, n = mgr.get_computed_blocks(req("d", [1, 2, 3, 4, 5]))
    assert [blk.block_id for blk in hits] == [0] and n == 2


def test_salt_isolates_and_disabled_caching_never_hits():
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    admit(mgr, req("a", list(range(9)), salt="x"))
    assert mgr.get_computed_blocks(req("b", list(range(9))))[1] == 0
    assert mgr.get_computed_blocks(req("c", list(range(9)), salt="y"))[1] == 0
    assert mgr.get_computed_blocks(req("d", list(range(9)), salt="x"))[1] == 8
    off = KVCacheManager(num_blocks=10, block_size=4, enable_caching=False)
    admit(off, req("a", list(range(9))))
    assert off.get_computed_blocks(req("b", list(range(9)))) == ([], 0)
    assert not off.block_pool.cached_block_hash_to_block


def test_allocation_counts_hits_waiting_in_the_free_queue():
    mgr = KVCacheManager(num_blocks=4, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    admit(mgr, a)
    mgr.free(a)
    other = req("o", [9, 9])
    admit(mgr, other)  # holds block 3; free: 2, 1, 0 (1 and 0 cached)
    b = req("b", [1, 2, 3, 4, 5, 6, 7])
    hits, n = mgr.get_computed_blocks(b)
    assert n == 4
    # 2 hits from the free queue + 2 new blocks > 3 free blocks: refused, nothing taken.
    assert mgr.num_blocks_to_allocate(b, 3, hits) == 4
    assert mgr.allocate_slots(b, 3, hits) is None
    assert [blk.ref_cnt for blk in mgr.block_pool.blocks] == [0, 0, 0, 1]
    assert mgr.block_pool.get_num_free_blocks() == 3


def test_duplicate_block_stays_uncached():
    """Two requests compute the same block: the first one registered keeps the
    hash, the other block is a plain block and is reused as such."""
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", [1, 2, 3, 4, 5, 6])
    admit(mgr, a)  # blocks 0 (cached), 1 (partial)
    b = req("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert admit(mgr, b) == [0, 2, 3]  # computes [5..8] itself, in block 2, and caches it
    for tok in (7, 8):  # a decodes the same two tokens: its block 1 becomes [5, 6, 7, 8]
        a.append_output_token(tok)
        mgr.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    pool = mgr.block_pool
    assert pool.blocks[1].block_hash is None and pool.blocks[2].block_hash is not None
    assert mgr.num_cached_blocks["a"] == 2
    mgr.free(a)
    mgr.free(b)
    assert all(blk.ref_cnt == 0 for blk in pool.blocks)


# ------------------------------------------------------------------ scheduler
def make(num_blocks=16, block_size=4, budget=64, caching=True):
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=64)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size, enable_caching=caching))


def run_step(sched):
    s = sched.schedule()
    return s, sched.update_from_output(s, fake_run(s, sched))


def test_scheduler_computes_only_the_uncached_suffix():
    sched = make()
    prefix = list(range(100, 112))  # 3 full blocks
    sched.add_request(req("a", prefix + [1, 2]))
    s, _ = run_step(sched)
    assert s.num_scheduled_tokens == {"a": 14}
    sched.add_request(req("b", prefix + [3, 4, 5]))
    s, _ = run_step(sched)
    assert s.num_scheduled_tokens == {"a": 1, "b": 3}
    new = s.scheduled_new_reqs[0]
    assert new.num_computed_tokens == 12 and new.block_ids[:3] == [0, 1, 2]
    stats = sched.get_stats().prefix_cache
    assert (stats.requests, stats.queries, stats.hits) == (2, 14 + 15, 12)
    assert abs(stats.hit_rate - 12 / 29) < 1e-9


def test_requests_admitted_in_one_step_share_blocks():
    sched = make()
    prefix = list(range(100, 108))
    sched.add_request(req("a", prefix + [1]))
    sched.add_request(req("b", prefix + [2]))
    s, _ = run_step(sched)
    # b hits the blocks a registers in the same step (K/V are written before attention reads them).
    assert s.num_scheduled_tokens == {"a": 9, "b": 1}
    assert [r.block_ids for r in s.scheduled_new_reqs] == [[0, 1, 2], [0, 1, 3]]


def test_recompute_after_preemption_hits_its_own_blocks():
    sched = make(num_blocks=6, block_size=4)
    sched.add_request(req("old", list(range(1, 9)), max_tokens=20))
    sched.add_request(req("new", list(range(21, 29)), max_tokens=20))
    for _ in range(10):
        s, _ = run_step(sched)
        if s.num_preemptions:
            break
    victim = sched.waiting[0]
    assert victim.request_id == "new" and victim.num_computed_tokens == 0
    # Its blocks are free but still cached: it will recompute only what was evicted.
    hits, n = sched.kv_cache_manager.get_computed_blocks(victim)
    assert n == 8


def test_cli_flags_reach_the_configs():
    import argparse

    from ember.engine.arg_utils import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args([]))
    assert args.enable_prefix_caching and args.scheduling_policy == "fcfs" and args.preemption_mode == "recompute"
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["--no-prefix-caching", "--scheduling-policy", "priority", "--preemption-mode", "swap", "--swap-space", "2",
         "--max-waiting-time", "5"]))
    assert not args.enable_prefix_caching and args.swap_space == 2 << 30
    assert (args.scheduling_policy, args.preemption_mode, args.max_waiting_time_s) == ("priority", "swap", 5.0)
    assert EngineArgs.from_cli_args(parser.parse_args(["--swap-space", "512M"])).swap_space == 512 << 20
