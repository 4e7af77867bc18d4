"""The OpenAI-compatible HTTP server: FastAPI app and its uvicorn runner.

Routes: ``GET /health``, ``GET /version``, ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions``.

Every error is answered with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``: 400 for the client's mistakes
(malformed JSON, wrong types, unknown fields, prompts that do not fit the context,
invalid sampling values), 401 for a missing or wrong API key, 404 for unknown routes
and an unknown model (code ``model_not_found``, as OpenAI and vLLM), 429 when overloaded,
503 while the model loads (code ``model_loading``: the server listens from the
start, while the engine core process loads the model), when the engine has died
(``engine_dead``) or the server is shutting down, 504 when a request
ran past ``--request-timeout``, 500 for internal errors (the server stays up).
429 and 503 carry ``Retry-After``.

Shutdown (SIGTERM or Ctrl-C): the server keeps its socket open but answers new
generation requests and ``/health`` with 503 (code ``server_shutting_down``), gives
the running requests ``--shutdown-timeout`` seconds to finish, aborts the rest (see
:mod:`ember.entrypoints.openai.supervisor` for what their clients see), then closes
the socket, shuts the engine down and exits with status 0. A second signal cuts
the grace period short.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import socket
from collections.abc import Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import ember
from ember.engine.core_client import EngineDeadError, EngineLoadingError, EngineOverloadedError
from ember.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    chat_template_messages,
)
from ember.entrypoints.openai.serving_chat import OpenAIServingChat
from ember.entrypoints.openai.serving_completion import OpenAIServingCompletion
from ember.entrypoints.openai.supervisor import (
    RequestSupervisor,
    SupervisorMiddleware,
    shutting_down_error,
)
from ember.metrics import PrometheusMetrics

logger = logging.getLogger(__name__)

# Seconds that running requests get to finish on SIGTERM / Ctrl-C (``--shutdown-timeout``).
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# After the drain, seconds that other open connections (e.g. a slow /metrics scrape) get.
_CONNECTIONS_CLOSE_S = 5


class _ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII characters as ``\\u`` escapes: an error may echo a field
    name the client sent with a lone surrogate, which UTF-8 cannot encode but JSON's
    escapes carry back exactly."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def model_loading_error() -> APIError:
    """503 ``model_loading``: the server listens, but the engine core is still
    loading the model."""
    return APIError("the model is still loading; retry in a few seconds", 503, type="server_error",
                    code="model_loading")


def _error_response(err: APIError) -> JSONResponse:
    # NOTE: an overloaded or stopping server tells well-behaved clients when to come back.
    headers = {"Retry-After": "1"} if err.status_code in (429, 503) else None
    return _ASCIIJSONResponse(err.body.model_dump(), status_code=err.status_code, headers=headers)


class ApiKeyMiddleware:
    """ASGI middleware: ``/v1/*`` requires ``Authorization: Bearer <api_key>``
    (compared in constant time); otherwise 401 with an OpenAI error body.

    NOTE: plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which pipes
    every streamed chunk through an extra task and memory stream.
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError("invalid or missing API key (send 'Authorization: Bearer <key>')", 401,
                               type="authentication_error", code="invalid_api_key")
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def validation_error(exc: RequestValidationError) -> APIError:
    """Turn FastAPI's body validation errors (its 422) into one OpenAI-style 400.

    The message names every field at fault, e.g.
    ``max_tokens: Input should be a valid integer (got 'many')``; ``param`` is the first.
    """
    problems: list[str] = []
    param: str | None = None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            where = f" at character {loc[0]}" if loc else ""
            return APIError(f"Malformed JSON body: {e.get('ctx', {}).get('error', 'cannot parse')}{where}",
                            code="invalid_json")
        if not loc and e.get("type") == "string_unicode" and isinstance(e.get("input"), str):
            loc = [e["input"]]  # a top-level field name that is not Unicode text
        param = param or (loc[0] if loc else None)
        problems.append(_describe_problem(e, loc))
    return APIError("; ".join(problems) or "invalid request", param=param)


def _describe_problem(e: dict[str, Any], loc: list[str]) -> str:
    kind = e.get("type", "")
    if not loc:  # the body itself
        return "the request body is missing (send a JSON object)" if kind == "missing" else \
            "the request body must be a JSON object"
    field = ".".join(loc)
    if kind == "string_unicode" and len(loc) == 1 and e.get("input") == loc[0]:
        return f"the field name {loc[0]!r} is not valid Unicode text (it holds a lone surrogate)"
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {field} (Ember does not support it)"
    if kind == "missing":
        return f"{field}: field required"
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "value_error":  # our own validators' messages (about the field, or an item: "prompt[2] ...")
        return msg if msg.startswith((f"{loc[-1]} ", f"{loc[-1]}[")) else f"{field}: {msg}"
    got = repr(e["input"]) if "input" in e else ""
    got = f" (got {got[:60]}{'...' if len(got) > 60 else ''})" if got else ""
    return f"{field}: {msg}{got}"


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, cancelling it if the client disconnects first.

    NOTE: Starlette cancels streaming responses on disconnect itself, but not a
    handler that is still computing a non-streaming answer; cancelling it closes the
    engine's output generator, which aborts the request and frees its KV blocks.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return task.result()
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()


def build_app(engine: Any, reasoning_parser: str | None = None, api_key: str | None = None,
              request_timeout: float | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (an ``AsyncLLM`` or the same interface).

    Args:
        reasoning_parser: an :mod:`ember.reasoning` parser for chat completions.
        api_key: if set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``
            (401 otherwise; compared in constant time).
        request_timeout: seconds a generation request may run before the server
            aborts it (None: no limit); see :mod:`ember.entrypoints.openai.supervisor`.

    ``app.state.supervisor`` is the :class:`RequestSupervisor` whose ``drain``
    the server runs on shutdown.

    An engine refusing a request for overload (:class:`EngineOverloadedError`,
    see ``AsyncLLM(max_waiting_requests=...)``) gets 429 with ``Retry-After``.

    Raises:
        ValueError: ``request_timeout`` is not positive.
    """
    app = FastAPI(title="Ember OpenAI-compatible API", version=ember.__version__)
    app.state.engine = engine
    model_name = engine.model_config.served_model_name
    metrics = PrometheusMetrics(model_name)
    if hasattr(engine, "metrics"):
        engine.metrics = metrics
    supervisor = RequestSupervisor(engine, request_timeout)
    app.state.supervisor = supervisor
    app.add_middleware(SupervisorMiddleware, supervisor=supervisor, error_response=_error_response)
    chat = OpenAIServingChat(supervisor, reasoning_parser)
    completion = OpenAIServingCompletion(supervisor)

    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(str(exc.detail), exc.status_code, type=kind))

    @app.exception_handler(EngineLoadingError)
    async def _engine_loading(_: Request, exc: EngineLoadingError) -> JSONResponse:
        return _error_response(model_loading_error())

    @app.exception_handler(EngineOverloadedError)
    async def _engine_overloaded(_: Request, exc: EngineOverloadedError) -> JSONResponse:
        return _error_response(APIError(f"the server is overloaded: {exc}; retry later", 429,
                                        type="rate_limit_exceeded", code="server_overloaded"))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error_response(APIError(f"the engine stopped: {exc}", 503, type="server_error",
                                        code="engine_dead"))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this handler answers.
        return _error_response(APIError(f"internal error: {type(exc).__name__}: {exc}", 500,
                                        type="internal_server_error"))

    @app.get("/health")
    async def health() -> Response:
        if supervisor.draining:
            return _error_response(shutting_down_error())
        if getattr(engine, "errored", False):
            return _error_response(APIError("the engine stopped after an error", 503, type="server_error"))
        if not getattr(engine, "ready", True):
            return _error_response(model_loading_error())
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": ember.__version__}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, root=engine.model_config.model,
                                         max_model_len=engine.model_config.max_model_len)])

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        completion.check_model(request.model)
        try:
            if request.messages is not None:
                ids = engine.input_processor.apply_chat_template(chat_template_messages(request.messages))
            elif isinstance(request.prompt, str):
                ids = engine.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
            else:
                raise ValueError("give either 'prompt' or 'messages'")
        except ValueError as e:
            raise APIError(str(e)) from e
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.model_config.max_model_len)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        completion.check_model(request.model)
        vocab = engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in request.tokens):
            raise APIError(f"tokens must be token ids in [0, {vocab}) (the vocabulary)", param="tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(request.tokens))

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        return await _cancel_on_disconnect(raw_request, completion.create_completion(request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        return await _cancel_on_disconnect(raw_request, chat.create_chat_completion(request))

    return app


def _bind_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so that a busy port fails in a second, not after the load.

    The socket has TCP_NODELAY, which the connections accepted on it inherit:
    without it, Nagle's algorithm holds each small SSE chunk until the client
    acknowledges the previous one, and a client delaying its ACKs (Linux: up to
    40 ms) then delays tokens by that much (measured: first streamed token 40 ms
    late on loopback).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"ember serve: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


async def serve(engine: Any, sock: socket.socket, log_level: str = "info", reasoning_parser: str | None = None,
                api_key: str | None = None, request_timeout: float | None = None,
                shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
    """Serve ``engine`` on the bound ``sock`` until Ctrl-C / SIGTERM, then drain:
    running requests get ``shutdown_timeout`` seconds to finish (see the module
    docstring). The engine itself is not shut down here.

    Raises:
        ValueError: ``shutdown_timeout`` is negative (and see :func:`build_app`).
    """
    if not shutdown_timeout >= 0:
        raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {shutdown_timeout!r}")
    app = build_app(engine, reasoning_parser, api_key, request_timeout)
    server = _make_server(app, log_level, shutdown_timeout)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    load_error: list[BaseException] = []

    async def wait_for_model() -> None:
        # The server answers (503 ``model_loading``) while the engine core loads.
        try:
            await engine.wait_until_ready()
        except Exception as e:  # noqa: BLE001 - reported after the server stops
            load_error.append(e)
            server.should_exit = True
            return
        logger.info("the model is loaded: serving requests")

    loading = asyncio.ensure_future(wait_for_model()) if not getattr(engine, "ready", True) else None
    logger.info("Ember serves %s at http://%s:%d/v1 (health: /health)",
                engine.model_config.served_model_name, shown, port)
    try:
        await server.serve(sockets=[sock])
    finally:
        if loading is not None and not loading.done():
            loading.cancel()
    if load_error:
        raise load_error[0]


def _make_server(app: FastAPI, log_level: str, shutdown_timeout: float) -> Any:
    import uvicorn

    supervisor: RequestSupervisor = app.state.supervisor

    class DrainingServer(uvicorn.Server):
        """uvicorn, with the drain before it closes the socket and its connections."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:  # a second signal: stop waiting for running requests
                supervisor.cut_grace()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await supervisor.drain(shutdown_timeout)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=_CONNECTIONS_CLOSE_S)
    return DrainingServer(config)


def run_server(args: argparse.Namespace) -> None:
    """Entry point of ``ember serve``: bind, load the model, serve, shut down.

    Blocks until the server stops; Ctrl-C or SIGTERM stop it gracefully (see the
    module docstring), also while the model is loading.
    """
    from ember.engine.arg_utils import EngineArgs
    from ember.engine.async_llm import AsyncLLM

    # uvicorn handles SIGINT/SIGTERM while serving and then re-raises the signal; a
    # default SIGTERM would kill the process before the engine shuts down.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    sock = _bind_socket(args.host, args.port)
    engine = None
    try:
        # NOTE: the core process loads the model while the server already answers
        # (/health: 503 model_loading), so load balancers see a live, not-ready server.
        engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args), wait_until_ready=False,
                                           max_waiting_requests=getattr(args, "max_waiting_requests", None))
        # NOTE: the API key is read once, here: from --api-key, else $EMBER_API_KEY.
        api_key = getattr(args, "api_key", None) or os.environ.get("EMBER_API_KEY") or None
        asyncio.run(serve(engine, sock, getattr(args, "log_level", "info"), getattr(args, "reasoning_parser", None),
                          api_key, getattr(args, "request_timeout", None),
                          getattr(args, "shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT_S)))
    except KeyboardInterrupt:
        pass
    finally:
        if engine is not None:
            engine.shutdown()
        sock.close()
        signal.signal(signal.SIGTERM, previous)
    logger.info("Ember server stopped")


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
