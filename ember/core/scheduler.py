"""Scheduler: continuous batching under a token budget.

One rule covers prefill, chunked prefill and decode: every request has
``num_computed_tokens`` and each step gives it up to ``num_tokens -
num_computed_tokens`` more (and its tokens in flight and draft tokens, see
below), within the step's token budget
(``max_num_batched_tokens``) and the cap on running requests
(``max_num_seqs``). Running requests are served first, in the policy's order
(``ember.core.sched_policy``); then waiting requests join while budget and
blocks last. A newly admitted request first takes every leading block that is
already in the prefix cache and computes only the rest.

When a running request needs a block and none is free, the last running request
(the most recently started under ``fcfs``, the lowest priority under
``priority``) is preempted, by recompute (its blocks are freed; cheap when they
are still cached) or by swap (its blocks are copied to host memory and back
later; recompute when the host pool is full); with a KV pool in partitions
(data-parallel attention) the victim is the last running request of the needy
one's partition (only its blocks help). Under ``priority`` a waiting
request that outranks the last running one also preempts it when it cannot
start otherwise, and the fairness guard promotes requests that waited longer
than ``max_waiting_time_s``. (Design as in vLLM's v1 scheduler.)

Asynchronous scheduling uses the same :meth:`Scheduler.schedule`: a step may be
scheduled while the previous one still runs on the device. ``num_computed_tokens``
advances as soon as a step is scheduled, and a request whose next token that
step samples carries an output placeholder (``Request.num_output_placeholders``)
until :meth:`Scheduler.update_from_output` brings the token: the next step then
computes the token in flight (the runner feeds it on the device). A request
whose last allowed token is in flight is not scheduled again; one that stops on
a stop token in flight is computed once more and that token dropped. A request
preempted with a token in flight gets that token while it waits (it is known
before the request can resume). Only penalties and logits processors that read
the output (bad words) need the token in flight on the host
(:meth:`Scheduler.can_schedule_ahead`); grammar-constrained requests are
scheduled ahead too, their token masks are filled once the token in flight is
known (``SchedulerOutput.structured_output_req_ids``). Draft tokens (``Request.spec_token_ids``)
are scheduled after a request's last token like any other tokens; the step
returns the accepted ones and ``num_computed_tokens`` goes back over the rest.

Pipeline parallelism keeps several steps in flight (micro-batches) with
``schedule(skip_in_flight_outputs=True)``: a request whose next token is
still in flight waits for it (the first stage needs that token on its host),
so each step in flight holds other requests, or further prefill chunks of
the same ones (their tokens are known, and every stage runs steps in order).

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
from collections import deque
from collections.abc import Callable, Iterable
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
from ember.outputs import SampleLogprob
from ember.request import Request, RequestStatus
from ember.sample.logits_processor import reads_output_history
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
    spec_tokens: dict[str, list[int]] = field(default_factory=dict)


def _advance(req: Request, num_new: int) -> None:
    """Count ``num_new`` scheduled tokens of ``req`` as computed; a step that
    reaches its last token samples the next one (a placeholder until then)."""
    req.num_computed_tokens += num_new
    if req.num_computed_tokens >= req.num_tokens:
        req.num_output_placeholders += 1


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
        # Steps scheduled and not yet passed to update_from_output, oldest first.
        self._in_flight: deque[SchedulerOutput] = deque()
        # Ids of requests that finished while steps that compute them were in
        # flight -> how many such steps: their results are dropped, and a new
        # request with the same id waits until they are all in.
        self._finished_in_flight: dict[str, int] = {}
        # Ids of unfinished requests that use penalties (or a logits processor
        # that reads the output tokens).
        self._penalized: set[str] = set()
        # Ids of unfinished requests with a grammar (Request.structured_output).
        self._structured: set[str] = set()

    # ------------------------------------------------------------------ queue
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        request.waiting_since = self._clock()
        self.policy.add_waiting(request)
        if uses_penalty(request.sampling_params) or reads_output_history(request.sampling_params):
            self._penalized.add(request.request_id)
        if request.structured_output is not None:
            self._structured.add(request.request_id)

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

    def can_schedule_ahead(self) -> bool:
        """Whether the next step may be scheduled before the steps in flight
        are updated: False while a request that uses penalties (or bad words)
        has a token in flight (its logits need that token on the host)."""
        return not any(self.requests[r].num_output_placeholders for r in self._penalized)

    def get_num_unfinished_requests(self) -> int:
        return len(self.running) + self.policy.num_waiting()

    def get_stats(self) -> SchedulerStats:
        """A snapshot of the counters and the current queue sizes."""
        kv = self.kv_cache_manager
        return dataclasses.replace(
            self.counters, num_running=len(self.running), num_waiting=self.policy.num_waiting(),
            kv_cache_usage=kv.usage, prefix_cache=dataclasses.replace(kv.prefix_cache_stats),
            spec_accepted_per_pos=list(self.counters.spec_accepted_per_pos),
            spec_drafts_per_pos=list(self.counters.spec_drafts_per_pos),
            num_evicted_blocks=kv.block_pool.num_evicted_blocks)

    # --------------------------------------------------------------- schedule
    def schedule(self, skip_in_flight_outputs: bool = False) -> SchedulerOutput:
        """Pick the next step's work and count it as computed. Never returns
        more than the token budget. Steps in flight (scheduled, not yet
        updated) are allowed: see the module docstring. With
        ``skip_in_flight_outputs``, requests with a token in flight are left
        out (pipeline micro-batches)."""
        plan = _StepPlan(budget=self.config.max_num_batched_tokens)
        self._promote_starved()
        self._preempt_for_waiting(plan)
        self._schedule_running(plan, skip_in_flight_outputs)
        self._schedule_waiting(plan)
        # NOTE: the runner copies swap-outs before swap-ins; a host block must not
        # be both written and read in one step (swap-ins follow every swap-out here).
        assert not {h for _, h in plan.swap_out} & {h for _, h in plan.swap_in}
        out = self._output(plan)
        self._in_flight.append(out)
        return out

    def unschedule_empty(self, sched: SchedulerOutput) -> None:
        """Take back ``sched``, the last scheduled step, when it computes
        nothing and copies no block out and so need not run (e.g. every
        running request has its last token in flight): the requests it tells
        the runner to forget go with the next step instead."""
        assert sched.is_empty and not sched.blocks_to_swap_out and self._in_flight[-1] is sched
        self._in_flight.pop()
        self._forget_req_ids |= sched.finished_req_ids

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
            scheduled_spec_decode_tokens=plan.spec_tokens,
        )
        if self._structured:
            # NOTE: a request samples when the step reaches its last token (the
            # runner's rule); its mask is filled later, when its tokens up to
            # this one are known (EngineCore).
            requests = self.requests
            out.structured_output_req_ids = [
                r for r in plan.num_scheduled
                if r in self._structured and requests[r].num_computed_tokens >= requests[r].num_tokens]
        self._forget_req_ids = set()
        return out

    def _schedule_running(self, plan: _StepPlan, skip_in_flight_outputs: bool = False) -> None:
        """Give each running request its next tokens, in order (those with a
        token in flight too, unless ``skip_in_flight_outputs``); preempt from
        the end of the list when blocks run out."""
        # NOTE: this loop runs for every running request every step: plain
        # locals, no per-request helper calls on the common (decode) path.
        running, allocate_slots = self.running, self.kv_cache_manager.allocate_slots
        num_scheduled, cached_reqs = plan.num_scheduled, plan.cached_reqs
        lookahead, max_len = self.config.num_lookahead_tokens, self.config.max_model_len
        partitioned = self.kv_cache_manager.num_partitions > 1
        idx = 0
        while idx < len(running) and plan.budget > 0:
            req = running[idx]
            placeholders = req.num_output_placeholders
            if placeholders and (skip_in_flight_outputs or req.num_output_tokens + placeholders >= req.max_tokens):
                idx += 1  # its last token, or a token the next step's input needs, is in flight
                continue
            num_tokens, computed = req.num_tokens, req.num_computed_tokens
            num_new = num_tokens + placeholders - computed
            assert num_new > 0, f"{req} has nothing to compute"
            drafts = self._take_drafts(req, num_new, plan.budget) if req.spec_token_ids else None
            if drafts:
                num_new += len(drafts)
            elif num_new > plan.budget:
                num_new = plan.budget
            la = max(0, min(lookahead, max_len - computed - num_new)) if lookahead else 0
            while (new_blocks := allocate_slots(req, num_new, None, la)) is None:
                victim = self._pop_victim(idx) if partitioned else running.pop()
                self._preempt(victim, plan)
                if victim is req:
                    break
            if new_blocks is None:
                continue  # req was preempted: the next one took its place (if any)
            if drafts:
                plan.spec_tokens[req.request_id] = drafts
            num_scheduled[req.request_id] = num_new
            plan.budget -= num_new
            cached_reqs.append(CachedRequestData(req.request_id, [b.block_id for b in new_blocks], computed))
            req.num_computed_tokens = computed = computed + num_new
            if computed >= num_tokens:
                req.num_output_placeholders = placeholders + 1
            idx += 1

    def _pop_victim(self, idx: int) -> Request:
        """Take out of ``running`` the request to preempt so that
        ``running[idx]`` gets blocks, with a partitioned KV pool: the last one
        after it in the same partition (only those blocks help), else itself."""
        running, partition_of = self.running, self.kv_cache_manager.partition_of
        p = partition_of(running[idx])
        for j in range(len(running) - 1, idx, -1):
            if partition_of(running[j]) == p:
                return running.pop(j)
        return running.pop(idx)

    @staticmethod
    def _take_drafts(req: Request, num_new: int, budget: int) -> list[int]:
        """The draft tokens of ``req`` to schedule after its last token (within
        the budget and its ``max_tokens``), consumed from ``req.spec_token_ids``.
        Empty unless it decodes with no token in flight."""
        drafts, req.spec_token_ids = req.spec_token_ids, []
        if num_new != 1 or req.num_output_placeholders:
            return []
        return drafts[: min(budget, req.max_tokens - req.num_output_tokens) - 1]

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        """Admit waiting requests in policy order while budget, slots and
        blocks last (stopping at one with a token in flight, or whose id is
        that of a finished request still in flight: results are matched by id)."""
        while (self.policy.num_waiting() and plan.budget > 0
               and len(self.running) < self.config.max_num_seqs):
            req = self.policy.peek_waiting()
            if req.num_output_placeholders or req.request_id in self._finished_in_flight:
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
                pooling_params=req.pooling_params,
            ))
            _advance(req, num_new)

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
        lookahead = max(0, min(self.config.num_lookahead_tokens, self.config.max_model_len - num_hit_tokens - num_new))
        if kv.allocate_slots(req, num_new, hits, lookahead) is None:
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
        return needed <= kv.num_free_blocks(req)

    def _preempt_for_waiting(self, plan: _StepPlan) -> None:
        """Preempt running requests that the next waiting request outranks,
        from the last, until it fits. Runs before anything is scheduled."""
        if not self.policy.num_waiting():
            return
        cand = self.policy.peek_waiting()
        if cand.num_output_placeholders:
            return  # it cannot start before its token in flight is known
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
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.counters.num_preemptions += 1
        req.waiting_since = self._clock()
        self.policy.requeue_preempted(req)
        self._forget_req_ids.add(req.request_id)
        plan.preempted.append(req)
        logger.debug("preempted %s (%s)", req.request_id, req.status.name)

    # ----------------------------------------------------------------- update
    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Take a step's results (steps are updated in the order they were
        scheduled): append each request's new tokens, take back the rejected
        draft tokens, finish requests that hit a stop token or their length
        limit. Results of requests that finished meanwhile are dropped.

        Returns:
            One output per request that got tokens.
        """
        if self._in_flight and self._in_flight[0] is sched:
            self._in_flight.popleft()
        elif sched in self._in_flight:
            self._in_flight.remove(sched)
        stale = self._retire_finished_in_flight(sched) if self._finished_in_flight else ()
        if result.prompt_logprobs:
            self._update_prompt_logprobs(result.prompt_logprobs, stale)
        spec = sched.scheduled_spec_decode_tokens
        all_logprobs = result.logprobs
        outputs: list[EngineCoreOutput] = []
        if result.pooler_output:
            self._finish_pooled(result.pooler_output, stale, outputs)
        for req_id, tokens in result.sampled_token_ids.items():
            if stale and req_id in stale:
                continue
            req = self.requests.get(req_id)
            if req is None:
                continue  # aborted while the step ran
            req.num_output_placeholders -= 1
            if spec:
                # NOTE: the step computed every draft; the K/V of rejected ones is
                # overwritten when their positions are computed again.
                num_drafts = len(spec.get(req_id, ()))
                num_rejected = num_drafts + 1 - len(tokens)
                req.num_computed_tokens -= num_rejected
                if num_drafts:
                    self._count_drafts(num_drafts, len(tokens) - 1)
            was_running = req.status == RequestStatus.RUNNING
            if len(tokens) == 1:
                req.append_output_token(tokens[0])
                self._check_stop(req, tokens[0])
            else:
                tokens = self._append_tokens(req, tokens)
            if req.structured_output is not None:
                self._advance_grammar(req, tokens)
            finish = req.status.finish_reason
            logprobs = all_logprobs.get(req_id) if all_logprobs else None
            if logprobs is not None and len(logprobs) > len(tokens):
                logprobs = logprobs[: len(tokens)]
            first_tokens = req.prompt_logprobs is not None and req.num_output_tokens == len(tokens)
            outputs.append(EngineCoreOutput(req_id, tokens, finish, req.stop_reason, logprobs,
                                            req.prompt_logprobs if first_tokens else None))
            if finish is not None:
                if was_running:
                    self.running.remove(req)
                else:  # preempted with this token in flight
                    self.policy.remove_waiting(req)
                self._free_request(req)
        return outputs

    @staticmethod
    def _advance_grammar(req: Request, tokens: list[int]) -> None:
        """Advance ``req``'s grammar over its new tokens; it finishes (stopped)
        when the grammar terminates, even when EOS does not stop it (``ignore_eos``)."""
        if not req.structured_output.accept_tokens(tokens) and not req.status.is_finished:
            req.status = RequestStatus.FINISHED_STOPPED

    def _finish_pooled(self, pooler_output: dict[str, list[float]], stale: set[str] | tuple,
                       outputs: list[EngineCoreOutput]) -> None:
        """Finish the pooling requests whose prompt a step completed, each with
        its pooled hidden states (finish reason ``stop``; no token)."""
        for req_id, pooled in pooler_output.items():
            req = self.requests.get(req_id)
            if req is None or req_id in stale:
                continue
            req.num_output_placeholders -= 1
            req.status = RequestStatus.FINISHED_STOPPED
            if req in self.running:
                self.running.remove(req)
            else:  # preempted after its last step was launched
                self.policy.remove_waiting(req)
            outputs.append(EngineCoreOutput(req_id, [], "stop", pooled=pooled))
            self._free_request(req)

    def _count_drafts(self, num_drafts: int, num_accepted: int) -> None:
        c = self.counters
        c.spec_num_drafts += 1
        c.spec_num_draft_tokens += num_drafts
        c.spec_num_accepted_tokens += num_accepted
        for per_pos in (c.spec_drafts_per_pos, c.spec_accepted_per_pos):
            if len(per_pos) < num_drafts:
                per_pos.extend([0] * (num_drafts - len(per_pos)))
        for j in range(num_drafts):
            c.spec_drafts_per_pos[j] += 1
        for j in range(num_accepted):
            c.spec_accepted_per_pos[j] += 1

    def _append_tokens(self, req: Request, tokens: list[int]) -> list[int]:
        """Append ``tokens`` up to the first that finishes ``req``; returns those appended."""
        for i, token in enumerate(tokens):
            req.append_output_token(token)
            self._check_stop(req, token)
            if req.status.is_finished:
                return tokens[: i + 1]
        return tokens

    def _update_prompt_logprobs(self, prompt_logprobs: dict[str, tuple[int, list[SampleLogprob]]],
                                stale: set[str] | tuple) -> None:
        for req_id, (first, entries) in prompt_logprobs.items():
            req = self.requests.get(req_id)
            if req is None or req.prompt_logprobs is None or req_id in stale:
                continue
            if first == len(req.prompt_logprobs) + 1:  # not a recomputation after preemption
                req.prompt_logprobs.extend(entries)

    def _retire_finished_in_flight(self, sched: SchedulerOutput) -> set[str]:
        """The ids of finished requests whose results in ``sched`` are stale;
        forgets those with no other step in flight."""
        stale = {r for r in self._finished_in_flight if r in sched.num_scheduled_tokens}
        for r in stale:
            self._finished_in_flight[r] -= 1
            if not self._finished_in_flight[r]:
                del self._finished_in_flight[r]
        return stale

    def _check_stop(self, req: Request, token: int) -> None:
        # NOTE: the sampler bans stop tokens within min_tokens; this guards
        # rows whose every other token was masked too.
        if token in req.stop_token_ids and req.num_output_tokens > req.sampling_params.min_tokens:
            req.status = RequestStatus.FINISHED_STOPPED
            if token in req.sampling_params.stop_token_ids:
                req.stop_reason = token
        elif req.num_output_tokens >= req.max_tokens:
            req.status = RequestStatus.FINISHED_LENGTH_CAPPED

    def _free_request(self, req: Request) -> None:
        req_id = req.request_id
        self.kv_cache_manager.free(req)
        self._forget_req_ids.add(req_id)
        del self.requests[req_id]
        self._penalized.discard(req_id)
        self._structured.discard(req_id)
        if self._in_flight:
            num_steps = sum(1 for s in self._in_flight if req_id in s.num_scheduled_tokens)
            if num_steps:
                self._finished_in_flight[req_id] = num_steps
