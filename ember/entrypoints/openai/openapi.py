"""The server's OpenAPI document as the server really answers.

FastAPI documents what it can see in the route signatures: 422 for invalid
bodies (the server answers 400 with OpenAI's error body instead), JSON for every
answer, no error statuses. :func:`install_openapi` rewrites the generated document:

* every error status a route can answer, with OpenAI's error body
  (:class:`ErrorResponse`): 400 (invalid request), 401 (API key, on every route
  but the probes and docs), 404 (unknown model), 413 (body too large), 429
  (engine overloaded), 500 (internal error), 503 (model loading, engine stopped,
  shutting down, ``--limit-concurrency``), 504 (``--request-timeout``);
* the generation routes' two answers: ``application/json`` (the response model)
  or, with ``"stream": true``, ``text/event-stream``;
* ``/health``: 200 without a body, or 503 with an error body; ``/metrics``:
  Prometheus' text format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from ember.entrypoints.openai.protocol import ChatCompletionResponse, CompletionResponse, ErrorResponse

_ERRORS = {
    "400": "invalid request: malformed JSON, a wrong type or value, an unknown field, a prompt too long",
    "401": "missing or wrong API key (when the server has one)",
    "404": "the model named is not served here (code model_not_found)",
    "413": "the request body is over the server's limit (code request_too_large)",
    "429": "the engine is overloaded (code server_overloaded; see Retry-After)",
    "500": "internal error",
    "503": "the model is loading, the engine stopped, the server is shutting down or at its concurrency limit "
           "(see Retry-After)",
    "504": "the request ran past the server's request timeout",
}
# Routes whose answer is the response model, or an event stream with "stream": true.
_STREAMING = {"/v1/completions": CompletionResponse, "/v1/chat/completions": ChatCompletionResponse}
# One server-sent event (OpenAPI 3.1 has a text/event-stream schema describe each
# event, as OpenAPI 3.2's itemSchema does): its data is a chunk as JSON, an error
# object as JSON, or the last event's "[DONE]".
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string",
                                      "description": "a chunk of the answer (JSON), an error body (JSON), or [DONE]"},
                             "event": {"type": "string"}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _add_schema(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema


def _error(status: str) -> dict[str, Any]:
    return {"description": _ERRORS[status], "content": {"application/json": {"schema": _ref("ErrorResponse")}}}


def document_responses(spec: dict[str, Any], open_paths: Iterable[str], generation_paths: Iterable[str]) -> None:
    """Rewrite ``spec`` (FastAPI's document, in place) as the module docstring says.

    Args:
        open_paths: routes that need no API key.
        generation_paths: routes that submit requests to the engine (429, 504).
    """
    open_paths, generation_paths = set(open_paths), set(generation_paths)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for model in (ErrorResponse, *_STREAMING.values()):
        _add_schema(schemas, model)
    for path, operations in spec.get("paths", {}).items():
        for method, op in operations.items():
            responses: dict[str, Any] = op.setdefault("responses", {})
            responses.pop("422", None)
            if path == "/health":
                op["responses"] = {"200": {"description": "the server is ready to serve (no body)"},
                                   "503": _error("503")}
                continue
            if path == "/metrics":
                op["responses"] = {"200": {"description": "the metrics, in Prometheus' text format",
                                           "content": {"text/plain": {"schema": {"type": "string"}}}}}
                continue
            statuses = ["500"]
            if path not in open_paths:
                statuses += ["401", "503"]
            if method == "post":
                statuses += ["400", "404", "413"]
            if path in generation_paths:
                statuses += ["429", "504"]
            for status in sorted(statuses):
                responses.setdefault(status, _error(status))
            if path in _STREAMING:
                responses["200"] = {"description": "the answer; with \"stream\": true, server-sent events "
                                                   "(chunks as JSON, then \"data: [DONE]\")",
                                    "content": {"application/json": {"schema": _ref(_STREAMING[path].__name__)},
                                                "text/event-stream": {"schema": _SSE_EVENT}}}


def install_openapi(app: FastAPI, open_paths: Iterable[str], generation_paths: Iterable[str]) -> None:
    """Make ``app``'s ``/openapi.json`` the rewritten document (see :func:`document_responses`)."""
    generate: Callable[[], dict[str, Any]] = app.openapi
    open_paths, generation_paths = frozenset(open_paths), frozenset(generation_paths)

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        spec = generate()  # FastAPI's, built once and kept in app.openapi_schema
        if fresh:
            document_responses(spec, open_paths, generation_paths)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
