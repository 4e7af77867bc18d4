"""Preemption by swap with a fake runner: exact (device, host) block pairs,
resumption with num_computed_tokens intact, and the fall back to recompute
when the host pool is full."""

from ember.config import SchedulerConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.scheduler import Scheduler
from ember.request import Request, RequestStatus
from ember.sampling_params import SamplingParams
from tests.core.test_scheduler import fake_run


def make(num_host_blocks, num_blocks=6, block_size=4, caching=True):
    cfg = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64, preemption_mode="swap")
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size, enable_caching=caching,
                                         num_host_blocks=num_host_blocks))


def req(rid, first, n=8, max_tokens=12):
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens), max_model_len=64)


def step(sched):
    s = sched.schedule()
    return s, sched.update_from_output(s, fake_run(s, sched))


def step_until_preemption(sched):
    for _ in range(20):
        s, _ = step(sched)
        if s.num_preemptions:
            return s
    raise AssertionError("no preemption")


def test_swap_out_and_back_in_keeps_computed_tokens():
    sched = make(num_host_blocks=8)
    sched.add_request(req("old", 1))
    sched.add_request(req("new", 101))
    step(sched)  # blocks: old [0, 1], new [2, 3]; then 4 and 5 at the 9th token
    s = step_until_preemption(sched)
    # Each needs a 4th block at 13 tokens; "new" (started last) is swapped out:
    # its 3 computed blocks [2, 3, 5] go to host blocks 0, 1, 2.
    new = sched.requests["new"]
    assert new.status == RequestStatus.SWAPPED
    assert new.num_computed_tokens == 12 and new.num_tokens == 13
    assert s.blocks_to_swap_out == [(2, 0), (3, 1), (5, 2)]
    assert s.blocks_to_swap_in == [] and "new" in s.finished_req_ids
    kv = sched.kv_cache_manager
    assert kv.req_to_host_blocks["new"] == [0, 1, 2] and list(kv.free_host_blocks) == [3, 4, 5, 6, 7]
    # "old" takes blocks 5 and 3 (evicting new's cached copies), finishes at 20
    # tokens, and "new" comes back with everything it had computed.
    for _ in range(20):
        s, _ = step(sched)
        if s.blocks_to_swap_in:
            break
    assert "old" not in sched.requests
    assert s.num_scheduled_tokens == {"new": 1}  # decode resumes; no prefill again
    (resumed,) = s.scheduled_new_reqs
    assert resumed.num_computed_tokens == 12
    # Block 2 still holds new's first block in the prefix cache: taken without a
    # copy. Host blocks 1 and 2 are copied into fresh blocks 3 and 5.
    assert resumed.block_ids == [2, 3, 5, 4]
    assert s.blocks_to_swap_in == [(3, 1), (5, 2)]
    assert len(kv.free_host_blocks) == 8 and not kv.req_to_host_blocks
    stats = sched.get_stats()
    assert (stats.num_swap_outs, stats.num_swap_ins) == (1, 1)
    assert (stats.num_blocks_swapped_out, stats.num_blocks_swapped_in) == (3, 2)
    while sched.has_unfinished_requests():
        step(sched)
    assert kv.block_pool.get_num_free_blocks() == 6


def test_full_host_pool_falls_back_to_recompute():
    sched = make(num_host_blocks=2)  # the victim needs 3 host blocks
    sched.add_request(req("old", 1))
    sched.add_request(req("new", 101))
    step(sched)
    s = step_until_preemption(sched)
    new = sched.requests["new"]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert s.blocks_to_swap_out == []
    assert sched.get_stats().num_swap_outs == 0 and sched.get_stats().num_preemptions == 1


def test_abort_while_swapped_frees_host_blocks():
    sched = make(num_host_blocks=8)
    sched.add_request(req("old", 1))
    sched.add_request(req("new", 101))
    step(sched)
    step_until_preemption(sched)
    assert sched.finish_requests(["new"], RequestStatus.FINISHED_ABORTED) == ["new"]
    kv = sched.kv_cache_manager
    assert len(kv.free_host_blocks) == 8 and not kv.req_to_host_blocks
