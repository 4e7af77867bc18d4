"""Server-side control of running generations: the per-request deadline
(``--request-timeout``) and the drain on shutdown (``--shutdown-timeout``).

:class:`RequestSupervisor` stands in front of the engine with the engine's
interface, so the serving classes need not know about it. Each generation runs
under an :func:`asyncio.timeout_at` scope while it waits for the engine; the
server ends a generation by expiring that scope (its deadline passed, or the
shutdown sweep rescheduled it to now). Closing the engine's output generator then
aborts the request in the engine, which frees its KV blocks.

What the client sees when the server ends its request (the contract):

* before anything was sent (non-streaming requests, or streams still waiting
  for their first token): an HTTP error with OpenAI's error body, 504 with code
  ``request_timeout`` for the deadline, 503 with code ``server_shutting_down``
  for the shutdown sweep;
* a stream already under way: a last chunk with ``finish_reason: "abort"`` for
  every unfinished choice (and the usage chunk if asked for), then an error event
  ``data: {"error": {...}}`` with the same code, then ``data: [DONE]``. The
  error event is what makes the official ``openai`` client raise ``APIError``
  instead of returning a silently truncated answer.

The engine core dying ends every running generation the same way, with 503 and
code ``engine_dead`` (the message names the cause, e.g. the signal that killed
the core process); new generation requests get that 503 before their body is
read.

504 rather than 408: 408 means the server gave up waiting for the client's
request, which is not what happened; 504 is the status of a server that did not
get an answer from the component doing the work in time. Both are retried by
the ``openai`` client (by default twice), as is 503.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.engine.core_client import EngineDeadError
from ember.entrypoints.openai.protocol import APIError
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

# The routes that start generations: refused while draining, counted while running.
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings"})

# Seconds that aborted requests get to send their last bytes before the server stops.
ABORT_FLUSH_S = 5.0
_POLL_S = 0.05
_SSE_DONE_PREFIX = b"data: [DONE]"


def timeout_error(request_timeout: float) -> APIError:
    """504 ``request_timeout``: the request ran past ``--request-timeout`` (seconds)."""
    return APIError(f"the request ran longer than the server's request timeout ({request_timeout:g} s) "
                    "and was aborted", 504, type="server_error", code="request_timeout")


def shutting_down_error(message: str = "the server is shutting down; retry on another server or later"
                        ) -> APIError:
    """503 ``server_shutting_down``: refused or aborted because the server is stopping."""
    return APIError(message, 503, type="server_error", code="server_shutting_down")


def engine_dead_error(cause: BaseException | str | None = None) -> APIError:
    """503 ``engine_dead``: the engine core stopped (``cause``: why, e.g. the
    engine's ``dead_error``); nothing can be served any more."""
    why = str(cause) if cause is not None and str(cause) else "the engine core is not running"
    return APIError(f"the engine stopped: {why}", 503, type="server_error", code="engine_dead")


def engine_dead_cause(engine: Any) -> APIError | None:
    """:func:`engine_dead_error` for an engine whose ``errored`` is set, else None."""
    if not getattr(engine, "errored", False):
        return None
    return engine_dead_error(getattr(engine, "dead_error", None))


@dataclass(slots=True)
class _HTTPRequest:
    """One generation request as the middleware sees it."""

    stream_error: APIError | None = None  # to send before ``data: [DONE]``


# The generation request served by the current task (set by the middleware; copied
# into the tasks that Starlette starts for it, which share the mutable object).
_current_request: contextvars.ContextVar[_HTTPRequest | None] = contextvars.ContextVar(
    "ember_current_request", default=None)


@dataclass(eq=False, slots=True)
class _Generation:
    deadline: float | None  # event-loop time (seconds), None: no limit
    reason: str | None = None  # "timeout", "shutdown" or "engine_dead" once the server ends it
    scope: asyncio.Timeout | None = None  # set while waiting for the engine
    finished_indices: set[int] = field(default_factory=set)


class RequestSupervisor:
    """The engine as the serving classes see it, with deadlines and a shutdown drain.

    Every attribute other than :meth:`generate` is the engine's own
    (``model_config``, ``tokenizer``, ``input_processor``, ``errored``,
    ``num_waiting_requests``, ...).

    Args:
        engine: an ``AsyncLLM`` or anything with its interface.
        request_timeout: seconds a generation may run, from its submission to the
            engine (queueing included) to its last output; None for no limit.

    Raises:
        ValueError: ``request_timeout`` is not a positive number.
    """

    def __init__(self, engine: Any, request_timeout: float | None = None) -> None:
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError(f"request_timeout must be a positive number of seconds or None, got {request_timeout!r}")
        self.engine = engine
        self.request_timeout = request_timeout
        # NOTE: all of the state below is touched only from the event loop's thread
        # (the middleware, the generations and the drain all run on it).
        self.draining = False  # new generation requests are refused (503)
        self.num_active = 0  # generation requests whose response is not fully sent
        self._aborted = False  # the shutdown sweep ran: new generations fail at once
        self._cut_grace = False
        self._generations: set[_Generation] = set()

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    # -------------------------------------------------------------- generations
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams, request_id: str,
                       **kwargs: Any) -> AsyncIterator[RequestOutput]:
        """The engine's ``generate``, ended by the server on deadline or shutdown.

        Yields what the engine yields; a DELTA stream the server ends (or the
        engine's death ends) gets one more output with ``finish_reason="abort"``
        for each unfinished completion.

        Raises:
            APIError: 504 (deadline), 503 (shutdown) or 503 ``engine_dead`` when the
                server or the engine's death ends a request before it yielded
                anything, or one whose outputs are not DELTA.
            Whatever else the engine's ``generate`` raises.
        """
        if self._aborted:
            raise shutting_down_error()
        loop = asyncio.get_running_loop()
        gen = _Generation(None if self.request_timeout is None else loop.time() + self.request_timeout)
        self._generations.add(gen)
        inner = self.engine.generate(prompt, sampling_params, request_id, **kwargs)
        last: RequestOutput | None = None
        dead: EngineDeadError | None = None
        try:
            while gen.reason is None:
                try:
                    async with asyncio.timeout_at(gen.deadline) as scope:
                        gen.scope = scope
                        out = await anext(inner)
                except StopAsyncIteration:
                    return
                except EngineDeadError as e:
                    gen.reason, dead = "engine_dead", e
                    break
                except TimeoutError:
                    if not scope.expired():
                        raise  # the engine's own TimeoutError, not our deadline
                    gen.reason = gen.reason or "timeout"
                    break
                finally:
                    gen.scope = None
                last = out
                gen.finished_indices.update(c.index for c in out.outputs if c.finished)
                yield out
                if out.finished:
                    return
            # The server ended it: abort it in the engine now, whatever the client does.
            await inner.aclose()
            if gen.reason == "engine_dead":
                error = engine_dead_error(dead)
            elif gen.reason == "timeout":
                error = timeout_error(self.request_timeout or 0)
            else:
                error = shutting_down_error("the server is shutting down and aborted the request after its grace "
                                            "period")
            logger.warning("request %s aborted: %s", request_id, error.body.error.message)
            if last is None or sampling_params.output_kind != RequestOutputKind.DELTA:
                raise error
            http_request = _current_request.get()
            if http_request is not None:
                http_request.stream_error = error
            yield _abort_output(last, sampling_params, gen.finished_indices)
        finally:
            self._generations.discard(gen)
            await inner.aclose()

    def abort_all(self) -> int:
        """End every running generation now (the shutdown sweep); later ones fail
        with 503. Returns how many were running."""
        self._aborted = True
        loop = asyncio.get_running_loop()
        for gen in list(self._generations):
            gen.reason = "shutdown"
            if gen.scope is not None:
                gen.scope.reschedule(loop.time())
        return len(self._generations)

    # -------------------------------------------------------------- shutdown
    def begin_drain(self) -> None:
        """Refuse new generation requests (503) and answer ``/health`` with 503."""
        self.draining = True

    def cut_grace(self) -> None:
        """Stop waiting for running requests (a second Ctrl-C / SIGTERM)."""
        self._cut_grace = True

    async def drain(self, grace_s: float) -> None:
        """Stop taking requests, give the running ones ``grace_s`` seconds to
        finish, abort the rest and give them :data:`ABORT_FLUSH_S` to send their ends."""
        self.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        if self.num_active:
            logger.info("Shutting down: waiting up to %g s for %d running requests", grace_s, self.num_active)
        # NOTE: with the engine dead nothing can finish: no grace period then.
        while (self.num_active and loop.time() < deadline and not self._cut_grace
               and not getattr(self.engine, "errored", False)):
            await asyncio.sleep(_POLL_S)
        if self.num_active:
            logger.warning("Shutting down: aborting %d requests still running after the %g s grace period",
                           self.num_active, grace_s)
        self.abort_all()
        deadline = loop.time() + ABORT_FLUSH_S
        while self.num_active and loop.time() < deadline:
            await asyncio.sleep(_POLL_S)


def _abort_output(last: RequestOutput, params: SamplingParams, finished: set[int]) -> RequestOutput:
    n = getattr(params, "n", 1) or 1
    logprobs = [] if getattr(params, "logprobs", None) is not None else None
    outputs = [CompletionOutput(i, "", [], "abort", logprobs=logprobs) for i in range(n) if i not in finished]
    return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids, outputs, finished=True)


class SupervisorMiddleware:
    """ASGI middleware for the generation routes: refuses them with 503 while the
    server drains or once the engine is dead (code ``engine_dead``), counts the
    running ones (until their response is fully sent) and puts a server-side
    abort's error event in front of a stream's ``data: [DONE]``.

    Args:
        app: the ASGI app.
        supervisor: the app's :class:`RequestSupervisor`.
        error_response: turns an ``APIError`` into the app's JSON error response.
    """

    def __init__(self, app: ASGIApp, supervisor: RequestSupervisor, error_response: Any) -> None:
        self.app = app
        self.supervisor = supervisor
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        sup = self.supervisor
        refusal = engine_dead_cause(sup.engine) or (shutting_down_error() if sup.draining else None)
        if refusal is not None:
            await self.error_response(refusal)(scope, receive, send)
            return
        request = _HTTPRequest()
        token = _current_request.set(request)

        async def send_with_error_event(message: Message) -> None:
            if (request.stream_error is not None and message["type"] == "http.response.body"
                    and message.get("body", b"").startswith(_SSE_DONE_PREFIX)):
                event = f"data: {json.dumps(request.stream_error.body.model_dump())}\n\n".encode()
                request.stream_error = None
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send(message)

        sup.num_active += 1
        try:
            await self.app(scope, receive, send_with_error_event)
        finally:
            sup.num_active -= 1
            _current_request.reset(token)
