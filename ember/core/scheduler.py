"""Scheduler: continuous batching under a token budget.

One rule covers prefill, chunked prefill and decode: every request has
``num_computed_tokens`` and each step gives it up to ``num_tokens -
num_computed_tokens`` more, within the step's token budget
(``max_num_batched_tokens``) and the cap on running requests
(``max_num_seqs``). Running requests are served first, in the policy's order
(``ember.core.sched_policy``); then waiting requests join while budget and
blocks last. A newly admitted request first takes every leading block that is
already in the prefix cache and computes only the rest.

When a running request needs a block and none is free, the last running request
(the most recently started under ``fcfs``, the lowest priority under
``priority``) is preempted, by recompute (its blocks are freed; cheap when they
are still cached) or by swap (its blocks are copied to host memory and back
later; recompute when the host pool is full). Under ``priority`` a waiting
request that outranks the last running one also preempts it when it cannot
start otherwise, and the fairness guard promotes requests that waited longer
than ``max_waiting_time_s``. (Design as in vLLM's v1 scheduler.)

NOTE: a request is never preempted in a step that already scheduled it: victims
are taken from the end of ``running``, past the requests served so far, or
before any is served. The KV cache manager relies on this (see its NOTE).
NOTE: the scheduler knows nothing of ``n > 1``: the front end
(``ember.engine.output_processor``) fans a request out into n sibling requests
with the same prompt and submits them together. They wait next to each other
and are usually admitted in the same step, where all but the first hit the
prompt's full blocks that the first registers in the prefix cache when they are
allocated (with prefix caching on; without it each computes the prompt).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

from ember.config import SchedulerConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.sched_output import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from ember.core.sched_policy import SCHEDULING_POLICIES
from ember.core.stats import SchedulerStats
from ember.logger import init_logger
from ember.request import Request, RequestStatus
from ember.sample.penalties import uses_penalty

logger = init_logger(__name__)


@dataclass
class _StepPlan:
    """The schedule being built in one call of :meth:`Scheduler.schedule`."""

    budget: int
    num_scheduled: dict[str, int] = field(default_factory=dict)
    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: list[CachedRequestData] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def add_running(self, req: Request, num_new: int, new_blocks: list, num_computed: int) -> None:
        """Schedule ``num_new`` tokens of running ``req`` from position
        ``num_computed``, with the blocks just allocated for them."""
        self.num_scheduled[req.request_id] = num_new
        self.budget -= num_new
        self.cached_reqs.append(CachedRequestData(req.request_id, [b.block_id for b in new_blocks], num_computed))


class Scheduler:
    """Decides, each step, which requests compute how many tokens.

    Args:
        scheduler_config: token budget, request cap, policy, preemption mode.
        kv_cache_manager: owns the KV blocks (and the host swap pool).
        clock: monotonic time in seconds (the fairness guard reads it; tests
            pass a fake one).
    """

    def __init__(self, scheduler_config: SchedulerConfig, kv_cache_manager: KVCacheManager,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = scheduler_config
        self.kv_cache_manager = kv_cache_manager
        self.policy = SCHEDULING_POLICIES[scheduler_config.policy]()
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []
        self._clock = clock
        # Requests the runner must forget at the next step.
        self._forget_req_ids: set[str] = set()
        self.counters = SchedulerStats()

    # ------------------------------------------------------------------ queue
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        request.waiting_since = self._clock()
        self.policy.add_waiting(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[str]:
        """End requests from outside the step loop (abort, stop string).

        Returns:
            The ids that were still unfinished (and are now finished).
        """
        assert status.is_finished
        done = []
        for req_id in request_ids:
            req = self.requests.get(req_id)
            if req is None or req.is_finished():
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.policy.remove_waiting(req)
            req.status = status
            self._free_request(req)
            done.append(req_id)
        return done

    @property
    def waiting(self) -> list[Request]:
        """Waiting requests (new, preempted, swapped) in admission order."""
        return list(self.policy.iter_waiting())

    @property
    def num_preemptions_total(self) -> int:
        return self.counters.num_preemptions

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or self.policy.num_waiting() > 0

    def get_num_unfinished_requests(self) -> int:
        return len(self.running) + self.policy.num_waiting()

    def get_stats(self) -> SchedulerStats:
        """A snapshot of the counters and the current queue sizes."""
        kv = self.kv_cache_manager
        return dataclasses.replace(
            self.counters, num_running=len(self.running), num_waiting=self.policy.num_waiting(),
            kv_cache_usage=kv.usage, prefix_cache=dataclasses.replace(kv.prefix_cache_stats),
            num_evicted_blocks=kv.block_pool.num_evicted_blocks)

    # --------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Pick this step's work. Never returns more than the token budget."""
        plan = _StepPlan(budget=self.config.max_num_batched_tokens)
        self._promote_starved()
        self._preempt_for_waiting(plan)
        self._schedule_running(plan)
        self._schedule_waiting(plan)
        # NOTE: the runner copies swap-outs before swap-ins; a host block must not
        # be both written and read in one step (swap-ins follow every swap-out here).
        assert not {h for _, h in plan.swap_out} & {h for _, h in plan.swap_in}
        return self._output(plan)

    def _output(self, plan: _StepPlan) -> SchedulerOutput:
        """The step ``plan`` describes; the runner forgets the finished requests with it."""
        out = SchedulerOutput(
            scheduled_new_reqs=plan.new_reqs,
            scheduled_cached_reqs=plan.cached_reqs,
            num_scheduled_tokens=plan.num_scheduled,
            total_num_scheduled_tokens=self.config.max_num_batched_tokens - plan.budget,
            finished_req_ids=self._forget_req_ids,
            num_preemptions=len(plan.preempted),
            blocks_to_swap_out=plan.swap_out,
            blocks_to_swap_in=plan.swap_in,
        )
        self._forget_req_ids = set()
        return out

    def schedule_ahead(self, in_flight: SchedulerOutput) -> SchedulerOutput | None:
        """Asynchronous scheduling: the next step, picked while ``in_flight`` (the
        last step, whose tokens are not known yet) still runs on the device.

        The running requests get what :meth:`schedule` would give them, in the
        same order and budget, without their tokens in flight being known: one
        that samples its next token in ``in_flight`` gets that token (the runner
        feeds it from the device without a round trip to the host); one whose
        prompt ``in_flight`` only partly prefills (or that it did not schedule)
        gets its next chunk of known tokens. A request with a token in flight
        and a penalty makes the step wait (its logits need that token). Then new
        requests are admitted as :meth:`schedule` would, when that needs no
        preemption (FCFS with only new requests waiting). A request that reaches
        ``max_tokens`` in ``in_flight`` is left out; one that stops on a stop
        token there is computed once more and that token dropped
        (:meth:`update_from_output` skips finished requests). Prefix-cache
        hashes only cover known tokens, so the block holding a token in flight
        is registered one step later.

        Returns:
            The step, or None when it cannot be planned ahead (a penalty, a
            policy that may preempt, or a missing block): the caller then waits
            for ``in_flight`` and calls :meth:`schedule`.
        """
        num_scheduled = in_flight.num_scheduled_tokens
        if not self.running or len(self.running) > self.config.max_num_batched_tokens:
            return None
        if self.policy.num_waiting() and (self.policy.name != "fcfs"
                                          or self.policy.peek_waiting().status != RequestStatus.WAITING):
            return None  # admission may preempt (FCFS requeues preempted requests at the front)
        for req in self.running:
            n = num_scheduled.get(req.request_id, 0)
            if n and req.num_computed_tokens + n == req.num_tokens and uses_penalty(req.sampling_params):
                return None
        plan = _StepPlan(budget=self.config.max_num_batched_tokens)
        for req in self.running:
            if plan.budget <= 0:
                break
            # NOTE: positions count as if in_flight were done; the request itself
            # still counts num_computed_tokens from before it.
            start = req.num_computed_tokens + num_scheduled.get(req.request_id, 0)
            if start == req.num_tokens:  # samples in flight: this step computes that token
                if req.num_output_tokens + 1 >= req.max_tokens:
                    continue  # finishes in flight
                num_new = 1
            else:  # the rest of its known tokens (a prompt chunk)
                num_new = min(req.num_tokens - start, plan.budget)
            new_blocks = self.kv_cache_manager.allocate_slots(req, start + num_new - req.num_computed_tokens)
            if new_blocks is None:
                return None  # blocks allocated so far stay with their requests (they need them next)
            plan.add_running(req, num_new, new_blocks, start)
        # NOTE: a new request reusing the id of an aborted one still in flight
        # waits until that step is collected (results are matched by id).
        self._schedule_waiting(plan, exclude=num_scheduled)
        return self._output(plan) if plan.num_scheduled else None

    def _schedule_running(self, plan: _StepPlan) -> None:
        """Give each running request its next tokens, in order; preempt from
        the end of the list when blocks run out."""
        idx = 0
        while idx < len(self.running) and plan.budget > 0:
            req = self.running[idx]
            num_new = min(req.num_tokens - req.num_computed_tokens, plan.budget)
            assert num_new > 0, f"{req} has nothing to compute"
            while (new_blocks := self.kv_cache_manager.allocate_slots(req, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim, plan)
                if victim is req:
                    break
            if new_blocks is None:
                break
            plan.add_running(req, num_new, new_blocks, req.num_computed_tokens)
            idx += 1

    def _schedule_waiting(self, plan: _StepPlan, exclude: Container[str] = ()) -> None:
        """Admit waiting requests in policy order while budget, slots and
        blocks last (stopping at one whose id is in ``exclude``)."""
        while (self.policy.num_waiting() and plan.budget > 0
               and len(self.running) < self.config.max_num_seqs):
            req = self.policy.peek_waiting()
            if req.request_id in exclude:
                break
            # NOTE: a request preempted this step must not be overtaken by one it
            # outranks (FCFS: by anyone), or the two would trade places every step.
            if not all(self.policy.outranks(req, victim) for victim in plan.preempted):
                break
            num_new = self._admit(req, plan)
            if num_new is None:
                break
            self.policy.pop_waiting()
            req.status = RequestStatus.RUNNING
            self.policy.add_running(self.running, req)
            plan.num_scheduled[req.request_id] = num_new
            plan.budget -= num_new
            plan.new_reqs.append(NewRequestData(
                req_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=list(req.output_token_ids),
                sampling_params=req.sampling_params,
                block_ids=self.kv_cache_manager.get_block_ids(req.request_id),
                num_computed_tokens=req.num_computed_tokens,
            ))

    def _admit(self, req: Request, plan: _StepPlan) -> int | None:
        """Give a waiting request blocks for its first chunk: swap a swapped
        one back in, else take its prefix-cache hits and allocate the rest.

        Returns:
            Tokens it computes this step, or None if too few blocks are free.
        """
        kv = self.kv_cache_manager
        if req.status == RequestStatus.SWAPPED:
            num_new = min(req.num_tokens - req.num_computed_tokens, plan.budget)
            pairs = kv.swap_in(req, num_new)
            if pairs is None:
                return None
            plan.swap_in.extend(pairs)
            self.counters.num_swap_ins += 1
            self.counters.num_blocks_swapped_in += len(pairs)
            return num_new
        assert req.num_computed_tokens == 0, f"{req} is waiting with computed tokens"
        hits, num_hit_tokens = kv.get_computed_blocks(req)
        num_new = min(req.num_tokens - num_hit_tokens, plan.budget)
        if kv.allocate_slots(req, num_new, hits) is None:
            return None
        kv.record_prefix_cache_query(req.num_tokens, num_hit_tokens)
        req.num_computed_tokens = num_hit_tokens
        return num_new

    def _fits(self, req: Request, budget: int) -> bool:
        """Whether waiting ``req`` could start now (a slot and its blocks)."""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        kv = self.kv_cache_manager
        num_new = min(req.num_tokens - req.num_computed_tokens, budget)
        if req.status == RequestStatus.SWAPPED:
            needed = kv.num_blocks_to_swap_in(req, num_new)
        else:
            hits, num_hit_tokens = kv.get_computed_blocks(req)
            needed = kv.num_blocks_to_allocate(req, min(num_new, req.num_tokens - num_hit_tokens), hits)
        return needed <= kv.block_pool.get_num_free_blocks()

    def _preempt_for_waiting(self, plan: _StepPlan) -> None:
        """Preempt running requests that the next waiting request outranks,
        from the last, until it fits. Runs before anything is scheduled."""
        if not self.policy.num_waiting():
            return
        cand = self.policy.peek_waiting()
        while self.running and self.policy.outranks(cand, self.running[-1]) and not self._fits(cand, plan.budget):
            self._preempt(self.running.pop(), plan)

    def _promote_starved(self) -> None:
        """Fairness guard: lift waiting requests that waited longer than
        ``max_waiting_time_s`` above every priority (under ``priority``)."""
        limit = self.config.max_waiting_time_s
        if limit is not None and self.policy.num_waiting():
            self.counters.num_priority_promotions += self.policy.promote_starved(self._clock(), limit)

    def _preempt(self, req: Request, plan: _StepPlan) -> None:
        """Take ``req`` off the device and requeue it. By swap when configured
        and the host pool has room: its computed tokens survive. Otherwise by
        recompute: its blocks are freed (cached ones keep their hash) and it is
        recomputed from scratch (prompt + outputs so far), so its final output
        is unchanged."""
        kv = self.kv_cache_manager
        if self.config.preemption_mode == "swap" and kv.can_swap_out(req):
            pairs = kv.swap_out(req)
            plan.swap_out.extend(pairs)
            req.status = RequestStatus.SWAPPED
            self.counters.num_swap_outs += 1
            self.counters.num_blocks_swapped_out += len(pairs)
        else:
            kv.free(req)
            req.status = RequestStatus.PREEMPTED
            req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.counters.num_preemptions += 1
        req.waiting_since = self._clock()
        self.policy.requeue_preempted(req)
        self._forget_req_ids.add(req.request_id)
        plan.preempted.append(req)
        logger.debug("preempted %s (%s)", req.request_id, req.status.name)

    # ----------------------------------------------------------------- update
    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advance requests by what the step computed and sampled; finish those
        that hit a stop token or their length limit."""
        outputs: list[EngineCoreOutput] = []
        for req_id, n in sched.num_scheduled_tokens.items():
            req = self.requests.get(req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran (its id may be waiting again already)
            req.num_computed_tokens += n
            if req.prompt_logprobs is not None and req_id in result.prompt_logprobs:
                first, entries = result.prompt_logprobs[req_id]
                if first == len(req.prompt_logprobs) + 1:  # not a recomputation after preemption
                    req.prompt_logprobs.extend(entries)
            token = result.sampled_token_ids.get(req_id)
            if token is None:
                continue
            req.append_output_token(token)
            self._check_stop(req, token)
            finish = req.status.finish_reason
            logprob = result.logprobs.get(req_id)
            first_token = req.prompt_logprobs is not None and req.num_output_tokens == 1
            outputs.append(EngineCoreOutput(req_id, [token], finish, req.stop_reason,
                                            None if logprob is None else [logprob],
                                            req.prompt_logprobs if first_token else None))
            if finish is not None:
                self.running.remove(req)
                self._free_request(req)
        return outputs

    def _check_stop(self, req: Request, token: int) -> None:
        if token in req.stop_token_ids:
            req.status = RequestStatus.FINISHED_STOPPED
            if token in req.sampling_params.stop_token_ids:
                req.stop_reason = token
        elif req.num_output_tokens >= req.max_tokens:
            req.status = RequestStatus.FINISHED_LENGTH_CAPPED

    def _free_request(self, req: Request) -> None:
        self.kv_cache_manager.free(req)
        self._forget_req_ids.add(req.request_id)
        del self.requests[req.request_id]
