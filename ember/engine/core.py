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
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ember.config import EngineConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.sched_output import EngineCoreOutput, SchedulerOutput
from ember.core.scheduler import Scheduler
from ember.core.stats import SchedulerStats
from ember.engine.messages import EngineCoreOutputs
from ember.engine.step_stats import StepRecord
from ember.executor.base import Executor
from ember.logger import init_logger
from ember.request import Request, RequestStatus

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
        num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_kv_cache(num_blocks)
        self.num_gpu_blocks = num_blocks
        block_size = config.cache_config.block_size
        gib = num_blocks * self.executor.kv_cache_bytes_per_block() / (1 << 30)
        cc = config.cache_config
        logger.info(f"KV cache: {num_blocks} blocks x {block_size} tokens = {num_blocks * block_size} tokens "
                    f"({gib:.2f} GiB, {cc.kv_cache_torch_dtype(config.model_config.dtype)})")
        num_host_blocks = self._init_swap_space()
        kv_cache_manager = KVCacheManager(num_blocks, block_size, cc.enable_prefix_caching, num_host_blocks)
        self.scheduler = Scheduler(config.scheduler_config, kv_cache_manager)
        self.async_scheduling = config.scheduler_config.async_scheduling
        # The step launched and not yet collected (asynchronous scheduling).
        self._in_flight: SchedulerOutput | None = None
        self._step_observers: list[Callable[[StepRecord], None]] = []

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

    def get_stats(self) -> SchedulerStats:
        """Scheduler and KV-cache counters: queue sizes, KV usage, prefix-cache
        queries/hits, evictions, preemptions and swaps (cumulative)."""
        return self.scheduler.get_stats()

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
                       ) -> list[str]:
        """End requests now; returns the ids that were still running or waiting."""
        return self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        """Requests still to run, or a launched step still to collect."""
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def step(self) -> list[EngineCoreOutput]:
        """One engine step; returns what each request generated."""
        return self._step({})

    def step_with_stats(self) -> EngineCoreOutputs:
        """One engine step (none when idle), with the scheduler's counters after
        it and the requests it scheduled for the first time (with the time)."""
        scheduled_times: dict[str, float] = {}
        outputs = self._step(scheduled_times)
        return EngineCoreOutputs(outputs, self.get_stats(), scheduled_times)

    def _step(self, scheduled_times: dict[str, float]) -> list[EngineCoreOutput]:
        """Collect one step's results; launch it first unless it is in flight,
        and launch the next one ahead of the collection when it can be."""
        scheduler = self.scheduler
        timed = bool(self._step_observers)
        t0 = t1 = time.perf_counter() if timed else 0.0
        sched = self._in_flight
        launched_ahead = sched is not None
        if sched is None:
            if not scheduler.has_unfinished_requests():
                return []
            sched = scheduler.schedule()
            self._note_first_scheduled(sched, scheduled_times)
            if timed:
                t1 = time.perf_counter()
            self.executor.launch(sched)
        self._in_flight = None
        t2 = t3 = time.perf_counter() if timed else 0.0
        if self.async_scheduling and scheduler.has_unfinished_requests() and scheduler.can_schedule_ahead():
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
        t4 = time.perf_counter() if timed else 0.0
        outputs = scheduler.update_from_output(sched, result)
        if timed:
            t5 = time.perf_counter()
            record = StepRecord(sched, t4, (t1 - t0) + (t3 - t2), (t2 - t1) + (t4 - t3), t5 - t4, launched_ahead)
            for observer in self._step_observers:
                observer(record)
        return outputs

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
        self.executor.shutdown()
