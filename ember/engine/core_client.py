"""The front end's view of the engine core: one interface, two transports.

The front end (``LLMEngine`` / ``AsyncLLM``: tokenization, chat templates,
detokenization, HTTP) talks to the :class:`~ember.engine.core.EngineCore`
(scheduler + model execution) through an :class:`EngineCoreClient`:

- :class:`InprocClient` holds the core in this process and steps it when asked
  for output (the offline ``LLM``);
- :class:`SyncMPClient` and :class:`AsyncMPClient` run it in its own process
  (:func:`run_engine_core`) and exchange msgpack messages (``msgspec``) over two
  ZMQ PUSH/PULL sockets on IPC endpoints: requests and aborts go in, each
  step's :class:`EngineCoreOutputs` come out. The core process then steps as
  fast as the device allows while the front end's process does the HTTP and
  text work on another core (the design of vLLM's V1 engine core).

Wire format (``ember.engine.messages``): multipart ZMQ messages ``[kind,
msgpack payload]``, kinds ``ADD`` (an ``EngineCoreRequest``), ``ABORT`` (an
``AbortRequests``), ``SHUTDOWN`` (front end -> core) and ``READY`` (a
``CoreReady``), ``OUTPUTS`` (``EngineCoreOutputs``), ``DEAD`` (a ``CoreDead``)
(core -> front end).

The core process exits when told to shut down, when its parent process is
gone, or after a fatal error, which it reports as :data:`DEAD` first. The
front end also watches the process itself, so a crash that sends nothing
(segfault, OOM kill) is detected too.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

from ember.config import EngineConfig
from ember.core.stats import SchedulerStats
from ember.engine.messages import (
    ABORT,
    ADD,
    DEAD,
    OUTPUTS,
    READY,
    SHUTDOWN,
    AbortRequests,
    CoreDead,
    CoreReady,
    EngineCoreOutputs,
    EngineCoreRequest,
    make_core_request,
)
from ember.logger import init_logger
from ember.request import RequestStatus

if TYPE_CHECKING:  # imported lazily below: the front end's process needs no model code
    from ember.engine.core import EngineCore

logger = init_logger(__name__)

# Seconds the core process waits for input while idle before it checks that
# its parent is still alive.
_IDLE_POLL_MS = 500
# Seconds a shut-down core process gets to exit before it is terminated.
_SHUTDOWN_TIMEOUT_S = 10


class EngineDeadError(RuntimeError):
    """The engine core stopped (crashed, was killed, or failed to start); no
    request can be served."""


class EngineLoadingError(RuntimeError):
    """The engine core is still loading the model; retry later."""


class EngineOverloadedError(RuntimeError):
    """Too many requests already wait for a slot in the running batch; retry later."""


# --------------------------------------------------------------- clients


class EngineCoreClient(ABC):
    """The front end's handle on an engine core (see the module docstring)."""

    @abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request in the core (it runs from the next step on)."""

    @abstractmethod
    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
                       ) -> None:
        """End requests (their KV blocks are freed before the next step)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the core and release its resources (idempotent)."""


class InprocClient(EngineCoreClient):
    """The engine core in this process; :meth:`get_output` runs one step.

    Args:
        config: the engine config (the model is loaded here).
    """

    def __init__(self, config: EngineConfig) -> None:
        from ember.engine.core import EngineCore

        self.engine_core = EngineCore(config)
        self._max_model_len = config.model_config.max_model_len

    def add_request(self, request: EngineCoreRequest) -> None:
        """Raises ValueError for a request id already in use."""
        self.engine_core.add_request(make_core_request(request, self._max_model_len))

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
                       ) -> None:
        self.engine_core.abort_requests(request_ids, status)

    def get_output(self) -> EngineCoreOutputs:
        """Run one engine step (nothing when idle)."""
        return self.engine_core.step_with_stats()

    def get_stats(self) -> SchedulerStats:
        return self.engine_core.get_stats()

    def shutdown(self) -> None:
        self.engine_core.shutdown()


class MPClient(EngineCoreClient):
    """Starts the engine core in a child process (``spawn``); call
    :meth:`wait_until_ready` before sending requests.

    NOTE: with ``spawn`` the child re-imports the parent's ``__main__``: a script
    that creates a multiprocess engine needs an ``if __name__ == "__main__":``
    guard (as with any ``multiprocessing`` program).

    Args:
        config: the engine config (pickled to the child, which loads the model).
    """

    def __init__(self, config: EngineConfig) -> None:
        self._ctx = zmq.Context()
        self._closed = False
        base = os.path.join(tempfile.gettempdir(), f"ember-{uuid.uuid4().hex[:12]}")
        self.input_address, self.output_address = f"ipc://{base}-in", f"ipc://{base}-out"
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)  # never block or drop a request
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(self.input_address)
        self._output = self._ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(self.output_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._outputs_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        # NOTE: spawn, not fork: the parent may hold CUDA state and threads.
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(config, self.input_address, self.output_address, os.getpid()),
            name="ember-engine-core", daemon=True)
        self.process.start()
        self._ready = False

    @property
    def ready(self) -> bool:
        """True once :meth:`wait_until_ready` has seen the core's READY."""
        return self._ready

    def wait_until_ready(self) -> None:
        """Block until the core has loaded the model (the front end may load
        its tokenizer meanwhile).

        Raises:
            EngineDeadError: the core failed to start (then it is shut down).
        """
        if self._ready:
            return
        try:
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self._ready = True

    def _wait_ready(self) -> None:
        kind, payload = self._wait_message()
        if kind == DEAD:
            raise self._dead_error(payload)
        if kind != READY:
            raise EngineDeadError(f"unexpected message from a starting engine core: {kind!r}")
        ready = msgspec.msgpack.decode(payload, type=CoreReady)
        logger.info(f"engine core running in process {self.process.pid} ({ready.num_gpu_blocks} KV blocks)")

    def _wait_message(self, deadline: float | None = None) -> tuple[bytes, bytes] | None:
        """The next ``[kind, payload]`` from the core (blocking); None once
        ``time.monotonic()`` passes ``deadline``.

        Raises:
            EngineDeadError: the core process is gone.
        """
        while not self._output.poll(200):
            if not self.process.is_alive():
                raise self._process_gone()
            if deadline is not None and time.monotonic() > deadline:
                return None
        kind, payload = self._output.recv_multipart()
        return kind, payload

    def _process_gone(self) -> EngineDeadError:
        return EngineDeadError(f"the engine core process exited with code {self.process.exitcode} "
                               "(see the log above)")

    @staticmethod
    def _dead_error(payload: bytes) -> EngineDeadError:
        dead = msgspec.msgpack.decode(payload, type=CoreDead)
        return EngineDeadError(f"engine core failed: {dead.error_type}: {dead.message}")

    def _send(self, kind: bytes, payload: object = None) -> None:
        self._input.send_multipart([kind, b"" if payload is None else self._encoder.encode(payload)], copy=False)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(ADD, request)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
                       ) -> None:
        if request_ids:
            self._send(ABORT, AbortRequests(list(request_ids), int(status)))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.process.is_alive():
            try:
                # NOTE: non-blocking: a core that is exiting has closed its socket, and a
                # PUSH without a peer would wait forever.
                self._input.send_multipart([SHUTDOWN, b""], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.process.join(_SHUTDOWN_TIMEOUT_S)
            if self.process.is_alive():
                logger.warning("engine core did not exit in time: terminating it")
                self.process.terminate()
                self.process.join(5)
        self._close_sockets()
        for address in (self.input_address, self.output_address):
            try:
                os.unlink(address.removeprefix("ipc://"))
            except OSError:
                pass

    def _close_sockets(self) -> None:
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()

    def _decode_outputs(self, kind: bytes, payload: bytes) -> EngineCoreOutputs:
        if kind == OUTPUTS:
            return self._outputs_decoder.decode(payload)
        if kind == DEAD:
            raise self._dead_error(payload)
        raise EngineDeadError(f"unexpected message from the engine core: {kind!r}")


class SyncMPClient(MPClient):
    """Blocking access to a core process (e.g. the offline ``LLM`` with
    ``multiprocess=True``)."""

    def get_output(self, timeout_s: float | None = None) -> EngineCoreOutputs | None:
        """The next step's outputs; None after ``timeout_s`` without any.

        Raises:
            EngineDeadError: the core reported a fatal error or its process is gone.
        """
        message = self._wait_message(None if timeout_s is None else time.monotonic() + timeout_s)
        return None if message is None else self._decode_outputs(*message)


class AsyncMPClient(MPClient):
    """asyncio access to a core process (the server's ``AsyncLLM``). The output
    socket is polled from the running event loop, which is bound on first use."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        # The same libzmq socket, awaited from whichever event loop runs.
        self._async_output = zmq.asyncio.Socket.shadow(self._output.underlying)

    async def get_output_async(self) -> EngineCoreOutputs:
        """Wait for the next step's outputs.

        Raises:
            EngineDeadError: the core reported a fatal error or its process is gone.
        """
        while not await self._async_output.poll(500):
            if not self.process.is_alive():
                raise self._process_gone()
        return self._decode_outputs(*await self._async_output.recv_multipart())


# --------------------------------------------------------------- core process


def run_engine_core(config: EngineConfig, input_address: str, output_address: str, parent_pid: int) -> None:
    """Entry point of the engine core process: load the model, report READY,
    then loop: take requests and aborts, run a step, send its outputs.

    Ctrl-C and SIGTERM are left to the parent (it sends SHUTDOWN), so a
    terminal's Ctrl-C does not kill the core under a draining server.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.dup2(2, 1)  # the core prints nothing for users: its reports go to stderr
    _leave_a_core_for_the_front_end(config)
    ctx = zmq.Context()
    input_socket = ctx.socket(zmq.PULL)
    input_socket.connect(input_address)
    output_socket = ctx.socket(zmq.PUSH)
    output_socket.setsockopt(zmq.SNDHWM, 0)
    output_socket.connect(output_address)
    encoder = msgspec.msgpack.Encoder()
    try:
        from ember.engine.core import EngineCore

        core = EngineCore(config)
        output_socket.send_multipart([READY, encoder.encode(CoreReady(core.num_gpu_blocks))])
        _busy_loop(core, input_socket, output_socket, encoder, parent_pid, config.model_config.max_model_len)
    except BaseException as e:  # noqa: BLE001 - report every death to the front end
        logger.exception("engine core died")
        output_socket.send_multipart([DEAD, encoder.encode(CoreDead(type(e).__name__, str(e)))])
        output_socket.close(linger=2000)
        input_socket.close(linger=0)
        ctx.term()
        os._exit(1)
    output_socket.close(linger=2000)
    input_socket.close(linger=0)
    ctx.term()


def _leave_a_core_for_the_front_end(config: EngineConfig) -> None:
    """On CPU, run the model on all cores but one (unless ``OMP_NUM_THREADS``
    says otherwise): the front end's process needs one for HTTP and
    detokenization, and an OpenMP team with a descheduled thread stalls at
    every barrier (matmuls ran 10-100x slower on a busy 2-core machine)."""
    if config.device_config.torch_device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))


def _busy_loop(core: EngineCore, input_socket: zmq.Socket, output_socket: zmq.Socket,
               encoder: msgspec.msgpack.Encoder, parent_pid: int, max_model_len: int) -> None:
    add_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
    abort_decoder = msgspec.msgpack.Decoder(AbortRequests)
    while True:
        # Idle: block (with a timeout, to notice an orphaned core); busy: only
        # take what has already arrived, then step.
        if not core.has_unfinished_requests():
            while not input_socket.poll(_IDLE_POLL_MS):
                if os.getppid() != parent_pid:
                    logger.warning("engine core: the front-end process is gone; exiting")
                    return
                core.check_health()  # a worker process that died while idle fails the core now
        rejected: dict[str, str] = {}
        while True:
            try:
                kind, payload = input_socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            if kind == SHUTDOWN:
                core.shutdown()
                return
            if kind == ADD:
                req = add_decoder.decode(payload)
                try:
                    core.add_request(make_core_request(req, max_model_len))
                except ValueError as e:
                    rejected[req.request_id] = str(e)
            elif kind == ABORT:
                msg = abort_decoder.decode(payload)
                core.abort_requests(msg.request_ids, RequestStatus(msg.status))
        # NOTE: sent after every step and every batch of messages, even with no
        # token in it, so the front end's view (metrics, aborts done) stays current.
        out = core.step_with_stats()
        out.rejected = rejected
        output_socket.send_multipart([OUTPUTS, encoder.encode(out)], copy=False)
