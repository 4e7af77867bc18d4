"""Scheduler: continuous batching under a token budget.

One rule covers prefill, chunked prefill and decode: every request has
``num_computed_tokens`` and each step gives it up to ``num_tokens -
num_computed_tokens`` more, within the step's token budget
(``max_num_batched_tokens``) and the cap on running requests
(``max_num_seqs``). Running requests are served first, in the order they
started; then waiting requests join while budget and blocks last. When a running
request needs a block and none is free, the most recently started running
request is preempted: its blocks are freed and it is recomputed later, from
the front of the waiting queue. (Design as in vLLM's v1 scheduler.)
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from ember.config import SchedulerConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.sched_output import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from ember.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class Scheduler:
    """Decides, each step, which requests compute how many tokens.

    Args:
        scheduler_config: token budget and request cap.
        kv_cache_manager: owns the KV blocks.
    """

    def __init__(self, scheduler_config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = scheduler_config
        self.kv_cache_manager = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests the runner must forget at the next step.
        self._forget_req_ids: set[str] = set()
        self.num_preemptions_total = 0

    # ------------------------------------------------------------------ queue
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

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
                self.waiting.remove(req)
            req.status = status
            self._free_request(req)
            done.append(req_id)
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    # --------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Pick this step's work. Never returns more than the token budget."""
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        cached_reqs: list[CachedRequestData] = []
        new_reqs: list[NewRequestData] = []
        preempted = 0

        idx = 0
        while idx < len(self.running) and budget > 0:
            req = self.running[idx]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            assert num_new > 0, f"{req} has nothing to compute"
            while (new_blocks := self.kv_cache_manager.allocate_slots(req, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
            if new_blocks is None:
                break
            num_scheduled[req.request_id] = num_new
            budget -= num_new
            cached_reqs.append(CachedRequestData(
                req.request_id, [b.block_id for b in new_blocks], req.num_computed_tokens))
            idx += 1

        # NOTE: after a preemption no waiting request may start this step, or the
        # preempted one (now at the front of the queue) could be overtaken.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if self.kv_cache_manager.allocate_slots(req, num_new) is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num_scheduled[req.request_id] = num_new
            budget -= num_new
            new_reqs.append(NewRequestData(
                req_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=list(req.output_token_ids),
                sampling_params=req.sampling_params,
                block_ids=self.kv_cache_manager.get_block_ids(req.request_id),
                num_computed_tokens=req.num_computed_tokens,
            ))

        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
            finished_req_ids=self._forget_req_ids,
            num_preemptions=preempted,
        )
        self._forget_req_ids = set()
        return out

    def _preempt(self, req: Request) -> None:
        """Free ``req``'s blocks and requeue it at the front; it is recomputed
        from scratch (prompt + outputs so far), so its final output is unchanged."""
        self.kv_cache_manager.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(req)
        self._forget_req_ids.add(req.request_id)
        logger.debug("preempted %s", req.request_id)

    # ----------------------------------------------------------------- update
    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advance requests by what the step computed and sampled; finish those
        that hit a stop token or their length limit."""
        outputs: list[EngineCoreOutput] = []
        for req_id, n in sched.num_scheduled_tokens.items():
            req = self.requests.get(req_id)
            if req is None or req.is_finished():
                continue  # aborted while the step ran
            req.num_computed_tokens += n
            token = result.sampled_token_ids.get(req_id)
            if token is None:
                continue
            req.append_output_token(token)
            self._check_stop(req, token)
            finish = req.status.finish_reason
            outputs.append(EngineCoreOutput(req_id, [token], finish, req.stop_reason))
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
