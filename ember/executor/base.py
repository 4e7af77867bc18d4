"""Executor: the engine core's handle on the workers that run the model.

An executor drives one worker (:class:`~ember.executor.uniproc.UniProcExecutor`)
or one per tensor/pipeline-parallel rank (a multiprocess executor). Everything
that crosses it is plain, picklable data: a :class:`SchedulerOutput` in, a
:class:`ModelRunnerOutput` out, ints for the KV cache size. Device state (CUDA
events, tensors, launched steps) stays with the workers.

Steps are launched and collected in order: each worker keeps its launched
steps in a FIFO, and :meth:`Executor.collect` returns the oldest one's output.
With asynchronous scheduling the core launches step N+1 before it collects
step N; the worker feeds the tokens step N samples into step N+1 on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ember.core.sched_output import GrammarBitmask, ModelRunnerOutput, SchedulerOutput


class WorkerDeadError(RuntimeError):
    """A worker process failed or died; the executor has stopped the others
    and serves no more steps. The message names the worker and its error."""


class Executor(ABC):
    """Runs the model for the engine core (see the module docstring)."""

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks that fit in the memory each worker may use (the smallest
        over the workers).

        Raises:
            ConfigError: not even ``max_model_len`` tokens fit.
        """

    @abstractmethod
    def kv_cache_bytes_per_block(self) -> int:
        """Bytes one KV block takes on one worker, across all layers."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` KV blocks on every worker (and capture CUDA
        graphs over them)."""

    @abstractmethod
    def initialize_host_kv_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` blocks of host swap space on every worker."""

    @abstractmethod
    def rank_reports(self, num_tokens: int) -> list[dict]:
        """Every rank's memory and communication figures, in rank order (see
        :meth:`ember.worker.worker.Worker.rank_report`); the engine must be idle."""

    @abstractmethod
    def launch(self, sched: SchedulerOutput) -> None:
        """Start a step; returns without waiting for the device. Its output is
        what a later :meth:`collect` returns (steps are collected in launch
        order)."""

    def sample_with_bitmask(self, bitmask: GrammarBitmask) -> None:
        """Finish launching the last launched step, whose
        ``structured_output_req_ids`` is not empty: sample it with those
        requests' token masks (every worker that samples needs them).
        Returns without waiting for the device.

        Raises:
            NotImplementedError: this executor cannot run constrained requests.
        """
        raise NotImplementedError(f"{type(self).__name__} does not run grammar-constrained requests")

    @abstractmethod
    def collect(self) -> ModelRunnerOutput:
        """Wait for the oldest launched step and return its output.

        Raises:
            RuntimeError: no step is in flight.
        """

    @property
    @abstractmethod
    def num_in_flight(self) -> int:
        """Steps launched and not yet collected."""

    def check_health(self) -> None:
        """Raise if a worker can no longer run steps (cheap; no device work).

        Raises:
            WorkerDeadError: a worker process died or failed.
        """

    def shutdown(self) -> None:
        """Release the workers (idempotent)."""

