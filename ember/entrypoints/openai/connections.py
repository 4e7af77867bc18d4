"""Connection hygiene for the HTTP server: slow or idle clients cannot hold the
server's connections, and accept errors cannot flood the log.

* **Header-read timeout**: a connection must deliver a whole request head within
  ``timeout_header_read`` seconds of connecting (or of sending the first byte of
  its next request on a kept-alive connection), else it is closed. uvicorn's h11
  protocol has only the keep-alive timeout, which starts after a response: a
  client that connects and then sends its headers a byte at a time (slowloris)
  would hold the connection forever.
* **Keep-alive timeout**: an idle kept-alive connection is closed after
  ``timeout_keep_alive`` seconds (uvicorn's own timer).
* **Connection cap with eviction**: the server accepts connections itself
  (:class:`ConnectionGuard`), at most ``max_connections`` at a time, a bound below
  the process's open-file limit (:func:`default_max_connections`). At the cap, a
  new connection evicts the oldest connection that is not in a request (still
  waiting for its request head, or idle between requests); only when every
  connection is in a request do new ones wait in the kernel's queue. So hundreds
  of slow connections cannot keep a normal client out, and the process never
  runs out of file descriptors, where asyncio would stop accepting for a whole
  second after each failed ``accept``.
* **Bounded logging**: :class:`RateLimitFilter` lets through a few records of each
  message per interval and counts the rest (accept errors, "Invalid HTTP request").
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

# ``--timeout-header-read`` default, seconds. A client sends its request head in one
# write; 10 s covers a slow mobile link and still frees a stalled slot quickly.
DEFAULT_TIMEOUT_HEADER_READ_S = 10.0
# ``--timeout-keep-alive`` default, seconds (uvicorn's).
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 5.0
# File descriptors kept free for everything but client connections: the engine
# client's ZMQ sockets, tokenizer and template files, worker threads' pipes, logs.
RESERVED_FDS = 64
# Connections accepted per readiness event of the listening socket, so that a
# burst of connections does not hold the event loop.
ACCEPT_BATCH = 64
# After an accept error (out of file descriptors despite the cap, out of memory),
# seconds before accepting again.
ACCEPT_RETRY_S = 0.05
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (as servers
    usually do: the soft default, often 1024, is a few hundred connections).

    Returns:
        The soft limit now.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return 32


def default_max_connections() -> int:
    """Connections the server holds at most: the open-file limit, less the
    descriptors open now and :data:`RESERVED_FDS` (at least 8)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(8, soft - _open_fds() - RESERVED_FDS)


class RateLimitFilter(logging.Filter):
    """Lets through ``burst`` records of each message (logger and format string)
    per ``interval_s`` seconds; the next one let through after a pause says how
    many were dropped.

    Args:
        burst: records per message and interval.
        interval_s: seconds.
        clock: ``time.monotonic`` (a parameter for tests).
    """

    def __init__(self, burst: int = 5, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        self._windows: dict[tuple[str, str], list[float | int]] = {}  # key -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval_s:
            dropped = 0 if window is None else int(window[2])
            if len(self._windows) > 1000:  # many distinct messages: forget the old windows
                self._windows.clear()
            self._windows[key] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.msg} ({dropped} more like this were not logged)"
            return True
        if window[1] < self.burst:
            window[1] += 1
            return True
        window[2] += 1
        return False


def install_log_rate_limit(names: tuple[str, ...] = ("uvicorn.error", "asyncio", __name__)) -> RateLimitFilter:
    """Put one :class:`RateLimitFilter` on the loggers ``names`` (the HTTP
    protocol's, asyncio's, this module's); returns it."""
    rate_limit = RateLimitFilter()
    for name in names:
        target = logging.getLogger(name)
        for existing in [f for f in target.filters if isinstance(f, RateLimitFilter)]:
            target.removeFilter(existing)
        target.addFilter(rate_limit)
    return rate_limit


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the header-read timeout, reporting to its
    :class:`ConnectionGuard` whether the connection is in a request.

    A connection is *waiting* (evictable) from the moment it is made, and again
    after each response, until a whole request head has arrived.
    """

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.guard.connection_made(self)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self.guard.connection_closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request head is complete
            self._cancel_head_timer()
            self.guard.set_waiting(self, False)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.guard.set_waiting(self, True)  # idle until the next request (keep-alive timer runs)

    def evict(self) -> None:
        """Close the connection now (it is waiting for a request head)."""
        self._cancel_head_timer()
        self.transport.abort()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.guard.timeout_header_read, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.debug("closing a connection that sent no complete request head in %.3g s",
                         self.guard.timeout_header_read)
            self.transport.close()


class ConnectionGuard:
    """Accepts the server's connections: at most ``max_connections`` open, the
    oldest waiting one evicted for a new one at the cap (see the module docstring).

    Args:
        sock: the bound listening socket.
        protocol_factory: makes the connection's :class:`GuardedH11Protocol`
            (given ``guard=self``).
        max_connections: the cap (see :func:`default_max_connections`).
        timeout_header_read: seconds a connection gets for a request head.
        backlog: the kernel's accept queue length.

    Raises:
        ValueError: ``max_connections`` < 1 or ``timeout_header_read`` <= 0.
    """

    def __init__(self, sock: socket.socket, protocol_factory: Callable[..., GuardedH11Protocol],
                 max_connections: int, timeout_header_read: float, backlog: int = 2048) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if not timeout_header_read > 0:
            raise ValueError(f"timeout_header_read must be > 0 seconds, got {timeout_header_read!r}")
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.max_connections = max_connections
        self.timeout_header_read = timeout_header_read
        self.backlog = backlog
        self.num_open = 0  # accepted sockets not yet closed
        self.num_starting = 0  # ... of which the protocol has not been told of the connection yet
        self.num_evicted = 0
        self._waiting: dict[GuardedH11Protocol, None] = {}  # oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._resume: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        """Start accepting (on the running event loop)."""
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self.sock.listen(self.backlog)
        self._set_reading(True)

    def stop(self) -> None:
        """Stop accepting (connections already open stay)."""
        self._set_reading(False)
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._loop = None

    # ---------------------------------------------------------- protocol reports

    def connection_made(self, protocol: GuardedH11Protocol) -> None:
        """``protocol``'s connection is made: it waits for its request head."""
        self.num_starting -= 1
        self.set_waiting(protocol, True)

    def set_waiting(self, protocol: GuardedH11Protocol, waiting: bool) -> None:
        """``protocol``'s connection waits for a request head (evictable) or not."""
        self._waiting.pop(protocol, None)
        if waiting:
            self._waiting[protocol] = None

    def connection_closed(self, protocol: GuardedH11Protocol) -> None:
        self._waiting.pop(protocol, None)
        self.num_open -= 1
        if not self._reading and self._resume is None and self._loop is not None:
            self._set_reading(True)  # a slot is free: take connections from the queue again

    # ---------------------------------------------------------- accepting

    def _set_reading(self, on: bool) -> None:
        if self._loop is None or on == self._reading:
            return
        if on:
            self._loop.add_reader(self.sock.fileno(), self._accept_ready)
        else:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = on

    def _resume_accepting(self) -> None:
        self._resume = None
        self._set_reading(True)
        self._accept_ready()

    def _accept_ready(self) -> None:
        assert self._loop is not None
        for i in range(ACCEPT_BATCH):
            if self.num_open >= self.max_connections:
                if i and not select.select([self.sock], [], [], 0)[0]:
                    return  # nobody else is queueing: no need to make room
                if self._evict():
                    # NOTE: an evicted socket's descriptor is closed by a callback already
                    # queued on the loop; accept again after it has run.
                    self._pause(0)
                elif self.num_starting:
                    self._pause(ACCEPT_RETRY_S)  # connections just accepted will be evictable soon
                else:
                    self._set_reading(False)  # every connection is in a request: let new ones queue
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno not in _OUT_OF_RESOURCES:
                    raise
                logger.warning("cannot accept a connection (%s); %d connections open, retrying", e.strerror,
                               self.num_open)
                self._evict()
                self._pause(ACCEPT_RETRY_S)
                return
            self.num_open += 1
            self.num_starting += 1
            task = self._loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _pause(self, seconds: float) -> None:
        assert self._loop is not None
        self._set_reading(False)
        if self._resume is None:
            self._resume = (self._loop.call_soon(self._resume_accepting) if seconds == 0
                            else self._loop.call_later(seconds, self._resume_accepting))

    def _evict(self) -> bool:
        """Close the oldest waiting connection; False if none is waiting."""
        if not self._waiting:
            return False
        protocol = next(iter(self._waiting))
        del self._waiting[protocol]
        self.num_evicted += 1
        logger.info("%d connections open (the limit): closing the oldest one that is not in a request",
                    self.num_open)
        protocol.evict()
        return True

    async def _connect(self, conn: socket.socket) -> None:
        assert self._loop is not None
        made: list[GuardedH11Protocol] = []

        def make() -> GuardedH11Protocol:
            made.append(self.protocol_factory(guard=self))
            return made[0]

        try:
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._loop.connect_accepted_socket(make, conn)
        except Exception as e:  # noqa: BLE001 - the client went before the transport was made
            logger.debug("dropping an accepted connection: %r", e)
            conn.close()
            if not made:  # otherwise the protocol reports its connection closed
                self.num_open -= 1
                self.num_starting -= 1
