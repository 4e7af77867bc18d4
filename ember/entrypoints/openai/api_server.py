"""The OpenAI-compatible HTTP server: FastAPI app and its uvicorn runner.

Routes: ``GET /health``, ``GET /version``, ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions``.

Every error is answered with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``: 400 for the client's mistakes
(malformed JSON, wrong types, unknown fields, unknown model — code
``model_not_found`` —, prompts that do not fit the context, invalid sampling values),
404 for unknown routes, 503 when the engine has died, 500 for internal errors (the
server stays up).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
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
from ember.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from ember.entrypoints.openai.serving_chat import OpenAIServingChat
from ember.entrypoints.openai.serving_completion import OpenAIServingCompletion
from ember.metrics import PrometheusMetrics

logger = logging.getLogger(__name__)

# Seconds that open connections (e.g. running streams) get to finish on Ctrl-C.
GRACEFUL_SHUTDOWN_S = 5


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body.model_dump(), status_code=err.status_code)


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
        param = param or (loc[0] if loc else None)
        problems.append(_describe_problem(e, loc))
    return APIError("; ".join(problems) or "invalid request", param=param)


def _describe_problem(e: dict[str, Any], loc: list[str]) -> str:
    kind = e.get("type", "")
    if not loc:  # the body itself
        return "the request body is missing (send a JSON object)" if kind == "missing" else \
            "the request body must be a JSON object"
    field = ".".join(loc)
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {field} (Ember does not support it)"
    if kind == "missing":
        return f"{field}: field required"
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "value_error":  # our own validators' messages
        return msg if msg.startswith(f"{loc[-1]} ") else f"{field}: {msg}"
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


def build_app(engine: Any, reasoning_parser: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (an ``AsyncLLM`` or the same interface);
    ``reasoning_parser`` names an :mod:`ember.reasoning` parser for chat completions."""
    app = FastAPI(title="Ember OpenAI-compatible API", version=ember.__version__)
    app.state.engine = engine
    chat = OpenAIServingChat(engine, reasoning_parser)
    completion = OpenAIServingCompletion(engine)
    model_name = engine.model_config.served_model_name
    metrics = PrometheusMetrics(model_name)
    if hasattr(engine, "metrics"):
        engine.metrics = metrics

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

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this handler answers.
        return _error_response(APIError(f"internal error: {type(exc).__name__}: {exc}", 500,
                                        type="internal_server_error"))

    @app.get("/health")
    async def health() -> Response:
        if getattr(engine, "errored", False):
            return _error_response(APIError("the engine stopped after an error", 503, type="server_error"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": ember.__version__}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, max_model_len=engine.model_config.max_model_len)])

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        return await _cancel_on_disconnect(raw_request, completion.create_completion(request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        return await _cancel_on_disconnect(raw_request, chat.create_chat_completion(request))

    return app


def _bind_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so that a busy port fails in a second, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"ember serve: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


async def serve(engine: Any, sock: socket.socket, log_level: str = "info", reasoning_parser: str | None = None
                ) -> None:
    """Serve ``engine`` on the bound ``sock`` until Ctrl-C / SIGTERM (graceful: open
    streams get :data:`GRACEFUL_SHUTDOWN_S` seconds to finish)."""
    import uvicorn

    config = uvicorn.Config(build_app(engine, reasoning_parser), log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    logger.info("Ember serves %s at http://%s:%d/v1 (health: /health)",
                engine.model_config.served_model_name, shown, port)
    await uvicorn.Server(config).serve(sockets=[sock])


def run_server(args: argparse.Namespace) -> None:
    """Entry point of ``ember serve``: bind, load the model, serve, shut down.

    Blocks until the server stops; Ctrl-C or SIGTERM stop it gracefully, also while
    the model is loading.
    """
    from ember.engine.arg_utils import EngineArgs
    from ember.engine.async_llm import AsyncLLM

    # uvicorn handles SIGINT/SIGTERM while serving and then re-raises the signal; a
    # default SIGTERM would kill the process before the engine shuts down.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    sock = _bind_socket(args.host, args.port)
    engine = None
    try:
        engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args))
        asyncio.run(serve(engine, sock, getattr(args, "log_level", "info"), getattr(args, "reasoning_parser", None)))
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
