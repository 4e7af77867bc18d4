"""Executor with one in-process worker (one device)."""

from __future__ import annotations

from ember.config import EngineConfig
from ember.core.sched_output import GrammarBitmask, ModelRunnerOutput, SchedulerOutput
from ember.executor.base import Executor
from ember.worker.worker import Worker


class UniProcExecutor(Executor):
    """Drives a single :class:`Worker` in this process.

    Args:
        config: the engine config (the model is loaded here).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config, rank=0)
        self.worker.load_model()

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def kv_cache_bytes_per_block(self) -> int:
        return self.worker.kv_cache_bytes_per_block()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def initialize_host_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_host_kv_cache(num_blocks)

    def rank_reports(self, num_tokens: int) -> list[dict]:
        return [self.worker.rank_report(num_tokens)]

    def launch(self, sched: SchedulerOutput) -> None:
        self.worker.launch(sched)

    def sample_with_bitmask(self, bitmask: GrammarBitmask) -> None:
        self.worker.sample_with_bitmask(bitmask)

    def collect(self) -> ModelRunnerOutput:
        return self.worker.collect()

    @property
    def num_in_flight(self) -> int:
        return self.worker.num_in_flight
