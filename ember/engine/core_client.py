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
gone (checked by a thread blocked on the parent's sentinel, so also while it
is busy stepping), or after a fatal error, which it reports as :data:`DEAD`
first. The front end also watches the process itself, so a crash that sends
nothing (segfault, OOM kill, ``kill -9``) is detected too: the asyncio client
waits on the process sentinel from the event loop (:meth:`AsyncMPClient.watch_process`).

Sends never block: a request is handed to ZMQ without waiting (``NOBLOCK``).
With no high-water mark ZMQ queues for a connected core however busy it is, so
a send can only find no room when the core is not connected (not yet, or no
longer: a PUSH socket without a peer would block the sender forever). Such a
message waits in a bounded queue of the client's own until the core connects;
the blocking client waits for it while checking that the core is alive, the
asyncio client flushes it from a task, so a dead core never stalls the event
loop.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
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
# Messages that may wait for an unconnected core before new requests are refused.
# NOTE: a connected core never leaves a message waiting (no high-water mark), so
# the queue only fills in the moments between a core's death and its detection.
MAX_PENDING_SENDS = 4096


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
        # Messages waiting for a core that is not connected (see the module docstring).
        self._pending_sends: collections.deque[list[bytes]] = collections.deque()
        self._outputs_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        # NOTE: spawn, not fork: the parent may hold CUDA state and threads.
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(config, self.input_address, self.output_address, os.getpid()),
            name="ember-engine-core", daemon=True)
        self.process.start()
        self._ready = False
        # Set once this client has seen the core process gone.
        self.core_gone = False
        self.num_gpu_blocks: int | None = None  # the KV cache's size, once the core is ready

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
        self.num_gpu_blocks = ready.num_gpu_blocks

    def _wait_message(self, deadline: float | None = None) -> tuple[bytes, bytes] | None:
        """The next ``[kind, payload]`` from the core (blocking); None once
        ``time.monotonic()`` passes ``deadline``.

        Raises:
            EngineDeadError: the core process is gone.
        """
        while not self._output.poll(200):
            if not self.process.is_alive():
                raise self.process_exit_error()
            if deadline is not None and time.monotonic() > deadline:
                return None
        kind, payload = self._output.recv_multipart()
        return kind, payload

    def process_exit_error(self) -> EngineDeadError:
        """The error for a core process that has exited, naming its exit code or
        signal; from now on this client treats the core as gone."""
        self.core_gone = True
        code = self.process.exitcode
        how = f"exited with code {code}"
        if code is not None and code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        return EngineDeadError(f"the engine core process {how} (see the engine log)")

    @staticmethod
    def _dead_error(payload: bytes) -> EngineDeadError:
        dead = msgspec.msgpack.decode(payload, type=CoreDead)
        return EngineDeadError(f"engine core failed: {dead.error_type}: {dead.message}")

    def _send(self, kind: bytes, payload: object = None) -> None:
        """Hand a message to ZMQ without blocking; with no connected core, queue it
        (:meth:`_queue_send`).

        Raises:
            EngineDeadError: the core is gone (see :meth:`_queue_send`).
        """
        frames = [kind, b"" if payload is None else self._encoder.encode(payload)]
        if not self._pending_sends and self._try_send(frames):
            return
        self._queue_send(frames)

    def _try_send(self, frames: list[bytes]) -> bool:
        """Send now if the core is connected; False if it is not.

        NOTE: ZMQ takes a multipart message whole or not at all: once its first
        frame is queued, the rest follow on the same pipe.
        """
        try:
            self._input.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def _queue_send(self, frames: list[bytes]) -> None:
        """Deliver a message the core is not connected for: wait (blocking) until it
        connects, checking every 200 ms that its process is alive.

        Raises:
            EngineDeadError: the core process is gone.
        """
        while not self._try_send(frames):
            if not self._input.poll(200, zmq.POLLOUT) and not self.process.is_alive():
                raise self.process_exit_error()

    def add_request(self, request: EngineCoreRequest) -> None:
        """Raises:
            EngineDeadError: the core is known to be gone, or does not take input.
        """
        if self.core_gone or self._closed:
            raise self.process_exit_error()
        if len(self._pending_sends) >= MAX_PENDING_SENDS:
            raise EngineDeadError(f"the engine core has not taken input for a while ({len(self._pending_sends)} "
                                  "messages wait for it)")
        self._send(ADD, request)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
                       ) -> None:
        """Nothing to do once the core is known to be gone (its requests died with it)."""
        if request_ids and not (self.core_gone or self._closed):
            self._send(ABORT, AbortRequests(list(request_ids), int(status)))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending_sends.clear()
        if self.process.is_alive():
            # NOTE: never blocks: a core that is alive but not connected gets the
            # timeout below and is terminated.
            try:
                self._try_send([SHUTDOWN, b""])
            except zmq.ZMQError:
                pass
            self.process.join(_SHUTDOWN_TIMEOUT_S)
            if self.process.is_alive():
                logger.warning("engine core did not exit in time: terminating it")
                self.process.terminate()
                self.process.join(5)
            if self.process.is_alive():  # e.g. stopped (SIGSTOP), where SIGTERM waits
                logger.warning("engine core did not stop on SIGTERM: killing it")
                self.process.kill()
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
    socket is polled from the running event loop, which is bound on first use.

    Nothing here blocks the event loop: a message the core is not connected for
    waits in the client's queue, flushed by a task (see the module docstring),
    and :meth:`watch_process` reports the core's exit from the loop itself.
    """

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        # The same libzmq sockets, awaited from whichever event loop runs.
        self._async_output = zmq.asyncio.Socket.shadow(self._output.underlying)
        self._async_input = zmq.asyncio.Socket.shadow(self._input.underlying)
        self._flush_task: asyncio.Task | None = None
        self._watched_loop: asyncio.AbstractEventLoop | None = None

    def _queue_send(self, frames: list[bytes]) -> None:
        """Queue a message for a core that is not connected; a task of the running
        event loop sends the queue in order once it is (without a running loop,
        e.g. at shutdown, the message is dropped: the core is then stopped anyway)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._pending_sends.append(frames)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = loop.create_task(self._flush_sends())

    async def _flush_sends(self) -> None:
        while self._pending_sends and not (self._closed or self.core_gone):
            if self._try_send(self._pending_sends[0]):
                self._pending_sends.popleft()
            else:
                await self._async_input.poll(500, zmq.POLLOUT)

    def watch_process(self, on_exit: Callable[[], None]) -> None:
        """Call ``on_exit()`` from the running event loop as soon as the core
        process exits, for whatever reason (it waits on the process's sentinel:
        no polling, no thread). Idempotent per event loop; the watch ends with
        :meth:`shutdown`.
        """
        loop = asyncio.get_running_loop()
        if self._watched_loop is loop or self._closed or self.core_gone:
            return
        sentinel = self.process.sentinel

        def exited() -> None:
            loop.remove_reader(sentinel)
            # NOTE: the sentinel fires when the process has closed its files, just
            # before the kernel makes it a zombie: reap it (at once in practice) so
            # that its exit code or signal is known.
            self.process.join(0.1)
            on_exit()

        loop.add_reader(sentinel, exited)
        self._watched_loop = loop

    def forget_pending(self) -> None:
        """Drop the messages waiting for the core (it is gone) and stop the task
        that would send them."""
        self._pending_sends.clear()
        if self._flush_task is not None and not self._flush_task.done():
            try:
                self._flush_task.cancel()
            except RuntimeError:  # its event loop is already closed
                pass

    def shutdown(self) -> None:
        self.forget_pending()
        loop, self._watched_loop = self._watched_loop, None
        if loop is not None and not loop.is_closed():
            try:
                loop.remove_reader(self.process.sentinel)
            except (RuntimeError, ValueError, OSError):  # another thread's loop, or the fd is closed
                pass
        super().shutdown()

    async def get_output_async(self) -> EngineCoreOutputs:
        """Wait for the next step's outputs.

        Raises:
            EngineDeadError: the core reported a fatal error or its process is gone.
        """
        while not await self._async_output.poll(500):
            if not self.process.is_alive():
                raise self.process_exit_error()
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
    _exit_with_parent()
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


def _exit_with_parent() -> None:
    """End this process as soon as its parent (the front end) is gone, also while
    it is busy stepping: a daemon thread waits on the parent's sentinel.

    NOTE: without it a busy core whose front end was killed would keep stepping
    and then block forever sending outputs to nobody (an orphan holding the device).
    The thread sleeps in the kernel until then: it costs the step loop nothing.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        logger.warning("engine core: the front-end process is gone; exiting")
        os._exit(1)

    threading.Thread(target=watch, name="ember-parent-watch", daemon=True).start()


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
