"""The OpenAPI document states what the server really answers: schemathesis,
driven by ``/openapi.json``, against the real server (bundled SmolLM2-135M-Instruct)
finds no server error and no answer that contradicts the document (status codes,
media types, response bodies and headers), and sees schema-invalid bodies refused.

Generated bodies keep ``max_tokens`` (and ``n``) small, so that each valid
request costs a few engine steps."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ember.entrypoints.openai.api_server import build_app
from tests.entrypoints.server_process import launch_server
from tests.entrypoints.test_protocol import EchoEngine
from tests.entrypoints.test_server_lifecycle import SERVER_ENV

API_KEY = "openapi-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
EXAMPLES = 20  # per operation and mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with launch_server("--max-model-len", "256", "--kv-cache-memory", "64M", "--api-key", API_KEY,
                       env=SERVER_ENV) as srv:
        yield srv.url


def _small(body: Any) -> Any:
    """``body`` with its output budget and choice count cut down to a few tokens
    (an output budget left out or null would run to the end of the context)."""
    if isinstance(body, dict):
        if "prompt" in body or "messages" in body:
            for field in ("max_tokens", "max_completion_tokens"):
                if body.get(field) is None:
                    body[field] = 3
        for field, most in (("max_tokens", 3), ("max_completion_tokens", 3), ("n", 2), ("logprobs", 2),
                            ("top_logprobs", 2)):
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > most:
                body[field] = most
    return body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_answers_match_the_openapi_document(server_url: str, mode: GenerationMode) -> None:
    api = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.label for op in operations} == {
        "GET /health", "GET /metrics", "GET /version", "GET /v1/models", "POST /tokenize", "POST /detokenize",
        "GET /tokenizer_info", "POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings"}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to negate: the GET routes take no parameters
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  phases=[Phase.explicit, Phase.generate])  # NOTE: no shrinking: a failure shows as found
        def check(case: Any) -> None:
            case.body = _small(case.body)
            case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=30)

        check()


def test_document_states_400_not_422_and_the_real_media_types() -> None:
    spec = build_app(EchoEngine(), api_key="k").openapi()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "422" not in responses
        for status in ("400", "401", "404", "413", "500", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == error, (path, status)
    for path in ("/v1/completions", "/v1/chat/completions"):
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        assert {"429", "504"} <= set(spec["paths"][path]["post"]["responses"])
    health = spec["paths"]["/health"]["get"]["responses"]
    assert set(health) == {"200", "503"} and "content" not in health["200"]
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "401" not in spec["paths"]["/version"]["get"]["responses"]


def test_probes_answer_as_documented(server_url: str) -> None:
    health = httpx.get(f"{server_url}/health")
    assert health.status_code == 200 and health.content == b"" and "content-type" not in health.headers
    metrics = httpx.get(f"{server_url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
