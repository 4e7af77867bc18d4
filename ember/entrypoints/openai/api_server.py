"""The OpenAI-compatible HTTP server: FastAPI app and its uvicorn runner.

Routes: ``GET|HEAD /health``, ``GET /metrics``, ``GET /version``, ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/embeddings``,
``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

Every response carries ``X-Request-Id``: the client's, or one the server made
up (see :mod:`ember.entrypoints.openai.request_id`).

Every error is answered with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``: 400 for the client's mistakes
(malformed JSON, wrong types, unknown fields, prompts that do not fit the context,
invalid sampling values), 401 for a missing or wrong API key, 404 for unknown routes
and an unknown model (code ``model_not_found``, as OpenAI and vLLM), 405 (with ``Allow``)
for a known route with the wrong method, 413 for a body over ``--max-request-body-bytes``
(code ``request_too_large``), 429 when overloaded,
503 beyond ``--limit-concurrency`` requests in progress (code ``too_many_requests``),
503 while the model loads (code ``model_loading``: the server listens from the
start, while the engine core process loads the model), when the engine has died
(``engine_dead``) or the server is shutting down, 504 when a request
ran past ``--request-timeout``, 500 for internal errors (the server stays up).
429 and 503 carry ``Retry-After``.

Hostile or careless clients: with ``--api-key`` every route but the probes
(:data:`OPEN_PATHS`) needs the key, checked before the body is read; a body over
``--max-request-body-bytes`` is refused from its ``Content-Length`` before it is
read, or, sent chunked, as soon as the bytes received pass the limit (at most the
limit is held); a prompt text too long to fit the context is refused before it is
tokenized, and large inputs are tokenized off the event loop so that other streams
keep flowing (:mod:`ember.entrypoints.openai.input_limits`); a request's stop strings
are bounded in number and length. Slow or idle connections are closed (header-read
and keep-alive timeouts) and evicted at the connection cap, and accept errors are
logged at a bounded rate (:mod:`ember.entrypoints.openai.connections`). Special-token
strings inside chat messages stay text (``--allow-special-tokens-in-content`` turns
this off for trusted clients; see :mod:`ember.engine.input_processor`).

Engine death: the engine core process is watched from the moment the model is
loaded, idle or not (:mod:`ember.engine.async_llm`). When it dies (crash, OOM kill,
``kill -9``), within a fraction of a second ``/health`` and new generation requests
get 503 with code ``engine_dead`` and a message naming the cause, and every request
in flight ends: a non-streaming one with that 503, a stream with a last
``finish_reason: "abort"`` chunk, an ``engine_dead`` error event and ``data: [DONE]``.
The server keeps answering so for :data:`ENGINE_DEAD_EXIT_DELAY_S` seconds (so that
probes and clients see the cause rather than a refused connection), then shuts down
as below without a grace period and exits with status 1, for a process supervisor
(systemd, Kubernetes) to restart it; SIGTERM stops it at once meanwhile, also with
status 1.

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
from collections import deque
from collections.abc import Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import ember
from ember.engine.core_client import EngineDeadError, EngineLoadingError, EngineOverloadedError
from ember.entrypoints.openai.connections import (
    DEFAULT_TIMEOUT_HEADER_READ_S,
    DEFAULT_TIMEOUT_KEEP_ALIVE_S,
    ConnectionGuard,
    GuardedH11Protocol,
    default_max_connections,
    install_log_rate_limit,
    raise_open_file_limit,
)
from ember.entrypoints.openai.input_limits import (
    DEFAULT_MAX_STOP_STRING_CHARS,
    DEFAULT_MAX_STOP_STRINGS,
    check_prompt_chars,
    messages_chars,
    run_input_work,
)
from ember.entrypoints.openai.openapi import install_openapi
from ember.engine.input_processor import ChatTemplateError
from ember.entrypoints.openai.input_limits import check_prompt_chars, messages_chars, run_input_work
from ember.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    chat_template_messages,
)
from ember.entrypoints.openai.request_id import RequestIdMiddleware, request_id_of
from ember.entrypoints.openai.serving_chat import OpenAIServingChat
from ember.entrypoints.openai.serving_completion import OpenAIServingCompletion
from ember.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from ember.entrypoints.openai.supervisor import (
    GENERATION_PATHS,
    RequestSupervisor,
    SupervisorMiddleware,
    engine_dead_cause,
    engine_dead_error,
    shutting_down_error,
)
from ember.metrics import PrometheusMetrics
from ember.pooling_params import PoolingParams

logger = logging.getLogger(__name__)

# Seconds that running requests get to finish on SIGTERM / Ctrl-C (``--shutdown-timeout``).
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# After the drain, seconds that other open connections (e.g. a slow /metrics scrape) get.
_CONNECTIONS_CLOSE_S = 5
# Seconds the server keeps answering 503 ``engine_dead`` after the engine core died,
# before it shuts down and exits with status 1 (the requests in flight have failed by
# then: the engine fails them as soon as it sees the core gone).
ENGINE_DEAD_EXIT_DELAY_S = 2.0
# ``--max-request-body-bytes``' default. The largest legitimate body is a prompt filling
# a long context: a 128K-token context is about 0.5 MiB of English text (4 characters per
# token) or 1 MiB as a JSON token-id list (up to 8 bytes per id); 16 MiB leaves room for a
# batch of such prompts or a long chat history, and still bounds what one request makes
# the server hold in memory and parse on its event loop.
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024
# Routes that answer without the API key: probes, metrics scrapes and the API docs.
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json"})


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


def _error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    # NOTE: an overloaded or stopping server tells well-behaved clients when to come back.
    headers = dict(headers or {})
    if err.status_code in (429, 503):
        headers["Retry-After"] = "1"
    return _ASCIIJSONResponse(err.body.model_dump(), status_code=err.status_code, headers=headers or None)


class ApiKeyMiddleware:
    """ASGI middleware: every route but :data:`OPEN_PATHS` requires
    ``Authorization: Bearer <api_key>`` (compared in constant time); otherwise 401
    with an OpenAI error body, before the request body is read.

    NOTE: plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which pipes
    every streamed chunk through an extra task and memory stream.
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError("invalid or missing API key (send 'Authorization: Bearer <key>')", 401,
                               type="authentication_error", code="invalid_api_key")
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def request_too_large_error(max_bytes: int) -> APIError:
    """413 ``request_too_large``: the body is over ``--max-request-body-bytes``."""
    return APIError(f"the request body is larger than this server's limit of {max_bytes} bytes "
                    "(--max-request-body-bytes)", 413, code="request_too_large")


class BodySizeLimitMiddleware:
    """ASGI middleware: refuses a request body over ``max_bytes`` with 413 and an
    OpenAI error body, and closes the connection (the rest of the body is not read).

    A ``Content-Length`` over the limit is refused before any of the body is read.
    A chunked body (no ``Content-Length``) is read ahead here, chunk by chunk, and
    refused as soon as the bytes received pass the limit; otherwise its chunks are
    handed on as they came. Requests without a body pass untouched, and so do
    bodies whose ``Content-Length`` is within the limit (the HTTP server delivers
    no more bytes than it declares).
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, chunked = None, False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                await self._refuse(APIError(f"invalid Content-Length header {length[:40]!r}"), scope, receive, send)
                return
            if too_large:
                await self._refuse(request_too_large_error(self.max_bytes), scope, receive, send)
                return
        elif chunked:
            parts: deque[dict] = deque()
            received = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went: nobody to answer
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    parts.clear()
                    await self._refuse(request_too_large_error(self.max_bytes), scope, receive, send)
                    return
                parts.append(message)
                if not message.get("more_body", False):
                    break

            async def replay() -> dict:
                return parts.popleft() if parts else await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(err: APIError, scope: dict, receive: Any, send: Any) -> None:
        # NOTE: "Connection: close" makes the HTTP server close the connection after
        # the answer instead of reading (and discarding) the rest of the body.
        await _error_response(err, {"Connection": "close"})(scope, receive, send)


class ConcurrencyLimitMiddleware:
    """ASGI middleware: at most ``limit`` HTTP requests in progress (a stream until
    its last chunk is sent); beyond, 503 with code ``too_many_requests`` and
    ``Retry-After``. The probes ``/health`` and ``/metrics`` are not counted, so that
    a busy server is not taken for a dead one."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in ("/health", "/metrics"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            err = APIError(f"the server is at its limit of {self.limit} concurrent requests (--limit-concurrency); "
                           "retry later", 503, type="server_error", code="too_many_requests")
            await _error_response(err)(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


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
              request_timeout: float | None = None,
              max_request_body_bytes: int | None = DEFAULT_MAX_REQUEST_BODY_BYTES,
              tool_call_parser: str | None = None,
              limit_concurrency: int | None = None, max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS,
              max_stop_string_chars: int = DEFAULT_MAX_STOP_STRING_CHARS,
              special_tokens_in_content: bool = False,
              chat_template: str | None = None, pooling: PoolingParams | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (an ``AsyncLLM`` or the same interface).

    Args:
        reasoning_parser: an :mod:`ember.reasoning` parser for chat completions.
        tool_call_parser: an :mod:`ember.tool_parsers` parser for chat
            completions' tool calls (None: the one the chat template teaches).
        api_key: if set, every route but :data:`OPEN_PATHS` requires
            ``Authorization: Bearer <api_key>`` (401 otherwise; compared in constant time).
        request_timeout: seconds a generation request may run before the server
            aborts it (None: no limit); see :mod:`ember.entrypoints.openai.supervisor`.
        max_request_body_bytes: larger request bodies get 413 (see
            :class:`BodySizeLimitMiddleware`); None: no limit.
        limit_concurrency: requests in progress beyond this get 503 (see
            :class:`ConcurrencyLimitMiddleware`); None: no limit.
        max_stop_strings, max_stop_string_chars: a request's ``stop`` may hold at
            most this many strings of at most this many characters (400 beyond).
        special_tokens_in_content: let special-token strings in chat messages
            become control tokens (default: they are tokenized as text).
        chat_template: the chat template (Jinja text) for chats that give none,
            instead of the tokenizer's (``--chat-template``, see
            :func:`ember.engine.input_processor.load_chat_template`).
        pooling: how ``/v1/embeddings`` pools hidden states (default ``LAST``,
            normalized; see :mod:`ember.pooling_params`).

    ``app.state.supervisor`` is the :class:`RequestSupervisor` whose ``drain``
    the server runs on shutdown.

    An engine refusing a request for overload (:class:`EngineOverloadedError`,
    see ``AsyncLLM(max_waiting_requests=...)``) gets 429 with ``Retry-After``.

    Raises:
        ValueError: ``request_timeout``, ``max_request_body_bytes``, ``limit_concurrency``
            or a stop-string bound is not positive.
    """
    if max_request_body_bytes is not None and not max_request_body_bytes > 0:
        raise ValueError(f"max_request_body_bytes must be a positive number of bytes or None, "
                         f"got {max_request_body_bytes!r}")
    for name, value in (("limit_concurrency", limit_concurrency), ("max_stop_strings", max_stop_strings),
                        ("max_stop_string_chars", max_stop_string_chars)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    app = FastAPI(title="Ember OpenAI-compatible API", version=ember.__version__)
    app.state.engine = engine
    if chat_template is not None:
        engine.input_processor.chat_template = chat_template
    model_name = engine.model_config.served_model_name
    metrics = PrometheusMetrics(model_name, engine.model_config.max_model_len, _cache_config_info(engine))
    if hasattr(engine, "metrics"):
        engine.metrics = metrics
    supervisor = RequestSupervisor(engine, request_timeout)
    app.state.supervisor = supervisor
    app.add_middleware(SupervisorMiddleware, supervisor=supervisor, error_response=_error_response)
    chat = OpenAIServingChat(supervisor, reasoning_parser, tool_call_parser)
    completion = OpenAIServingCompletion(supervisor)
    for serving in (chat, completion):
        serving.max_stop_strings, serving.max_stop_string_chars = max_stop_strings, max_stop_string_chars
        serving.special_tokens_in_content = special_tokens_in_content
    embedding = OpenAIServingEmbedding(supervisor, pooling)

    # NOTE: the middleware added last runs first: the key is checked before the body
    # size, so that a client without the key cannot make the server read its body,
    # and both before the concurrency count.
    if limit_concurrency is not None:
        app.add_middleware(ConcurrencyLimitMiddleware, limit=limit_concurrency)
    if max_request_body_bytes is not None:
        app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_body_bytes)
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestIdMiddleware, error_response=_error_response)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # NOTE: Starlette's Allow names the methods of the first route on the path
            # only; a path can have several (GET and HEAD /health).
            methods = {m for r in app.routes if getattr(r, "methods", None) and r.path_regex.match(request.url.path)
                       for m in r.methods}
            headers["Allow"] = ", ".join(sorted(methods))
        return _error_response(APIError(str(exc.detail), exc.status_code, type=kind), headers)

    @app.exception_handler(EngineLoadingError)
    async def _engine_loading(_: Request, exc: EngineLoadingError) -> JSONResponse:
        return _error_response(model_loading_error())

    @app.exception_handler(EngineOverloadedError)
    async def _engine_overloaded(_: Request, exc: EngineOverloadedError) -> JSONResponse:
        return _error_response(APIError(f"the server is overloaded: {exc}; retry later", 429,
                                        type="rate_limit_exceeded", code="server_overloaded"))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error_response(engine_dead_error(exc))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this handler answers.
        return _error_response(APIError(f"internal error: {type(exc).__name__}: {exc}", 500,
                                        type="internal_server_error"))

    @app.get("/health")
    async def health() -> Response:
        dead = engine_dead_cause(engine)
        if dead is not None:
            return _error_response(dead)
        if supervisor.draining:
            return _error_response(shutting_down_error())
        if not getattr(engine, "ready", True):
            return _error_response(model_loading_error())
        return Response(status_code=200)

    # HEAD: the same answer without a body (the HTTP server drops it), for probes that use HEAD.
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

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

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(request: TokenizeRequest) -> Response:
        completion.check_model(request.model)
        max_model_len = engine.model_config.max_model_len
        if request.messages is not None:
            messages = chat_template_messages(request.messages)
            location, num_chars = "messages", messages_chars(messages)
            options = request.template_options()

            def encode() -> list[int]:
                return engine.input_processor.apply_chat_template(
                    messages, special_tokens_in_content=special_tokens_in_content, **options)
        elif isinstance(request.prompt, str):
            prompt, add_special_tokens = request.prompt, request.add_special_tokens
            location, num_chars = "prompt", len(prompt)

            def encode() -> list[int]:
                return engine.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            raise APIError("give either 'prompt' or 'messages'")
        check_prompt_chars(num_chars, max_model_len, location)

        def work() -> bytes:
            # NOTE: the answer is serialized here too: for a large input, validating and
            # encoding its token list on the event loop would stall it as tokenizing would.
            ids = encode()
            return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=max_model_len).model_dump_json(
            ).encode()

        try:
            body = await run_input_work(work, num_chars)
        except ChatTemplateError as e:
            raise APIError(str(e), param=e.param) from e
        except ValueError as e:
            raise APIError(str(e), param=location) from e
        return Response(body, media_type="application/json")

    @app.get("/tokenizer_info", response_model=TokenizerInfoResponse)
    async def tokenizer_info() -> Response:
        if engine.tokenizer is None:
            raise APIError("this server runs without a tokenizer (--skip-tokenizer-init)", 404,
                           type="not_found_error")
        return _ASCIIJSONResponse(tokenizer_info_of(engine.tokenizer, engine.input_processor.chat_template))

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        completion.check_model(request.model)
        tokens, vocab = request.tokens, engine.model_config.vocab_size

        def work() -> str | None:
            if any(not 0 <= t < vocab for t in tokens):
                return None
            return engine.tokenizer.decode(tokens)

        text = await run_input_work(work, num_tokens=len(tokens))
        if text is None:
            raise APIError(f"tokens must be token ids in [0, {vocab}) (the vocabulary)", param="tokens")
        return DetokenizeResponse(prompt=text)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        return await _cancel_on_disconnect(raw_request,
                                           completion.create_completion(request, request_id_of(raw_request)))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        return await _cancel_on_disconnect(raw_request,
                                           chat.create_chat_completion(request, request_id_of(raw_request)))

    @app.post("/v1/embeddings")
    async def create_embedding(request: EmbeddingRequest, raw_request: Request) -> Any:
        return await _cancel_on_disconnect(raw_request,
                                           embedding.create_embedding(request, request_id_of(raw_request)))

    install_openapi(app, OPEN_PATHS, GENERATION_PATHS)
    return app


def _cache_config_info(engine: Any) -> dict[str, Any] | None:
    """``cache_config_info``'s labels: the engine's KV cache settings."""
    import dataclasses

    config = getattr(getattr(engine, "config", None), "cache_config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return None
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def tokenizer_info_of(tokenizer: Any, chat_template: str | None = None) -> dict[str, Any]:
    """``/tokenizer_info``'s body: ``tokenizer_class`` and the tokenizer's
    settings (its ``init_kwargs``, e.g. ``model_max_length``, ``bos_token``,
    ``added_tokens_decoder`` as ``{id: {"content", "special", ...}}``), leaving out
    values that are not JSON; ``chat_template`` is the one chats are rendered
    with (the server's ``--chat-template``, else the tokenizer's)."""
    info: dict[str, Any] = {"tokenizer_class": type(tokenizer).__name__}
    for key, value in getattr(tokenizer, "init_kwargs", {}).items():
        value = _json_value(value)
        if value is not _NOT_JSON:
            info[key] = value
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template is not None:
        info["chat_template"] = template
    return info


_NOT_JSON = object()


def _json_value(value: Any) -> Any:
    """``value`` as JSON data (added-token objects as their dicts), or :data:`_NOT_JSON`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_json_value(v) for v in value]
        return _NOT_JSON if any(v is _NOT_JSON for v in items) else items
    if isinstance(value, dict):
        out = {str(k): _json_value(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _NOT_JSON}
    if hasattr(value, "__getstate__") and type(value).__name__ == "AddedToken":
        return _json_value(value.__getstate__())
    return _NOT_JSON


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
                shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
                max_request_body_bytes: int | None = DEFAULT_MAX_REQUEST_BODY_BYTES,
                timeout_keep_alive: float = DEFAULT_TIMEOUT_KEEP_ALIVE_S,
                timeout_header_read: float = DEFAULT_TIMEOUT_HEADER_READ_S,
                max_connections: int | None = None, **app_options: Any) -> None:
    """Serve ``engine`` on the bound ``sock`` until Ctrl-C / SIGTERM, then drain:
    running requests get ``shutdown_timeout`` seconds to finish (see the module
    docstring). The engine itself is not shut down here.

    An engine with ``wait_until_dead`` (``AsyncLLM``) is supervised: when its core
    dies the server stops :data:`ENGINE_DEAD_EXIT_DELAY_S` seconds later (see the
    module docstring) and this raises the engine's error.

    Args:
        timeout_keep_alive: seconds an idle kept-alive connection stays open.
        timeout_header_read: seconds a connection gets to send a whole request head.
        max_connections: connections held at most (None: from the open-file
            limit, :func:`default_max_connections`).
        app_options: the other options of :func:`build_app`.

    Raises:
        ValueError: ``shutdown_timeout`` is negative (and see :func:`build_app`).
        EngineDeadError: the engine failed to start, or its core died while serving.
    """
    if not shutdown_timeout >= 0:
        raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {shutdown_timeout!r}")
    app = build_app(engine, reasoning_parser, api_key, request_timeout, max_request_body_bytes, **app_options)
    install_log_rate_limit()
    server = make_server(app, log_level, shutdown_timeout, timeout_keep_alive, timeout_header_read,
                         max_connections)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    load_error: list[BaseException] = []
    dead: list[BaseException] = []

    async def supervise_engine() -> None:
        # The server answers (503 ``model_loading``) while the engine core loads.
        if not getattr(engine, "ready", True):
            try:
                await engine.wait_until_ready()
            except Exception as e:  # noqa: BLE001 - reported after the server stops
                load_error.append(e)
                server.should_exit = True
                return
            logger.info("the model is loaded: serving requests")
        else:
            await engine.wait_until_ready()  # starts watching the core from this event loop
        if not hasattr(engine, "wait_until_dead"):
            return
        dead.append(await engine.wait_until_dead())
        logger.error("the engine core died (%s): answering 503 engine_dead, exiting with status 1 in %g s",
                     dead[0], ENGINE_DEAD_EXIT_DELAY_S)
        await asyncio.sleep(ENGINE_DEAD_EXIT_DELAY_S)
        server.should_exit = True

    supervising = asyncio.ensure_future(supervise_engine()) if hasattr(engine, "wait_until_ready") else None
    logger.info("Ember serves %s at http://%s:%d/v1 (health: /health)",
                engine.model_config.served_model_name, shown, port)
    try:
        await server.serve(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises a SIGTERM it handled
        if not dead:
            raise
    finally:
        if supervising is not None and not supervising.done():
            supervising.cancel()
    if load_error:
        raise load_error[0]
    if dead:
        raise dead[0]


def make_server(app: FastAPI, log_level: str = "info", shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
                timeout_keep_alive: float = DEFAULT_TIMEOUT_KEEP_ALIVE_S,
                timeout_header_read: float = DEFAULT_TIMEOUT_HEADER_READ_S,
                max_connections: int | None = None) -> Any:
    """The uvicorn server for ``app`` (from :func:`build_app`): it drains on
    shutdown, and accepts its connections through a :class:`ConnectionGuard`
    (header-read timeout, connection cap with eviction). ``server.serve(sockets=[sock])``
    runs it on one bound socket; ``server.guard`` is the guard while it runs.
    """
    import uvicorn

    supervisor: RequestSupervisor = app.state.supervisor

    class GuardedServer(uvicorn.Server):
        """uvicorn, with the drain before it closes the socket and its connections,
        and Ember's own accept loop."""

        guard: ConnectionGuard | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:  # a second signal: stop waiting for running requests
                supervisor.cut_grace()
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            assert sockets is not None and len(sockets) == 1, "serve on one bound socket"
            await super().startup(sockets=[])  # the lifespan; no listener of uvicorn's own
            # uvicorn has just set ``started``; it means "accepting" only once the
            # guard listens (another thread may be polling it).
            self.started = False

            def protocol(guard: ConnectionGuard) -> GuardedH11Protocol:
                return GuardedH11Protocol(config=self.config, server_state=self.server_state,
                                          app_state=self.lifespan.state, guard=guard)

            self.guard = ConnectionGuard(sockets[0], protocol, max_connections or default_max_connections(),
                                         timeout_header_read, backlog=self.config.backlog)
            self.guard.start()
            self.started = True

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await supervisor.drain(shutdown_timeout)
            if self.guard is not None:
                self.guard.stop()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=_CONNECTIONS_CLOSE_S,
                            timeout_keep_alive=timeout_keep_alive)  # type: ignore[arg-type]
    return GuardedServer(config)


def run_server(args: argparse.Namespace) -> None:
    """Entry point of ``ember serve``: bind, load the model, serve, shut down.

    Blocks until the server stops; Ctrl-C or SIGTERM stop it gracefully (see the
    module docstring), also while the model is loading.
    """
    from ember.engine.arg_utils import EngineArgs
    from ember.engine.async_llm import AsyncLLM

    raise_open_file_limit()
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
                          getattr(args, "shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT_S),
                          getattr(args, "max_request_body_bytes", DEFAULT_MAX_REQUEST_BODY_BYTES),
                          tool_call_parser=getattr(args, "tool_call_parser", None),
                          timeout_keep_alive=getattr(args, "timeout_keep_alive", DEFAULT_TIMEOUT_KEEP_ALIVE_S),
                          timeout_header_read=getattr(args, "timeout_header_read", DEFAULT_TIMEOUT_HEADER_READ_S),
                          limit_concurrency=getattr(args, "limit_concurrency", None),
                          max_stop_strings=getattr(args, "max_stop_strings", DEFAULT_MAX_STOP_STRINGS),
                          max_stop_string_chars=getattr(args, "max_stop_string_chars", DEFAULT_MAX_STOP_STRING_CHARS),
                          special_tokens_in_content=getattr(args, "allow_special_tokens_in_content", False),
                          chat_template=getattr(args, "chat_template", None), pooling=pooling_of(args)))
    except KeyboardInterrupt:
        pass
    finally:
        if engine is not None:
            engine.shutdown()
        sock.close()
        signal.signal(signal.SIGTERM, previous)
    logger.info("Ember server stopped")


def pooling_of(args: argparse.Namespace) -> PoolingParams:
    """The embeddings' pooling that ``--pooling-type`` and ``--no-embedding-normalize`` ask for."""
    return PoolingParams(getattr(args, "pooling_type", "LAST"), not getattr(args, "no_embedding_normalize", False))


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
