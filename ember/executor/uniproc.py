"""Executor with one in-process worker (one device)."""

from __future__ import annotations

from ember.config import EngineConfig
from ember.core.sched_output import ModelRunnerOutput, SchedulerOutput
from ember.worker.model_runner import PendingOutput
from ember.worker.worker import Worker


class UniProcExecutor:
    """Drives a single :class:`Worker` in this process. A multi-process
    executor (one worker per GPU rank) will expose the same methods."""

    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config, rank=0)
        self.worker.load_model()

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def kv_cache_bytes_per_block(self) -> int:
        return self.worker.model_runner.kv_cache_bytes_per_block()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def initialize_host_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_host_kv_cache(num_blocks)

    def launch(self, sched: SchedulerOutput) -> PendingOutput:
        """Start a step on the device (see :meth:`ModelRunner.launch`)."""
        return self.worker.launch(sched)

    def collect(self, pending: PendingOutput) -> ModelRunnerOutput:
        """Wait for a launched step's tokens (see :meth:`ModelRunner.collect`)."""
        return self.worker.collect(pending)

    def shutdown(self) -> None:
        pass
