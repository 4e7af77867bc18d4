"""Priority scheduling with a fake runner: queue order, who is preempted, the
time to first token of a high-priority request under a saturating low-priority
load, and the fairness guard (with a fake clock)."""

import itertools

import pytest

from ember.config import ConfigError, SchedulerConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.scheduler import Scheduler
from ember.request import Request, RequestStatus
from ember.sampling_params import SamplingParams
from tests.core.test_scheduler import fake_run


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(policy="priority", max_seqs=4, num_blocks=64, block_size=4, budget=64, max_wait=None, clock=None):
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=128, policy=policy,
                          max_waiting_time_s=max_wait)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size), clock=clock or FakeClock())


_counter = itertools.count()


def req(rid, prio, n=4, max_tokens=4):
    """A request arriving after every earlier one, with a prompt no other shares."""
    k = next(_counter)
    return Request(rid, [1000 * k + i for i in range(1, n + 1)], SamplingParams(max_tokens=max_tokens),
                   max_model_len=128, arrival_time=float(k), priority=prio)


def step(sched):
    s = sched.schedule()
    return s, sched.update_from_output(s, fake_run(s, sched))


def run_to_end(sched, max_steps=500):
    finished = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return finished
        _, out = step(sched)
        finished += [o.request_id for o in out if o.finish_reason]
    raise AssertionError("did not finish")


def test_waiting_queue_orders_by_priority_then_arrival():
    sched = make(max_seqs=1)
    for rid, prio in [("a", 2), ("b", 0), ("c", 1), ("d", 0), ("e", -5)]:
        sched.add_request(req(rid, prio, max_tokens=1))
    assert [r.request_id for r in sched.waiting] == ["e", "b", "d", "c", "a"]
    assert run_to_end(sched) == ["e", "b", "d", "c", "a"]


def test_fcfs_ignores_priority():
    sched = make(policy="fcfs", max_seqs=1)
    for rid, prio in [("a", 2), ("b", 0), ("c", 1)]:
        sched.add_request(req(rid, prio, max_tokens=1))
    assert run_to_end(sched) == ["a", "b", "c"]


def test_high_priority_ttft_under_saturating_low_priority_load():
    """8 low-priority requests saturate max_num_seqs=4; a high-priority one
    arriving later starts at once, displacing the newest lowest-priority request."""
    sched = make(max_seqs=4)
    for i in range(8):
        sched.add_request(req(f"low{i}", 10, max_tokens=30))
    for _ in range(3):
        step(sched)
    assert [r.request_id for r in sched.running] == ["low0", "low1", "low2", "low3"]
    sched.add_request(req("high", 0, max_tokens=5))
    s, out = step(sched)
    # TTFT of one engine step: scheduled, prefilled and sampled in the step after it arrived.
    assert "high" in s.num_scheduled_tokens and [o.request_id for o in out if o.request_id == "high"] == ["high"]
    assert s.num_preemptions == 1
    victim = sched.requests["low3"]
    assert victim.status == RequestStatus.PREEMPTED
    assert [r.request_id for r in sched.running] == ["high", "low0", "low1", "low2"]
    # The victim keeps its place among equals: ahead of later low-priority arrivals.
    assert [r.request_id for r in sched.waiting][:2] == ["low3", "low4"]
    finished = run_to_end(sched)
    assert finished[0] == "high"
    assert finished.index("low3") < finished.index("low4")


def test_block_shortage_preempts_lowest_priority_not_newest():
    # 6 blocks of 4 tokens: two 8-token prompts take 2 each; decoding runs the pool dry.
    sched = make(max_seqs=4, num_blocks=6)
    sched.add_request(req("low", 5, n=8, max_tokens=20))
    step(sched)
    sched.add_request(req("high", 0, n=8, max_tokens=20))
    step(sched)
    assert [r.request_id for r in sched.running] == ["high", "low"]
    for _ in range(10):
        s, _ = step(sched)
        if s.num_preemptions:
            break
    assert s.num_preemptions == 1
    assert sched.requests["low"].status == RequestStatus.PREEMPTED  # FCFS would have preempted "high"
    assert "high" in s.num_scheduled_tokens


def test_no_readmission_of_a_request_preempted_in_the_same_step():
    sched = make(max_seqs=4, num_blocks=6)
    sched.add_request(req("a", 0, n=8, max_tokens=20))
    sched.add_request(req("b", 1, n=8, max_tokens=20))
    step(sched)
    for _ in range(10):
        s, _ = step(sched)
        if s.num_preemptions:
            break
    assert sched.requests["b"].status == RequestStatus.PREEMPTED
    assert "b" not in s.num_scheduled_tokens  # freed blocks, but it must not trade places with itself


def test_fairness_guard_promotes_a_starved_request():
    clock = FakeClock()
    sched = make(max_seqs=1, max_wait=10.0, clock=clock)
    sched.add_request(req("starved", 10, max_tokens=2))
    started = None
    for t in range(40):
        clock.now = float(t)
        if t % 2 == 0:  # a steady stream of high-priority work
            sched.add_request(req(f"hi{t}", 0, max_tokens=2))
        s, _ = step(sched)
        if "starved" in s.num_scheduled_tokens:
            started = t
            break
    assert started == 10  # promoted once it had waited 10 s, and started in that step
    assert sched.requests["starved"].promoted
    assert sched.get_stats().num_priority_promotions >= 1


def test_without_the_guard_low_priority_starves():
    clock = FakeClock()
    sched = make(max_seqs=1, max_wait=None, clock=clock)
    sched.add_request(req("starved", 10, max_tokens=2))
    for t in range(40):
        clock.now = float(t)
        if t % 2 == 0:
            sched.add_request(req(f"hi{t}", 0, max_tokens=2))
        s, _ = step(sched)
        assert "starved" not in s.num_scheduled_tokens


def test_config_rejects_bad_policy_settings():
    with pytest.raises(ConfigError, match="policy must be one of"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(ConfigError, match="preemption_mode must be one of"):
        SchedulerConfig(preemption_mode="drop")
    with pytest.raises(ConfigError, match="max_waiting_time_s must be a positive number"):
        SchedulerConfig(max_waiting_time_s=-1)
