import pytest

from ember.core.block_pool import BlockPool
from ember.core.kv_cache_manager import KVCacheManager
from ember.request import Request
from ember.sampling_params import SamplingParams


def test_pool_allocates_from_head_and_frees_to_tail():
    pool = BlockPool(4)
    a = pool.get_new_blocks(2)
    assert [b.block_id for b in a] == [0, 1]
    assert [b.ref_cnt for b in a] == [1, 1]
    assert pool.free_block_queue.block_ids() == [2, 3]
    pool.free_blocks([a[1], a[0]])
    assert pool.free_block_queue.block_ids() == [2, 3, 1, 0]
    assert pool.get_num_free_blocks() == 4


def test_pool_refuses_overallocation_and_double_free():
    pool = BlockPool(2)
    blocks = pool.get_new_blocks(2)
    with pytest.raises(ValueError, match="only 0 are free"):
        pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free_blocks(blocks[:1])


def test_free_queue_remove_from_middle():
    pool = BlockPool(5)
    q = pool.free_block_queue
    q.remove(pool.blocks[2])
    assert q.block_ids() == [0, 1, 3, 4]
    q.remove(pool.blocks[0])
    q.remove(pool.blocks[4])
    assert q.block_ids() == [1, 3]
    q.append(pool.blocks[0])
    assert q.block_ids() == [1, 3, 0]
    assert q.num_free_blocks == 3


def _req(rid: str, n: int) -> Request:
    return Request(rid, list(range(n)), SamplingParams(max_tokens=8), max_model_len=1000)


def test_kv_cache_manager_allocates_exact_blocks():
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    r = _req("a", 9)
    new = mgr.allocate_slots(r, 9)
    assert [b.block_id for b in new] == [0, 1, 2]
    r.num_computed_tokens = 9
    assert mgr.allocate_slots(r, 3) == []  # 12 tokens still fit in 3 blocks
    assert [b.block_id for b in mgr.allocate_slots(r, 4)] == [3]
    assert mgr.get_block_ids("a") == [0, 1, 2, 3]
    big = _req("b", 100)
    assert mgr.allocate_slots(big, 100) is None  # 25 blocks > 6 free: nothing taken
    assert mgr.block_pool.get_num_free_blocks() == 6
    mgr.free(r)
    assert mgr.block_pool.get_num_free_blocks() == 10
    # Tail blocks are reused first.
    assert mgr.block_pool.free_block_queue.block_ids()[-4:] == [3, 2, 1, 0]
