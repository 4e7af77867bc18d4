"""Scheduler.schedule_ahead (asynchronous scheduling) with no model: which
steps are scheduled ahead, their blocks, and the prefix-cache hashes of the
token still in flight. The end-to-end check (same tokens as synchronous
scheduling) is tests/engine/test_async_scheduling.py."""

from ember.config import SchedulerConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.sched_output import ModelRunnerOutput
from ember.core.sched_policy import SCHEDULING_POLICIES
from ember.core.scheduler import Scheduler
from ember.request import Request, RequestStatus
from ember.sampling_params import SamplingParams
from tests.core.test_scheduler import fake_run

BLOCK = 4


def make(budget=32, max_seqs=8, num_blocks=20, caching=True) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=64,
                          async_scheduling=True)
    return Scheduler(cfg, KVCacheManager(num_blocks, BLOCK, enable_caching=caching))


def req(rid, n, max_tokens=8, **kw) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, **kw), max_model_len=64)


def test_steady_decode_is_scheduled_ahead_with_the_blocks_it_needs() -> None:
    sched = make()
    sched.add_request(req("a", 4))
    sched.add_request(req("b", 6))
    first = sched.schedule()  # both prefill, both sample
    ahead = sched.schedule_ahead(first)
    assert ahead is not None and ahead.num_scheduled_tokens == {"a": 1, "b": 1}
    # The ahead step writes the K/V of the token in flight: position 4 of a (its
    # second block) and position 6 of b (in its second block already).
    cached = {c.req_id: c for c in ahead.scheduled_cached_reqs}
    assert len(cached["a"].new_block_ids) == 1 and cached["b"].new_block_ids == []
    assert cached["a"].num_computed_tokens == 4 and cached["b"].num_computed_tokens == 6
    assert sched.kv_cache_manager.get_block_ids("a")[-1] == cached["a"].new_block_ids[0]
    # Finishing the first step and then the ahead one leaves the usual state.
    sched.update_from_output(first, fake_run(first, sched, token=9))
    a = sched.requests["a"]
    assert (a.num_computed_tokens, a.num_tokens) == (4, 5)
    sched.update_from_output(ahead, fake_run(ahead, sched, token=9))
    assert (a.num_computed_tokens, a.num_tokens) == (5, 6)


def test_block_with_the_token_in_flight_is_hashed_once_known() -> None:
    sched = make()
    sched.add_request(req("a", 3))
    first = sched.schedule()
    kv = sched.kv_cache_manager
    ahead = sched.schedule_ahead(first)
    # Block 0 will hold tokens 1, 2, 3 and the one in flight: not hashed yet.
    assert kv.num_cached_blocks.get("a", 0) == 0
    sched.update_from_output(first, fake_run(first, sched, token=9))
    nxt = sched.schedule_ahead(ahead)  # the token is known now: block 0 is full of known tokens
    assert nxt is not None and kv.num_cached_blocks["a"] == 1
    sched.update_from_output(ahead, fake_run(ahead, sched))
    probe = Request("p", [1, 2, 3, 9, 0], SamplingParams(max_tokens=1), max_model_len=64)
    _, num_hit = kv.get_computed_blocks(probe)
    assert num_hit == BLOCK  # the registered hash is that of the real tokens


def test_prompt_chunks_are_planned_ahead_as_schedule_would() -> None:
    sched = make(budget=4, max_seqs=4)
    sched.add_request(req("long", 10))
    s = sched.schedule()  # a 4-token chunk of 10: samples nothing
    ahead = sched.schedule_ahead(s)  # the next chunk needs no token from the device
    assert ahead.num_scheduled_tokens == {"long": 4}
    assert ahead.scheduled_cached_reqs[0].num_computed_tokens == 4
    sched.update_from_output(s, fake_run(s, sched))
    last = sched.schedule_ahead(ahead)  # the last 2 tokens: they sample
    assert last.num_scheduled_tokens == {"long": 2}
    sched.update_from_output(ahead, fake_run(ahead, sched))
    decode = sched.schedule_ahead(last)  # the first output token is in flight
    assert decode.num_scheduled_tokens == {"long": 1}
    assert decode.scheduled_cached_reqs[0].num_computed_tokens == 10

    mixed = make(budget=4, max_seqs=4)  # a decode in flight, then a prompt chunk, in the budget's order
    mixed.add_request(req("a", 1))
    s = mixed.schedule()
    mixed.update_from_output(s, fake_run(s, mixed))
    mixed.add_request(req("b", 6))
    s = mixed.schedule()
    assert s.num_scheduled_tokens == {"a": 1, "b": 3}
    assert mixed.schedule_ahead(s).num_scheduled_tokens == {"a": 1, "b": 3}


def test_not_ahead_when_penalized() -> None:

    pen = make()
    pen.add_request(req("p", 3, repetition_penalty=1.2))
    pen.add_request(req("q", 3))
    s = pen.schedule()
    assert pen.schedule_ahead(s) is None  # p's logits need the token in flight


def test_new_requests_join_an_ahead_step_unless_admission_may_preempt() -> None:
    sched = make(budget=8, max_seqs=2)
    sched.add_request(req("a", 2))
    s = sched.schedule()
    sched.add_request(req("new", 3))
    sched.add_request(req("third", 3))  # no slot (max_num_seqs 2): keeps waiting
    ahead = sched.schedule_ahead(s)
    assert ahead.num_scheduled_tokens == {"a": 1, "new": 3}
    assert [n.req_id for n in ahead.scheduled_new_reqs] == ["new"]
    assert [r.request_id for r in sched.waiting] == ["third"]

    prio = make()
    prio.policy = SCHEDULING_POLICIES["priority"]()
    prio.add_request(req("a", 2))
    s = prio.schedule()
    prio.add_request(req("b", 2))
    assert prio.schedule_ahead(s) is None  # priority admission may preempt: scheduled after in_flight


def test_not_ahead_when_a_preempted_request_waits() -> None:
    sched = make(num_blocks=2, max_seqs=2)
    sched.add_request(req("a", 4))
    sched.add_request(req("b", 4))
    s = sched.schedule()
    sched.update_from_output(s, fake_run(s, sched))
    s = sched.schedule()  # both need a second block: b is preempted
    assert [r.request_id for r in sched.waiting] == ["b"]
    sched.update_from_output(s, fake_run(s, sched))
    assert sched.schedule_ahead(s) is None


def test_request_finishing_in_flight_by_length_is_left_out() -> None:
    sched = make()
    sched.add_request(req("short", 2, max_tokens=1))
    sched.add_request(req("long", 2, max_tokens=5))
    s = sched.schedule()
    ahead = sched.schedule_ahead(s)
    assert ahead.num_scheduled_tokens == {"long": 1}
    out = sched.update_from_output(s, fake_run(s, sched))
    assert {o.request_id: o.finish_reason for o in out} == {"short": "length", "long": None}


def test_request_stopping_in_flight_is_dropped_from_the_ahead_step() -> None:
    sched = make()
    sched.add_request(req("a", 2, stop_token_ids=[5]))
    sched.add_request(req("b", 2))
    s = sched.schedule()
    ahead = sched.schedule_ahead(s)
    assert set(ahead.num_scheduled_tokens) == {"a", "b"}
    out = sched.update_from_output(s, fake_run(s, sched, token=5))  # a stops, b goes on
    assert {o.request_id: o.finish_reason for o in out} == {"a": "stop", "b": None}
    assert sched.kv_cache_manager.get_block_ids("a") == []  # freed at once
    out = sched.update_from_output(ahead, fake_run_known(ahead, sched, token=6))
    assert [o.request_id for o in out] == ["b"]  # a's extra token is dropped
    nxt = sched.schedule()
    assert "a" in nxt.finished_req_ids and set(nxt.num_scheduled_tokens) == {"b"}


def test_id_of_a_request_aborted_in_flight_reused_at_once() -> None:
    sched = make()
    sched.add_request(req("x", 2))
    sched.add_request(req("y", 2))
    s = sched.schedule()
    ahead = sched.schedule_ahead(s)
    sched.update_from_output(s, fake_run(s, sched))
    assert sched.finish_requests(["x"], RequestStatus.FINISHED_ABORTED) == ["x"]
    sched.add_request(req("x", 3))  # a new request with the same id
    nxt = sched.schedule_ahead(ahead)  # the old x is still in flight: the new one waits
    assert set(nxt.num_scheduled_tokens) == {"y"} and not nxt.scheduled_new_reqs
    out = sched.update_from_output(ahead, fake_run_known(ahead, sched, token=6))
    assert [o.request_id for o in out] == ["y"]  # the old x's token does not reach the new x
    new_x = sched.requests["x"]
    assert (new_x.num_computed_tokens, new_x.num_output_tokens) == (0, 0)
    later = sched.schedule_ahead(nxt)
    assert later.num_scheduled_tokens == {"y": 1, "x": 3}


def test_no_block_no_ahead_step() -> None:
    sched = make(num_blocks=2)
    sched.add_request(req("a", 4))  # one full block; the token in flight needs the second
    sched.add_request(req("b", 3))
    s = sched.schedule()
    assert sched.schedule_ahead(s) is None  # b's ahead token would need a third block


def fake_run_known(s, sched, token):
    """What the runner returns for an ahead step: a token for every request in
    it (it does not know which finished meanwhile)."""
    return ModelRunnerOutput({rid: token for rid in s.num_scheduled_tokens})
