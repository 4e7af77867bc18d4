"""Scheduler tests with no model: a fake runner samples a fixed token."""

from ember.config import SchedulerConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.sched_output import ModelRunnerOutput, SchedulerOutput
from ember.core.scheduler import Scheduler
from ember.request import Request, RequestStatus
from ember.sampling_params import SamplingParams


def make(budget=32, max_seqs=8, num_blocks=20, block_size=4):
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=64)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size))


def req(rid, n, max_tokens=4, **kw):
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, **kw), max_model_len=64)


def fake_run(s: SchedulerOutput, sched: Scheduler, token=7) -> ModelRunnerOutput:
    """What a runner returns for step ``s`` (call it right after ``schedule``):
    ``token`` for every request the step brings to the end of its tokens."""
    sampled = {}
    for rid in s.num_scheduled_tokens:
        r = sched.requests[rid]
        if r.num_computed_tokens >= r.num_tokens:
            sampled[rid] = [token]
    return ModelRunnerOutput(sampled)


def step(sched, token=7):
    s = sched.schedule()
    return s, sched.update_from_output(s, fake_run(s, sched, token))


def test_chunked_prefill_then_decode_mixed():
    sched = make(budget=10)
    sched.add_request(req("a", 25))
    s, out = step(sched)
    assert s.num_scheduled_tokens == {"a": 10} and out == []
    sched.add_request(req("b", 3))
    s, out = step(sched)
    assert s.num_scheduled_tokens == {"a": 10}  # a takes the whole budget
    s, out = step(sched)
    assert s.num_scheduled_tokens == {"a": 5, "b": 3}  # a's last chunk + b's prefill
    assert [o.request_id for o in out] == ["a", "b"]
    s, out = step(sched)
    assert s.num_scheduled_tokens == {"a": 1, "b": 1}  # both decode


def test_max_num_seqs_and_finish_frees_blocks():
    sched = make(max_seqs=2)
    for i in range(3):
        sched.add_request(req(f"r{i}", 4, max_tokens=2))
    s, _ = step(sched)
    assert set(s.num_scheduled_tokens) == {"r0", "r1"}
    s, out = step(sched)
    assert all(o.finish_reason == "length" for o in out) and len(out) == 2
    s, _ = step(sched)
    assert set(s.num_scheduled_tokens) == {"r2"}
    assert s.finished_req_ids == {"r0", "r1"}
    step(sched)
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 20


def test_preempts_most_recently_started():
    # 6 blocks of 4 tokens; two requests of 8 prompt tokens take 2 blocks each.
    sched = make(num_blocks=6, block_size=4)
    sched.add_request(req("old", 8, max_tokens=20))
    sched.add_request(req("new", 8, max_tokens=20))
    step(sched)
    # Decode until the pool runs dry: the 2nd decode needs a 3rd block each.
    preempted = None
    for _ in range(10):
        s, _ = step(sched)
        if s.num_preemptions:
            preempted = s
            break
    assert preempted is not None
    assert sched.waiting[0].request_id == "new"
    assert sched.waiting[0].status == RequestStatus.PREEMPTED
    assert sched.waiting[0].num_computed_tokens == 0
    assert "new" in sched.schedule().finished_req_ids or True


def test_eos_and_stop_token_ids():
    sched = make()
    r = req("a", 3, max_tokens=10, stop_token_ids=[7])
    sched.add_request(r)
    _, out = step(sched, token=7)
    assert out[0].finish_reason == "stop" and out[0].stop_reason == 7
    r2 = req("b", 3, max_tokens=10, ignore_eos=True)
    r2.stop_token_ids = frozenset()
    sched.add_request(r2)
    _, out = step(sched, token=7)
    assert out[0].finish_reason is None


def test_abort_waiting_and_running():
    sched = make(max_seqs=1)
    sched.add_request(req("a", 4))
    sched.add_request(req("b", 4))
    step(sched)
    assert sched.finish_requests(["a", "b", "zzz"], RequestStatus.FINISHED_ABORTED) == ["a", "b"]
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 20
