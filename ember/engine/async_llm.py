"""AsyncLLM: the server's front end, for asyncio callers.

The engine core (scheduler + model) runs in its own process behind an
:class:`~ember.engine.core_client.AsyncMPClient`. This process tokenizes,
submits requests, and runs one output-handler task on the event loop that
receives each step's outputs, detokenizes them, checks stop strings and hands
each RequestOutput to the asyncio queue of its request. Requests that arrive
while a step runs join the next one (continuous batching), and the model's
compute never waits on HTTP or text work.

The core process is supervised from the moment the model is loaded, whether
or not requests are in flight: its exit is seen at once (the process sentinel,
waited on by the event loop) and so is a fatal error it reports. Then
:attr:`AsyncLLM.errored` is set, every request in flight fails with
:class:`EngineDeadError` naming the cause, new requests are refused with it,
and :meth:`AsyncLLM.wait_until_dead` returns (the server then exits, so that
whatever runs it can restart it).

Per finished request it logs one structured line (logger ``ember.request``,
JSON): id, prompt and output tokens, queue time, TTFT, end-to-end time and
finish reason.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from ember.beam_search import BeamSearch, BeamSearchParams
from ember.config import EngineConfig
from ember.core.stats import SchedulerStats
from ember.engine.arg_utils import EngineArgs
from ember.engine.core_client import AsyncMPClient, EngineDeadError, EngineLoadingError, EngineOverloadedError
from ember.engine.llm_engine import EngineFrontEnd, check_priority_and_salt, pooling_sampling_params
from ember.engine.messages import EngineCoreOutputs
from ember.logger import init_logger
from ember.outputs import RequestOutput, SampleLogprob
from ember.pooling_params import PoolingParams
from ember.sampling_params import SamplingParams

logger = init_logger(__name__)
request_logger = init_logger("ember.request")

# Seconds between the core process's exit and failing the requests, in which
# the output loop reads what the core sent last (e.g. its fatal error's cause).
_EXIT_GRACE_S = 0.05

__all__ = ["AsyncLLM", "EngineDeadError", "EngineLoadingError", "EngineOverloadedError"]


class AsyncLLM(EngineFrontEnd):
    """Async front of an engine core running in its own process.

    Args:
        config: the engine config; the core process loads the model.
        wait_until_ready: block until the model is loaded. With False the
            constructor returns once the tokenizer is loaded; requests are
            refused (:class:`EngineLoadingError`) until :meth:`wait_until_ready`
            wait completes (the server answers 503 meanwhile).
        max_waiting_requests: overload protection: a request submitted while
            this many engine-core requests already wait for a slot in the running
            batch is refused (:class:`EngineOverloadedError`; the server answers
            429). None: no limit.
    Raises:
        EngineDeadError: the core failed to start (e.g. unreadable weights).
        ValueError: ``max_waiting_requests`` is negative.
    """

    core_client: AsyncMPClient

    def __init__(self, config: EngineConfig, wait_until_ready: bool = True,
                 max_waiting_requests: int | None = None) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0 or None, got {max_waiting_requests!r}")
        # The core process loads the model while this one loads the tokenizer.
        super().__init__(config, AsyncMPClient(config))
        self.errored = False
        # Why the running core stopped (set with ``errored``; None while it runs).
        self.dead_error: EngineDeadError | None = None
        self._dead = asyncio.Event()
        self.max_waiting_requests = max_waiting_requests
        # A PrometheusMetrics the server attaches; updated after each step.
        self.metrics: Any = None
        self._stats = SchedulerStats()
        self._queues: dict[str, asyncio.Queue] = {}
        # Per live request (front-end view): arrival, first-scheduled and
        # last-token times (time.monotonic seconds), for metrics and the log line.
        self._timing: dict[str, _Timing] = {}
        self._output_task: asyncio.Task | None = None
        self._reported_blocks = False  # cache_config_info's num_gpu_blocks is set
        if wait_until_ready:
            self.core_client.wait_until_ready()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, wait_until_ready: bool = True,
                         max_waiting_requests: int | None = None) -> AsyncLLM:
        """Start the engine core process (and, by default, wait until its model
        is loaded)."""
        return cls(engine_args.create_engine_config(), wait_until_ready, max_waiting_requests)

    @property
    def ready(self) -> bool:
        """The core has loaded the model and takes requests."""
        return self.core_client.ready

    async def wait_until_ready(self) -> None:
        """Wait (without blocking the event loop) until the core has loaded the
        model, then supervise it from this event loop (see the module docstring).

        Raises:
            EngineDeadError: the core failed to start; ``errored`` is set then.
        """
        if not self.ready:
            await self._wait_for_core()
        self._start_supervision()

    async def wait_until_dead(self) -> EngineDeadError:
        """Wait until the running core is found dead; returns why (``dead_error``)."""
        await self._dead.wait()
        assert self.dead_error is not None
        return self.dead_error

    async def _wait_for_core(self) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def wait() -> None:
            try:
                self.core_client.wait_until_ready()
                loop.call_soon_threadsafe(_settle, done, None)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
                loop.call_soon_threadsafe(_settle, done, e)

        # NOTE: a daemon thread, not the loop's executor: a shutdown while the
        # model loads must not wait for the load to finish.
        threading.Thread(target=wait, name="ember-wait-ready", daemon=True).start()
        error = await done
        if error is not None:
            self.errored = True
            if isinstance(error, EngineDeadError):
                self.dead_error = error
            raise error

    # -------------------------------------------------------------- public
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str, *, priority: int | None = None,
                       cache_salt: str | None = None, check_overload: bool = True,
                       pooling_params: PoolingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as the engine produces them
        (per ``sampling_params.output_kind``). Stopping the iteration early
        (e.g. a client disconnect) aborts the request; its KV blocks are freed
        before the core's next step.

        Args:
            priority: lower runs first under ``--scheduling-policy priority``
                (None: 0).
            cache_salt: only requests with equal salts share prefix-cache blocks.
            check_overload: False skips the ``max_waiting_requests`` check (for
                the step requests of a beam search, checked once when it started).
            pooling_params: make it a pooling request: its one output holds the
                pooled hidden states (``pooled_output``); ``sampling_params`` is
                ignored (see :mod:`ember.pooling_params`).
        Raises:
            ValueError: invalid input (before anything is yielded).
            EngineDeadError: the engine core is not running, or died meanwhile.
            EngineLoadingError: the model is still loading.
            EngineOverloadedError: ``max_waiting_requests`` requests already wait.
        """
        if self.errored:
            raise self.dead_error or EngineDeadError("the engine core is not running")
        if not self.ready:
            raise EngineLoadingError("the model is still loading; retry in a few seconds")
        priority = 0 if priority is None else priority
        check_priority_and_salt(priority, cache_salt)
        ids = self.input_processor.tokenize(prompt)
        if pooling_params is not None:
            sampling_params = pooling_sampling_params()
        ids = self.input_processor.truncate(ids, sampling_params.truncate_prompt_tokens, sampling_params.max_tokens)
        self.input_processor.check(ids, sampling_params)
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        # NOTE: checked here, with no await before the submit below, so that a
        # burst arriving in one event-loop turn cannot all pass the check.
        if check_overload:
            self._check_overload()
        self._start_supervision()
        arrival = time.monotonic()
        # NOTE: the queue is registered after the submit (which may still refuse
        # the request); no output can arrive in between, on this one event loop.
        self._submit(request_id, prompt if isinstance(prompt, str) else None, ids, sampling_params, arrival,
                     priority, cache_salt, pooling_params)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        self._timing[request_id] = _Timing(arrival, len(ids), sampling_params.n,
                                           sampling_params.max_tokens or self.model_config.max_model_len - len(ids))
        finished = False
        try:
            while not finished:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished and not self.errored:
                self._abort_request(request_id)

    async def beam_search(self, prompt: str | list[int], params: BeamSearchParams, request_id: str, *,
                          priority: int | None = None, cache_salt: str | None = None) -> RequestOutput:
        """Beam search from one prompt (see :mod:`ember.beam_search`): each step
        submits one engine request per live beam, all together, as
        ``f"{request_id}-{step}-{beam}"`` (each counts as a request in the
        metrics and the request log). The search is checked against
        ``max_waiting_requests`` once, before its first step. Cancelling the
        call aborts the step's requests.

        Returns:
            A finished RequestOutput whose ``outputs`` are the ``beam_width``
            sequences, best score first (``index`` is the rank), each with its
            ``cumulative_logprob``.
        Raises:
            ValueError: invalid input (see :meth:`generate`), a prompt that fills
                the context window or a ``stop_token_ids`` entry outside the vocabulary.
            EngineDeadError, EngineLoadingError, EngineOverloadedError: as :meth:`generate`.
        """
        arrival = time.monotonic()
        if self.errored:
            raise EngineDeadError("the engine core is not running")
        if not self.ready:
            raise EngineLoadingError("the model is still loading; retry in a few seconds")
        ids = self.input_processor.tokenize(prompt)
        step_params = params.step_sampling_params()
        self.input_processor.check(ids, step_params)
        search = BeamSearch(ids, params, self.input_processor.eos_token_ids, self.model_config.max_model_len)
        # Admitted (or refused) once: its step requests skip the overload check.
        self._check_overload()
        extra = {"priority": priority, "cache_salt": cache_salt, "check_overload": False}
        step = 0
        first_token_time = None
        while not search.done:
            entries = await gather_or_cancel([self._next_token_logprobs(p, step_params, f"{request_id}-{step}-{i}",
                                                                         **extra)
                                               for i, p in enumerate(search.step_prompts())])
            first_token_time = first_token_time or time.monotonic()
            search.advance(entries)
            step += 1
        seqs = search.result(self.tokenizer)
        outputs = [seq.as_completion(i) for i, seq in enumerate(seqs)]
        metrics = {"arrival_time": arrival, "first_token_time": first_token_time, "finished_time": time.monotonic(),
                   "num_generation_tokens": sum(len(c.token_ids) for c in outputs),
                   "max_completion_tokens": max(len(c.token_ids) for c in outputs)}
        return RequestOutput(request_id, prompt if isinstance(prompt, str) else None, ids, outputs, True, metrics)

    async def _next_token_logprobs(self, prompt: list[int], params: SamplingParams, request_id: str,
                                   **kwargs: Any) -> SampleLogprob:
        """Run one beam's step request; the log-probabilities of its next token."""
        final = None
        async for out in self.generate(prompt, params, request_id, **kwargs):
            final = out
        assert final is not None and final.outputs[0].logprobs, "a step request ended without log-probabilities"
        return final.outputs[0].logprobs[0]

    def _check_overload(self) -> None:
        limit = self.max_waiting_requests
        if limit is not None and self.num_waiting_requests() >= limit:
            raise EngineOverloadedError(f"{limit} requests are already waiting for a slot")

    def num_waiting_requests(self) -> int:
        """Engine-core requests (n per user request) submitted here that are not
        in the running batch (as of the last step; for overload protection)."""
        return max(0, self.output_processor.num_engine_requests() - self._stats.num_running)

    async def abort(self, request_id: str) -> None:
        """Abort a request (its stream ends with finish reason ``abort``)."""
        for out in self._abort_request(request_id):
            self._deliver(out)

    def get_stats(self) -> SchedulerStats:
        """The engine core's counters as of its last step."""
        return self._stats

    def shutdown(self) -> None:
        """Stop the engine core process (waits for it to exit)."""
        if self._output_task is not None and not self._output_task.done():
            try:
                self._output_task.cancel()
            except RuntimeError:  # its event loop is already closed
                pass
        self.core_client.shutdown()

    # ----------------------------------------------------- output handling
    def _start_supervision(self) -> None:
        """From the running event loop (once the core is ready): receive its
        outputs and watch its process."""
        if self.dead_error is not None:
            return
        self.core_client.watch_process(self._on_core_exit)
        if self._output_task is None or self._output_task.done():
            self._output_task = asyncio.get_running_loop().create_task(self._output_loop())

    def _on_core_exit(self) -> None:
        asyncio.get_running_loop().call_later(_EXIT_GRACE_S, self._core_exited)

    def _core_exited(self) -> None:
        if self.dead_error is None:
            self._mark_dead(self.core_client.process_exit_error())

    def _abort_request(self, request_id: str) -> list[RequestOutput]:
        """Abort one user request; record and log its final output."""
        finals = self._abort([request_id])
        if self.metrics is not None:
            self.metrics.record(self._stats, self.num_prompt_tokens_total, self.num_generation_tokens_total, finals)
        self._finish_requests(finals)
        return finals

    def _deliver(self, out: RequestOutput | BaseException, request_id: str | None = None) -> None:
        q = self._queues.get(request_id if request_id is not None else out.request_id)  # type: ignore[union-attr]
        if q is not None:
            q.put_nowait(out)

    async def _output_loop(self) -> None:
        try:
            while True:
                core_outputs = await self.core_client.get_output_async()
                self._process(core_outputs)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - a dead core fails every waiter
            self._mark_dead(e)

    def _process(self, core_outputs: EngineCoreOutputs) -> None:
        now = time.monotonic()
        if core_outputs.stats is not None:
            self._stats = core_outputs.stats
        parent_of = self.output_processor.parent_request_id
        for engine_id, t in core_outputs.scheduled_times.items():
            timing = self._timing.get(parent_of(engine_id) or engine_id)
            if timing is not None:
                timing.first_scheduled = t if timing.first_scheduled is None else min(t, timing.first_scheduled)
        for engine_id, why in core_outputs.rejected.items():
            parent = parent_of(engine_id) or engine_id
            for out in self._abort_request(parent):  # its siblings too
                self._deliver(ValueError(why), out.request_id)
        for out in core_outputs.outputs:
            timing = self._timing.get(parent_of(out.request_id) or out.request_id)
            if timing is not None and out.new_token_ids:
                last = timing.last_token.get(out.request_id)
                if last is not None and self.metrics is not None:
                    self.metrics.observe_inter_token_latency(now - last)
                timing.last_token[out.request_id] = now
        results = self._process_core_outputs(core_outputs.outputs)
        if self.metrics is not None:
            if not self._reported_blocks and getattr(self.core_client, "num_gpu_blocks", None) is not None:
                self.metrics.set_num_gpu_blocks(self.core_client.num_gpu_blocks)
                self._reported_blocks = True
            self.metrics.record(self._stats, self.num_prompt_tokens_total, self.num_generation_tokens_total, results,
                                core_outputs.num_batched_tokens)
        self._finish_requests([r for r in results if r.finished])
        for result in results:
            self._deliver(result)

    def _finish_requests(self, finals: list[RequestOutput]) -> None:
        """Log one structured line per finished request and forget its timing."""
        for out in finals:
            timing = self._timing.pop(out.request_id, None)
            if timing is None:
                continue
            m = out.metrics
            end = m.get("finished_time", time.monotonic())
            if self.metrics is not None:
                self.metrics.record_request(out, timing.first_scheduled, timing.num_prompt_tokens, timing.n,
                                            timing.max_tokens)
            first_token = m.get("first_token_time")
            record = {
                "request_id": out.request_id,
                "prompt_tokens": timing.num_prompt_tokens,
                "output_tokens": m.get("num_generation_tokens", 0),
                "queue_time_s": _round(None if timing.first_scheduled is None
                                       else timing.first_scheduled - timing.arrival),
                "ttft_s": _round(None if first_token is None else first_token - timing.arrival),
                "e2e_s": _round(end - timing.arrival),
                "finish_reason": ",".join(str(c.finish_reason) for c in out.outputs),
            }
            request_logger.info(json.dumps(record))

    def _mark_dead(self, error: BaseException) -> None:
        """The core is gone: fail every request in flight and refuse new ones."""
        if self.dead_error is not None:
            return
        logger.error(f"engine core died: {error}")
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(f"engine core died: {error!r}")
        self.errored = True
        self.dead_error = dead
        self.core_client.core_gone = True
        self.core_client.forget_pending()
        task = self._output_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        for req_id in list(self._queues):
            self._deliver(dead, req_id)
        self._dead.set()


class _Timing:
    """A user request's timing (``time.monotonic`` seconds): arrival, when its
    first completion was first scheduled, and each completion's last token
    (keyed by engine-core request id)."""

    __slots__ = ("arrival", "num_prompt_tokens", "n", "max_tokens", "first_scheduled", "last_token")

    def __init__(self, arrival: float, num_prompt_tokens: int, n: int, max_tokens: int) -> None:
        self.arrival = arrival
        self.num_prompt_tokens = num_prompt_tokens
        self.n = n  # the request's n and max_tokens (for metrics)
        self.max_tokens = max_tokens
        self.first_scheduled: float | None = None
        self.last_token: dict[str, float] = {}


async def gather_or_cancel(coros: list[Any]) -> list[Any]:
    """Run ``coros`` concurrently; their results in order. If one fails or this
    call is cancelled, the others are cancelled (and awaited) first."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
        for t in tasks:  # retrieve every failure, so that none is logged as lost
            if t.done() and not t.cancelled():
                t.exception()


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)
