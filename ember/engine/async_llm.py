"""AsyncLLM: the engine behind the server, for asyncio callers.

An engine thread owns the :class:`LLMEngine` and loops: take new requests and
aborts from an inbox, run one step, hand each RequestOutput to the asyncio
queue of its request. Requests that arrive while a step runs join the next one,
so concurrent requests share engine steps (continuous batching). PyTorch
releases the GIL inside its kernels, so the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ember.engine.arg_utils import EngineArgs
from ember.engine.llm_engine import LLMEngine, check_priority_and_salt
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop died; no request can be served."""


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Shutdown:
    pass


class AsyncLLM:
    """Async front of the engine.

    Args:
        engine: a loaded :class:`LLMEngine`.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_config = engine.model_config
        self.tokenizer = engine.tokenizer
        self.input_processor = engine.input_processor
        self.errored = False
        # A PrometheusMetrics the server attaches; updated by the engine thread after each step.
        self.metrics = None
        self._num_running = 0  # written by the engine thread after each step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run_engine_loop, name="ember-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> AsyncLLM:
        """Load the model (blocking) and start the engine thread."""
        return cls(LLMEngine.from_engine_args(engine_args))

    # -------------------------------------------------------------- public
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str, *, priority: int | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as the engine produces them
        (per ``sampling_params.output_kind``). Stopping the iteration early
        (e.g. a client disconnect) aborts the request.

        Args:
            priority: lower runs first under ``--scheduling-policy priority``
                (None: 0).
            cache_salt: only requests with equal salts share prefix-cache blocks.
        Raises:
            ValueError: invalid input (before anything is yielded).
            EngineDeadError: the engine loop died.
        """
        if self.errored:
            raise EngineDeadError("the engine is not running")
        priority = 0 if priority is None else priority
        check_priority_and_salt(priority, cache_salt)
        ids = self.input_processor.tokenize(prompt)
        self.input_processor.check(ids, sampling_params)
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._queues[request_id] = (asyncio.get_running_loop(), q)
        self._send(_Add(request_id, prompt if isinstance(prompt, str) else None, ids, sampling_params, priority,
                        cache_salt))
        finished = False
        try:
            while not finished:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
            if not finished:
                self._send(_Abort(request_id))

    def num_waiting_requests(self) -> int:
        """Requests submitted here that are not in the running batch (an estimate
        from the last step; used for overload protection)."""
        with self._lock:
            in_flight = len(self._queues)
        return max(0, in_flight - self._num_running)

    async def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    def shutdown(self) -> None:
        self._send(_Shutdown())
        self._thread.join(timeout=10)

    # --------------------------------------------------------- engine thread
    def _send(self, msg: object) -> None:
        self._inbox.put(msg)
        self._wakeup.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._queues.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _drain_inbox(self) -> bool:
        """Apply queued adds/aborts; returns False on shutdown."""
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if isinstance(msg, _Shutdown):
                return False
            if isinstance(msg, _Abort):
                self.engine.abort_requests([msg.request_id])
                continue
            try:
                self.engine.add_request(msg.request_id, msg.prompt or msg.prompt_token_ids, msg.params,
                                        prompt_token_ids=msg.prompt_token_ids, priority=msg.priority,
                                        cache_salt=msg.cache_salt)
            except Exception as e:  # a bad request must not take the loop down
                self._deliver(msg.request_id, ValueError(str(e)))

    def _run_engine_loop(self) -> None:
        try:
            while self._drain_inbox():
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                outputs = self.engine.step()
                self._num_running = len(self.engine.engine_core.scheduler.running)
                if self.metrics is not None:
                    e = self.engine
                    self.metrics.record(e.get_stats(), e.num_prompt_tokens_total, e.num_generation_tokens_total,
                                        outputs)
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as e:  # noqa: BLE001 - report any death to every waiter
            logger.exception("engine loop died")
            self.errored = True
            with self._lock:
                waiters = list(self._queues)
            for req_id in waiters:
                self._deliver(req_id, EngineDeadError(f"engine loop died: {e!r}"))
