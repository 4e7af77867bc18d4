"""Scheduling while a step is in flight (asynchronous scheduling) and draft
tokens, with no model: the same ``schedule()`` serves both; tokens still being
sampled count as output placeholders. Checks exact schedules, blocks, prefix
hashes, preemption with a token in flight, stop tokens and aborts in flight,
and (property test) the same outputs as synchronous scheduling under a fake
model. The end-to-end check is tests/engine/test_async_scheduling.py."""

from __future__ import annotations

import random
from collections import deque

import pytest

from ember.config import SchedulerConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.sched_output import ModelRunnerOutput, SchedulerOutput
from ember.core.scheduler import Scheduler
from ember.request import Request, RequestStatus
from ember.sampling_params import SamplingParams
from tests.core.test_scheduler import fake_run

BLOCK = 4


def make(budget=32, max_seqs=8, num_blocks=20, caching=True, policy="fcfs", preemption_mode="recompute",
         num_host_blocks=0) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=64,
                          async_scheduling=True, policy=policy, preemption_mode=preemption_mode)
    return Scheduler(cfg, KVCacheManager(num_blocks, BLOCK, enable_caching=caching, num_host_blocks=num_host_blocks))


def req(rid, n, max_tokens=8, first=1, priority=0, **kw) -> Request:
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens, **kw), max_model_len=64,
                   priority=priority)


def test_decode_continues_from_the_token_in_flight() -> None:
    sched = make()
    sched.add_request(req("a", 4))
    sched.add_request(req("b", 6))
    first = sched.schedule()  # both prefill, both sample
    a = sched.requests["a"]
    assert (a.num_computed_tokens, a.num_tokens, a.num_output_placeholders) == (4, 4, 1)
    out1 = fake_run(first, sched, token=9)
    nxt = sched.schedule()  # before first's tokens are known
    assert nxt.num_scheduled_tokens == {"a": 1, "b": 1}
    # It writes the K/V of the tokens in flight: position 4 of a (a new block)
    # and position 6 of b (in its second block already).
    cached = {c.req_id: c for c in nxt.scheduled_cached_reqs}
    assert len(cached["a"].new_block_ids) == 1 and cached["b"].new_block_ids == []
    assert cached["a"].num_computed_tokens == 4 and cached["b"].num_computed_tokens == 6
    assert sched.kv_cache_manager.get_block_ids("a")[-1] == cached["a"].new_block_ids[0]
    assert (a.num_computed_tokens, a.num_output_placeholders) == (5, 2)
    out2 = fake_run(nxt, sched, token=8)
    assert [o.new_token_ids for o in sched.update_from_output(first, out1)] == [[9], [9]]
    assert (a.num_computed_tokens, a.num_tokens, a.num_output_placeholders) == (5, 5, 1)
    sched.update_from_output(nxt, out2)
    assert (a.num_computed_tokens, a.num_tokens, a.num_output_placeholders) == (5, 6, 0)
    assert a.output_token_ids == [9, 8]


def test_block_with_the_token_in_flight_is_hashed_once_known() -> None:
    sched = make()
    sched.add_request(req("a", 3))
    first = sched.schedule()
    out1 = fake_run(first, sched, token=9)
    kv = sched.kv_cache_manager
    nxt = sched.schedule()
    # Block 0 holds tokens 1, 2, 3 and the one in flight: not hashed yet.
    assert kv.num_cached_blocks.get("a", 0) == 0
    out2 = fake_run(nxt, sched)
    sched.update_from_output(first, out1)
    third = sched.schedule()  # the token is known now: block 0 is full of known tokens
    assert third.num_scheduled_tokens == {"a": 1} and kv.num_cached_blocks["a"] == 1
    sched.update_from_output(nxt, out2)
    probe = Request("p", [1, 2, 3, 9, 0], SamplingParams(max_tokens=1), max_model_len=64)
    _, num_hit = kv.get_computed_blocks(probe)
    assert num_hit == BLOCK  # the registered hash is that of the real tokens


def test_prompt_chunks_in_flight() -> None:
    sched = make(budget=4, max_seqs=4)
    sched.add_request(req("long", 10))
    s1 = sched.schedule()  # a 4-token chunk of 10: samples nothing
    s2 = sched.schedule()  # the next chunk needs no token from the device
    assert s2.num_scheduled_tokens == {"long": 4} and s2.scheduled_cached_reqs[0].num_computed_tokens == 4
    assert sched.requests["long"].num_output_placeholders == 0
    assert sched.update_from_output(s1, fake_run(s1, sched)) == []
    s3 = sched.schedule()  # the last 2 tokens: they sample
    assert s3.num_scheduled_tokens == {"long": 2} and sched.requests["long"].num_output_placeholders == 1
    out3 = fake_run(s3, sched)
    sched.update_from_output(s2, ModelRunnerOutput({}))
    s4 = sched.schedule()  # the first output token is in flight
    assert s4.num_scheduled_tokens == {"long": 1} and s4.scheduled_cached_reqs[0].num_computed_tokens == 10
    assert [o.new_token_ids for o in sched.update_from_output(s3, out3)] == [[7]]


def test_penalty_with_a_token_in_flight_cannot_be_scheduled_ahead() -> None:
    sched = make()
    sched.add_request(req("p", 3, repetition_penalty=1.2))
    sched.add_request(req("q", 3))
    assert sched.can_schedule_ahead()
    s = sched.schedule()
    assert not sched.can_schedule_ahead()  # p's logits need the token in flight
    sched.update_from_output(s, fake_run(s, sched))
    assert sched.can_schedule_ahead()
    sched.finish_requests(["p"], RequestStatus.FINISHED_ABORTED)
    sched.schedule()
    assert sched.can_schedule_ahead()  # q has a token in flight, but no penalty


def test_new_requests_join_a_step_scheduled_in_flight() -> None:
    sched = make(budget=8, max_seqs=2)
    sched.add_request(req("a", 2))
    sched.schedule()
    sched.add_request(req("new", 3))
    sched.add_request(req("third", 3))  # no slot (max_num_seqs 2): keeps waiting
    nxt = sched.schedule()
    assert nxt.num_scheduled_tokens == {"a": 1, "new": 3}
    assert [n.req_id for n in nxt.scheduled_new_reqs] == ["new"]
    assert [r.request_id for r in sched.waiting] == ["third"]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_request_preempted_with_a_token_in_flight_gets_it_while_waiting(mode: str) -> None:
    sched = make(num_blocks=2, max_seqs=2, preemption_mode=mode, num_host_blocks=4)
    sched.add_request(req("a", 4))  # one full block; the token in flight needs the second
    sched.add_request(req("b", 3, first=50))
    s1 = sched.schedule()
    out1 = fake_run(s1, sched, token=9)
    s2 = sched.schedule()  # a takes the last block; b (started last) is preempted with its token in flight
    assert s2.num_scheduled_tokens == {"a": 1} and s2.num_preemptions == 1 and "b" in s2.finished_req_ids
    b = sched.requests["b"]
    assert b.num_output_placeholders == 1
    if mode == "swap":
        assert b.status == RequestStatus.SWAPPED and b.num_computed_tokens == 3
        assert s2.blocks_to_swap_out == [(1, 0)]
    else:
        assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    out2 = fake_run(s2, sched, token=8)
    outs = sched.update_from_output(s1, out1)
    assert [(o.request_id, o.new_token_ids) for o in outs] == [("a", [9]), ("b", [9])]
    waiting_status = RequestStatus.SWAPPED if mode == "swap" else RequestStatus.PREEMPTED
    assert b.output_token_ids == [9] and b.num_output_placeholders == 0 and b.status == waiting_status
    sched.update_from_output(s2, out2)
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    s3 = sched.schedule()  # b resumes with its token known
    (new,) = s3.scheduled_new_reqs
    assert new.req_id == "b" and new.output_token_ids == [9]
    assert s3.num_scheduled_tokens == {"b": 1 if mode == "swap" else 4}


def test_preempted_request_waits_for_its_token_in_flight() -> None:
    sched = make(num_blocks=2, max_seqs=2)
    sched.add_request(req("a", 4))
    sched.add_request(req("b", 3, first=50))
    s1 = sched.schedule()
    out1 = fake_run(s1, sched)
    s2 = sched.schedule()  # b preempted, token in flight
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)  # blocks free now
    s3 = sched.schedule()  # b's token is not known yet: it cannot resume
    assert s3.is_empty and [r.request_id for r in sched.waiting] == ["b"]
    sched.update_from_output(s1, out1)
    sched.update_from_output(s2, ModelRunnerOutput({}))
    sched.update_from_output(s3, ModelRunnerOutput({}))
    assert sched.schedule().num_scheduled_tokens == {"b": 4}


def test_priority_admission_preempts_a_request_with_a_token_in_flight() -> None:
    sched = make(num_blocks=2, max_seqs=2, policy="priority")
    sched.add_request(req("low", 4, priority=5))
    s1 = sched.schedule()
    out1 = fake_run(s1, sched, token=9)
    sched.add_request(req("high", 8, first=50, priority=0))  # needs both blocks
    s2 = sched.schedule()
    assert s2.num_scheduled_tokens == {"high": 8} and s2.num_preemptions == 1
    low = sched.requests["low"]
    assert low.status == RequestStatus.PREEMPTED and low.num_output_placeholders == 1
    out2 = fake_run(s2, sched, token=3)
    assert {o.request_id: o.new_token_ids for o in sched.update_from_output(s1, out1)} == {"low": [9]}
    assert {o.request_id: o.new_token_ids for o in sched.update_from_output(s2, out2)} == {"high": [3]}
    assert low.output_token_ids == [9]


def test_request_whose_last_token_is_in_flight_is_left_out() -> None:
    sched = make()
    sched.add_request(req("short", 2, max_tokens=1))
    sched.add_request(req("long", 2, max_tokens=5))
    s = sched.schedule()
    out = fake_run(s, sched)
    nxt = sched.schedule()
    assert nxt.num_scheduled_tokens == {"long": 1}
    outs = sched.update_from_output(s, out)
    assert {o.request_id: o.finish_reason for o in outs} == {"short": "length", "long": None}
    assert "short" not in sched.requests


def test_request_stopping_in_flight_is_dropped_from_the_next_step() -> None:
    sched = make()
    sched.add_request(req("a", 2, stop_token_ids=[5]))
    sched.add_request(req("b", 2))
    s = sched.schedule()
    out = fake_run(s, sched, token=5)
    nxt = sched.schedule()
    assert set(nxt.num_scheduled_tokens) == {"a", "b"}
    out_nxt = ModelRunnerOutput({"a": [6], "b": [6]})  # the runner does not know a stopped meanwhile
    outs = sched.update_from_output(s, out)  # a stops, b goes on
    assert {o.request_id: o.finish_reason for o in outs} == {"a": "stop", "b": None}
    assert sched.kv_cache_manager.get_block_ids("a") == []  # freed at once
    outs = sched.update_from_output(nxt, out_nxt)
    assert [o.request_id for o in outs] == ["b"]  # a's extra token is dropped
    third = sched.schedule()
    assert "a" in third.finished_req_ids and set(third.num_scheduled_tokens) == {"b"}


def test_id_of_a_request_aborted_in_flight_reused_at_once() -> None:
    sched = make()
    sched.add_request(req("x", 2))
    sched.add_request(req("y", 2))
    s1 = sched.schedule()
    out1 = fake_run(s1, sched)
    s2 = sched.schedule()
    out2 = ModelRunnerOutput({"x": [6], "y": [6]})
    sched.update_from_output(s1, out1)
    assert sched.finish_requests(["x"], RequestStatus.FINISHED_ABORTED) == ["x"]
    sched.add_request(req("x", 3))  # a new request with the same id
    s3 = sched.schedule()  # the old x is still in flight: the new one waits
    assert set(s3.num_scheduled_tokens) == {"y"} and not s3.scheduled_new_reqs
    out3 = fake_run(s3, sched)
    outs = sched.update_from_output(s2, out2)
    assert [o.request_id for o in outs] == ["y"]  # the old x's token does not reach the new x
    new_x = sched.requests["x"]
    assert (new_x.num_computed_tokens, new_x.num_output_tokens) == (0, 0)
    s4 = sched.schedule()
    assert s4.num_scheduled_tokens == {"y": 1, "x": 3}
    sched.update_from_output(s3, out3)


# ------------------------------------------------------------- draft tokens


def test_draft_tokens_are_scheduled_and_rejected_ones_rolled_back() -> None:
    sched = make(budget=16)
    sched.add_request(req("a", 5, max_tokens=20))
    s = sched.schedule()
    sched.update_from_output(s, fake_run(s, sched, token=9))
    a = sched.requests["a"]
    assert (a.num_computed_tokens, a.num_tokens) == (5, 6)
    a.spec_token_ids = [11, 12, 13]
    s = sched.schedule()
    assert s.num_scheduled_tokens == {"a": 4} and s.scheduled_spec_decode_tokens == {"a": [11, 12, 13]}
    assert s.total_num_scheduled_tokens == 4 and a.spec_token_ids == []
    assert a.num_computed_tokens == 9 and len(sched.kv_cache_manager.get_block_ids("a")) == 3  # 9 slots
    # Two drafts accepted, the third rejected: 11, 12 and the token sampled after them.
    outs = sched.update_from_output(s, ModelRunnerOutput({"a": [11, 12, 40]}))
    assert outs[0].new_token_ids == [11, 12, 40]
    assert (a.num_computed_tokens, a.num_tokens) == (8, 9) and a.output_token_ids == [9, 11, 12, 40]
    s = sched.schedule()
    assert s.num_scheduled_tokens == {"a": 1} and s.scheduled_spec_decode_tokens == {}
    assert s.scheduled_cached_reqs[0].num_computed_tokens == 8


def test_draft_tokens_within_budget_and_max_tokens_and_stop_per_token() -> None:
    sched = make(budget=4, max_seqs=4)
    sched.add_request(req("a", 2, max_tokens=3, stop_token_ids=[12]))
    sched.add_request(req("b", 2, max_tokens=10))
    s = sched.schedule()
    sched.update_from_output(s, fake_run(s, sched))
    a, b = sched.requests["a"], sched.requests["b"]
    a.spec_token_ids = [11, 12, 13, 14]  # a may emit 2 more tokens: one draft
    b.spec_token_ids = [21, 22, 23, 24]
    s = sched.schedule()
    assert s.scheduled_spec_decode_tokens == {"a": [11], "b": [21]}  # b: what the budget leaves (4 - 2)
    assert s.num_scheduled_tokens == {"a": 2, "b": 2}
    assert b.spec_token_ids == []
    outs = sched.update_from_output(s, ModelRunnerOutput({"a": [11, 30], "b": [5]}))
    got = {o.request_id: (o.new_token_ids, o.finish_reason) for o in outs}
    assert got == {"a": ([11, 30], "length"), "b": ([5], None)}
    assert (b.num_computed_tokens, b.num_tokens) == (3, 4)

    sched = make()
    sched.add_request(req("c", 2, max_tokens=10, stop_token_ids=[12]))
    s = sched.schedule()
    sched.update_from_output(s, fake_run(s, sched))
    sched.requests["c"].spec_token_ids = [11, 12, 13]
    s = sched.schedule()
    outs = sched.update_from_output(s, ModelRunnerOutput({"c": [11, 12, 13, 14]}))
    assert (outs[0].new_token_ids, outs[0].finish_reason, outs[0].stop_reason) == ([11, 12], "stop", 12)


# ------------------------------------------------- property: same as sync


def _token(rid: str, pos: int) -> int:
    """The fake model's token at position ``pos`` of request ``rid``."""
    return (sum(map(ord, rid)) * 7919 + pos * 104729) % 29 + 1


def _run(seed: int, async_steps: bool) -> dict[str, tuple[list[int], str]]:
    rng = random.Random(seed)
    policy = rng.choice(["fcfs", "priority"])
    mode = rng.choice(["recompute", "swap"])
    sched = make(budget=rng.choice([6, 16]), max_seqs=rng.choice([2, 4]), num_blocks=rng.choice([6, 10]),
                 caching=rng.random() < 0.5, policy=policy, preemption_mode=mode, num_host_blocks=6)
    reqs = []
    for i in range(10):
        prompt = [rng.randrange(1, 30) for _ in range(rng.randint(1, 12))]
        params = SamplingParams(max_tokens=rng.randint(1, 12), stop_token_ids=[rng.randrange(1, 30)])
        reqs.append((Request(f"r{i}", prompt, params, max_model_len=64, priority=rng.randrange(3)),
                     rng.choice([None, 1, 3])))
    abort_at = {r.request_id: at for r, at in reqs if at is not None}
    results: dict[str, tuple[list[int], str]] = {}
    in_flight: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
    pending = list(reqs)

    def launch(ahead: bool = False) -> None:
        s = sched.schedule()
        if ahead and s.is_empty and not s.blocks_to_swap_out:
            sched.unschedule_empty(s)  # as the engine core does
            return
        sampled = {rid: [_token(rid, sched.requests[rid].num_computed_tokens)] for rid in s.num_scheduled_tokens
                   if sched.requests[rid].num_computed_tokens >= sched.requests[rid].num_tokens}
        in_flight.append((s, ModelRunnerOutput(sampled)))

    for _ in range(500):
        if pending:
            sched.add_request(pending.pop(0)[0])
        if not in_flight:
            if not sched.has_unfinished_requests():
                break
            launch()
        if async_steps and sched.has_unfinished_requests():
            launch(ahead=True)
        s, out = in_flight.popleft()
        for o in sched.update_from_output(s, out):
            toks = results.setdefault(o.request_id, ([], None))[0]
            toks.extend(o.new_token_ids)
            results[o.request_id] = (toks, o.finish_reason)
        for rid, at in list(abort_at.items()):
            r = sched.requests.get(rid)
            if r is not None and r.num_output_tokens >= at:
                del abort_at[rid]
                sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
                results[rid] = (results.get(rid, ([], None))[0], "abort")
    assert not sched.has_unfinished_requests() and not in_flight
    assert sched.kv_cache_manager.usage == 0 and not sched._finished_in_flight
    return results


@pytest.mark.parametrize("seed", range(40))
def test_same_outputs_as_synchronous_scheduling(seed: int) -> None:
    sync = _run(seed, async_steps=False)
    assert len(sync) == 10
    assert _run(seed, async_steps=True) == sync


def test_an_empty_step_is_taken_back_and_its_forgotten_ids_go_with_the_next() -> None:
    sched = make()
    sched.add_request(req("a", 2, max_tokens=1))
    sched.add_request(req("b", 2, max_tokens=3))
    s1 = sched.schedule()
    out1 = fake_run(s1, sched)
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    empty = sched.schedule()  # a's only token is in flight; b is gone
    assert empty.is_empty and empty.finished_req_ids == {"b"}
    sched.unschedule_empty(empty)
    sched.update_from_output(s1, out1)
    sched.add_request(req("c", 2))
    s2 = sched.schedule()
    assert s2.finished_req_ids == {"a", "b"} and s2.num_scheduled_tokens == {"c": 2}
