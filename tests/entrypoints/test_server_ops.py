"""Operations features of the server, on the fake echo engine: API key,
overload protection (429 + Retry-After), /tokenize and /detokenize, /metrics."""

from __future__ import annotations

from fastapi.testclient import TestClient

from ember.entrypoints.openai.api_server import build_app
from tests.entrypoints.test_protocol import MODEL, EchoEngine

BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


def test_api_key_required_on_v1_only() -> None:
    client = TestClient(build_app(EchoEngine(), api_key="s3cret"), raise_server_exceptions=False)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        resp = client.post("/v1/completions", json=BODY, headers=headers)
        assert resp.status_code == 401
        err = resp.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    ok = client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
    assert client.get("/health").status_code == 200  # probes need no key


class BusyEngine(EchoEngine):
    def __init__(self, waiting: int) -> None:
        super().__init__()
        self.waiting = waiting

    def num_waiting_requests(self) -> int:
        return self.waiting


def test_overload_returns_429_with_retry_after() -> None:
    engine = BusyEngine(waiting=3)
    client = TestClient(build_app(engine, max_waiting_requests=3), raise_server_exceptions=False)
    resp = client.post("/v1/completions", json=BODY)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "server_overloaded"
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 429
    engine.waiting = 2
    assert client.post("/v1/completions", json=BODY).status_code == 200


def test_tokenize_and_detokenize() -> None:
    engine = EchoEngine()
    client = TestClient(build_app(engine), raise_server_exceptions=False)
    resp = client.post("/tokenize", json={"model": MODEL, "prompt": "abc"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["tokens"] == engine.tokenizer.encode("abc") and body["count"] == len(body["tokens"])
    back = client.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"] == engine.tokenizer.decode(body["tokens"])
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hey"}]}).json()
    assert chat["tokens"] == engine.input_processor.apply_chat_template([{"role": "user", "content": "hey"}])
    assert client.post("/tokenize", json={"model": MODEL}).status_code == 400
    assert client.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 400
    assert client.post("/detokenize", json={"tokens": [10 ** 9]}).status_code == 400


def test_metrics_endpoint_renders() -> None:
    client = TestClient(build_app(EchoEngine()), raise_server_exceptions=False)
    text = client.get("/metrics").text
    assert "ember:num_requests_running" in text and "ember:prompt_tokens_total" in text
