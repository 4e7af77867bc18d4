"""EngineCore: schedule -> execute -> update, one step at a time.

With asynchronous scheduling (``SchedulerConfig.async_scheduling``) a step is
launched on the device before the previous one's sampled ids are read: while
the device runs step N+1, the host reads step N's tokens, checks stops and
builds the outputs, so the device does not wait for the host between decode
steps. Step N+1 comes from the same :meth:`Scheduler.schedule` as any step:
requests whose token step N samples continue from it (the worker feeds it on
the device). The core waits for step N before scheduling only when
:meth:`Scheduler.can_schedule_ahead` says a request needs its token on the host
(penalties). The outputs are the same either way (token for token under greedy
or seeded sampling); a request that hits a stop token costs one extra token of
compute, and a request arriving while a step is in flight starts one step later.

Grammar-constrained requests (``SamplingParams.structured_outputs``) wait
outside the scheduler until their grammar is compiled (on the
:class:`~ember.structured_output.manager.StructuredOutputManager`'s threads),
so other requests keep running meanwhile. A step that samples constrained
requests is launched in two parts: the forward pass and logits first, then,
once the host has filled their token bitmask, sampling
(``Executor.sample_with_bitmask``). The host fills the masks while the device
runs the forward pass: right after the launch for a step scheduled now, and,
for a step scheduled ahead, after the previous step's tokens are read and
the grammars advanced over them (a mask needs every token before its
position). A step without constrained requests launches in one part, as before.
With speculative decoding (``EngineConfig.speculative_config``) the drafter
proposes draft tokens for the running requests after each update
(:mod:`ember.spec_decode.proposer`) and the next step verifies them. While it
proposes (the batch is within ``disable_by_batch_size``), no step is scheduled
ahead: drafts are made from the tokens the previous step returned. A draft
model, EAGLE-3 head or MTP layer proposes on the worker, in the step itself;
only the number of its proposals comes back with the step's output (their ids
stay on the device, ``DRAFT_ON_WORKER``), so the next step is scheduled and
launched while the device still computes them. A step launched ahead of the
previous one's tokens gets no proposals (the draft catches up later).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait

import numpy as np
import torch

from ember.config import EngineConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.sched_output import EngineCoreOutput, GrammarBitmask, SchedulerOutput
from ember.core.scheduler import Scheduler
from ember.core.stats import SchedulerStats
from ember.engine.messages import EngineCoreOutputs
from ember.engine.step_stats import StepRecord
from ember.executor.base import Executor
from ember.logger import init_logger
from ember.request import Request, RequestStatus
from ember.structured_output.manager import StructuredOutputManager

logger = init_logger(__name__)


def create_executor(config: EngineConfig) -> Executor:
    """The executor ``config.parallel_config.executor_backend`` names:
    :class:`~ember.executor.uniproc.UniProcExecutor` (``"uni"``) or
    :class:`~ember.executor.multiproc.MultiprocExecutor` (``"mp"``)."""
    if config.parallel_config.executor_backend == "mp":
        from ember.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    from ember.executor.uniproc import UniProcExecutor

    return UniProcExecutor(config)


class EngineCore:
    """The scheduler and the model executor, driven one step at a time.

    Start-up loads the model, sizes the KV cache from the memory it is given and
    prints its size in tokens.

    Args:
        config: the engine config.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.executor: Executor = create_executor(config)
        try:
            self._start(config)
        except BaseException:
            # NOTE: a failed start-up leaves nothing running: the workers (and
            # their processes, with ``mp``) stop before the error propagates.
            self.executor.shutdown()
            raise

    def _start(self, config: EngineConfig) -> None:
        """Size and allocate the KV cache, build the scheduler and the rest
        of the core around the started executor."""
        num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_kv_cache(num_blocks)
        pc = config.parallel_config
        # Data-parallel attention: each rank's cache (num_blocks) is one partition of the pool.
        partitions = pc.tensor_parallel_size if pc.enable_dp_attention else 1
        self.num_gpu_blocks = num_blocks * partitions
        block_size = config.cache_config.block_size
        gib = num_blocks * self.executor.kv_cache_bytes_per_block() / (1 << 30)
        cc = config.cache_config
        per_rank = (f" over {partitions} data-parallel attention ranks ({num_blocks} blocks, {gib:.2f} GiB each, "
                    if partitions > 1 else f" ({gib:.2f} GiB, ")
        logger.info(f"KV cache: {self.num_gpu_blocks} blocks x {block_size} tokens = "
                    f"{self.num_gpu_blocks * block_size} tokens{per_rank}"
                    f"{cc.kv_cache_torch_dtype(config.model_config.dtype)})")
        num_host_blocks = self._init_swap_space()
        kv_cache_manager = KVCacheManager(self.num_gpu_blocks, block_size, cc.enable_prefix_caching,
                                          num_host_blocks, num_partitions=partitions)
        self.scheduler = Scheduler(config.scheduler_config, kv_cache_manager)
        self.async_scheduling = config.scheduler_config.async_scheduling
        # Pipeline parallelism: up to one step in flight per stage (micro-batches
        # of different requests), oldest first; see _step_pipelined.
        self.pipeline_depth = config.parallel_config.pipeline_parallel_size
        self._pipeline: deque[SchedulerOutput] = deque()
        # The step launched and not yet collected (asynchronous scheduling).
        self._in_flight: SchedulerOutput | None = None
        self._step_observers: list[Callable[[StepRecord], None]] = []
        mc = config.model_config
        self.structured_output = StructuredOutputManager(mc.model, mc.tokenizer, mc.vocab_size)
        # Constrained requests whose grammar is still compiling, by id.
        self._waiting_for_grammar: dict[str, Request] = {}
        self.mask_s = 0.0  # cumulative host time filling token bitmasks (seconds)
        self._last_num_batched_tokens = 0  # tokens the last collected step computed
        # Speculative decoding: drafts for the next step, made after each update.
        self.drafter = None
        if config.speculative_config is not None:
            from ember.spec_decode.proposer import DraftScheduler

            self.drafter = DraftScheduler(config.speculative_config)

    def _init_swap_space(self) -> int:
        """Allocate the host swap pool (preemption by swap only); returns its
        size in blocks."""
        if self.config.scheduler_config.preemption_mode != "swap":
            return 0
        per_block = self.executor.kv_cache_bytes_per_block()
        num_host_blocks = self.config.cache_config.swap_space // per_block
        if num_host_blocks == 0:
            logger.warning("swap space holds no KV block: every preemption recomputes")
        self.executor.initialize_host_kv_cache(num_host_blocks)
        logger.info(f"swap space: {num_host_blocks} blocks ({num_host_blocks * per_block / (1 << 30):.2f} GiB)")
        return num_host_blocks

    def add_step_observer(self, observer: Callable[[StepRecord], None]) -> None:
        """Call ``observer`` with a :class:`StepRecord` after every collected
        step (e.g. :class:`~ember.engine.step_stats.StepTimes`)."""
        self._step_observers.append(observer)

    def remove_step_observer(self, observer: Callable[[StepRecord], None]) -> None:
        self._step_observers.remove(observer)

    def get_stats(self, drain_compile_times: bool = False) -> SchedulerStats:
        """Scheduler and KV-cache counters: queue sizes, KV usage, prefix-cache
        queries/hits, evictions, preemptions and swaps (cumulative), and the
        structured-output counters; with ``drain_compile_times``, the grammar
        compile times since the last such call."""
        so = self.structured_output
        stats = self.scheduler.get_stats()  # a fresh snapshot: filled in place
        if so.num_requests:
            stats.num_waiting += len(self._waiting_for_grammar)
            stats.num_structured_output_requests = so.num_requests
            stats.num_grammar_cache_hits = so.num_cache_hits
            if drain_compile_times:
                stats.grammar_compile_times = so.drain_compile_times()
        return stats

    def add_request(self, request: Request) -> None:
        """Queue a request; one with a grammar constraint joins the scheduler
        once its grammar is compiled.

        Raises:
            ValueError: its id is in use, or its constraint is malformed.
        """
        if request.sampling_params.structured_outputs is not None:
            req_id = request.request_id
            if req_id in self.scheduler.requests or req_id in self._waiting_for_grammar:
                raise ValueError(f"request id {req_id!r} is already in use")
            request.structured_output = self.structured_output.new_request(request.sampling_params)
            if not request.structured_output.ready:
                self._waiting_for_grammar[req_id] = request
                return
            self.structured_output.start(request.structured_output, request.prompt_token_ids)
        self.scheduler.add_request(request)

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Move requests whose grammar is compiled into the scheduler; those
        whose compilation failed finish (aborted), with the error logged."""
        failed = []
        for req_id, req in list(self._waiting_for_grammar.items()):
            state = req.structured_output
            if not state.ready:
                continue
            del self._waiting_for_grammar[req_id]
            error = state.error()
            if error is not None:
                logger.error(f"request {req_id}: grammar compilation failed: {error}")
                failed.append(EngineCoreOutput(req_id, [], "abort"))
                continue
            self.structured_output.start(state, req.prompt_token_ids)
            self.scheduler.add_request(req)
        return failed

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
                       ) -> list[str]:
        """End requests now; returns the ids that were still running or waiting."""
        waiting = [r for r in request_ids if self._waiting_for_grammar.pop(r, None) is not None]
        return waiting + self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        """Requests still to run (or waiting for their grammar), or a launched
        step still to collect."""
        return (self.scheduler.has_unfinished_requests() or self._in_flight is not None
                or bool(self._pipeline) or bool(self._waiting_for_grammar))

    def step(self) -> list[EngineCoreOutput]:
        """One engine step; returns what each request generated."""
        return self._step({})

    def step_with_stats(self) -> EngineCoreOutputs:
        """One engine step (none when idle), with the scheduler's counters after
        it (and the grammar compile times since the last step) and the requests
        it scheduled for the first time (with the time)."""
        scheduled_times: dict[str, float] = {}
        outputs = self._step(scheduled_times)
        return EngineCoreOutputs(outputs, self.get_stats(drain_compile_times=True), scheduled_times,
                                 num_batched_tokens=self._last_num_batched_tokens)

    def _step(self, scheduled_times: dict[str, float]) -> list[EngineCoreOutput]:
        """Collect one step's results; launch it first unless it is in flight,
        and launch the next one ahead of the collection when it can be."""
        if self.pipeline_depth > 1:
            return self._step_pipelined(scheduled_times)
        scheduler = self.scheduler
        failed = self._admit_compiled() if self._waiting_for_grammar else []
        timed = bool(self._step_observers)
        t0 = t1 = time.perf_counter() if timed else 0.0
        sched = self._in_flight
        launched_ahead = sched is not None
        mask_s = self.mask_s
        self._last_num_batched_tokens = 0
        if sched is None:
            if not scheduler.has_unfinished_requests():
                if self._waiting_for_grammar and not failed:
                    self._wait_for_a_grammar()
                return failed
            sched = scheduler.schedule()
            self._note_first_scheduled(sched, scheduled_times)
            if timed:
                t1 = time.perf_counter()
            self.executor.launch(sched)
            if sched.structured_output_req_ids:
                self._sample_with_bitmask(sched)
        self._in_flight = None
        t2 = t3 = time.perf_counter() if timed else 0.0
        # NOTE: no step is scheduled ahead while speculation is on (drafts are
        # proposed from the tokens the previous step returned).
        if (self.async_scheduling and scheduler.has_unfinished_requests() and scheduler.can_schedule_ahead()
                and not (self.drafter is not None and self.drafter.active)):
            ahead = scheduler.schedule()
            if timed:
                t3 = time.perf_counter()
            if ahead.is_empty and not ahead.blocks_to_swap_out:
                scheduler.unschedule_empty(ahead)  # nothing to run before this step's tokens are known
            else:
                self._note_first_scheduled(ahead, scheduled_times)
                self.executor.launch(ahead)
                self._in_flight = ahead
        result = self.executor.collect()
        self._last_num_batched_tokens = sched.total_num_scheduled_tokens
        t4 = time.perf_counter() if timed else 0.0
        outputs = scheduler.update_from_output(sched, result)
        if self._in_flight is not None and self._in_flight.structured_output_req_ids:
            self._sample_with_bitmask(self._in_flight)  # its grammars now know every earlier token
        if self.drafter is not None:
            self.drafter.propose(scheduler.running, result.num_draft_tokens)
        if timed:
            t5 = time.perf_counter()
            record = StepRecord(sched, t4, (t1 - t0) + (t3 - t2), (t2 - t1) + (t4 - t3), t5 - t4, launched_ahead,
                                self.mask_s - mask_s)
            for observer in self._step_observers:
                observer(record)
        return failed + outputs if failed else outputs

    def _step_pipelined(self, scheduled_times: dict[str, float]) -> list[EngineCoreOutput]:
        """One step with pipeline parallelism: launch steps until one is in
        flight per stage (each over requests with no token in flight, so the
        stages work on different micro-batches at once), then collect the
        oldest. While stage 1 runs one step, stage 0 already runs the next.
        The pipeline fills only while requests with nothing in flight are
        left: a single request still runs one step at a time."""
        scheduler = self.scheduler
        failed = self._admit_compiled() if self._waiting_for_grammar else []
        timed = bool(self._step_observers)
        t0 = time.perf_counter() if timed else 0.0
        mask_s = self.mask_s
        launch_s = 0.0
        while len(self._pipeline) < self.pipeline_depth and scheduler.has_unfinished_requests():
            sched = scheduler.schedule(skip_in_flight_outputs=True)
            if sched.is_empty and not sched.blocks_to_swap_out:
                scheduler.unschedule_empty(sched)  # every request left waits for a token in flight
                break
            self._note_first_scheduled(sched, scheduled_times)
            t = time.perf_counter() if timed else 0.0
            self.executor.launch(sched)
            if sched.structured_output_req_ids:
                self._sample_with_bitmask(sched)  # its grammars know every earlier token
            if timed:
                launch_s += time.perf_counter() - t
            self._pipeline.append(sched)
        self._last_num_batched_tokens = 0
        if not self._pipeline:
            if self._waiting_for_grammar and not failed:
                self._wait_for_a_grammar()
            return failed
        t1 = time.perf_counter() if timed else 0.0
        sched = self._pipeline.popleft()
        result = self.executor.collect()
        self._last_num_batched_tokens = sched.total_num_scheduled_tokens
        t2 = time.perf_counter() if timed else 0.0
        outputs = scheduler.update_from_output(sched, result)
        if timed:
            record = StepRecord(sched, t2, (t1 - t0) - launch_s, launch_s + (t2 - t1), time.perf_counter() - t2,
                                bool(self._pipeline), self.mask_s - mask_s)
            for observer in self._step_observers:
                observer(record)
        return failed + outputs if failed else outputs

    def _wait_for_a_grammar(self) -> None:
        """Nothing runs until a grammar is compiled: wait for one (briefly)."""
        wait([r.structured_output.grammar for r in self._waiting_for_grammar.values()], 0.05, FIRST_COMPLETED)

    def _sample_with_bitmask(self, sched: SchedulerOutput) -> None:
        """Fill the token bitmask of ``sched``'s constrained requests (their
        grammars have seen every token before the position sampled) and let
        the executor sample the launched step with it. A request that finished
        meanwhile gets an all-ones row (its token is dropped)."""
        start = time.perf_counter()
        req_ids = sched.structured_output_req_ids
        bitmask = np.full((len(req_ids), self.structured_output.num_words), -1, dtype=np.int32)
        requests = self.scheduler.requests
        states = [None if (req := requests.get(r)) is None or req.is_finished() else req.structured_output
                  for r in req_ids]
        self.structured_output.fill_bitmasks(states, torch.from_numpy(bitmask))
        self.mask_s += time.perf_counter() - start
        self.executor.sample_with_bitmask(GrammarBitmask(list(req_ids), bitmask))

    def _note_first_scheduled(self, sched: SchedulerOutput, scheduled_times: dict[str, float]) -> None:
        if sched.scheduled_new_reqs:
            now = time.monotonic()
            for new in sched.scheduled_new_reqs:
                req = self.scheduler.requests[new.req_id]
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = scheduled_times[new.req_id] = now

    def check_health(self) -> None:
        """Raise if the executor's workers can no longer run steps.

        Raises:
            WorkerDeadError: a worker process died or failed.
        """
        self.executor.check_health()

    def shutdown(self) -> None:
        self.structured_output.shutdown()
        self.executor.shutdown()
