"""While the engine core loads the model the server already answers: ``/health``
and generation requests get 503 ``model_loading`` (with ``Retry-After``), and
``/v1/models`` works. A fake engine holds the loading state."""

from __future__ import annotations

from fastapi.testclient import TestClient

from ember.engine.core_client import EngineLoadingError
from ember.entrypoints.openai.api_server import build_app
from tests.entrypoints.test_protocol import MODEL, EchoEngine


class LoadingEngine(EchoEngine):
    """The EchoEngine while its model loads: ``generate`` raises as AsyncLLM's does."""

    ready = False

    async def generate(self, *args, **kwargs):
        if not self.ready:
            raise EngineLoadingError("the model is still loading; retry in a few seconds")
        async for out in super().generate(*args, **kwargs):
            yield out


def _assert_loading(resp) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers.get("retry-after")
    err = resp.json()["error"]
    assert err["code"] == "model_loading" and set(err) >= {"message", "type", "param", "code"}


def test_503_while_loading_then_serves() -> None:
    engine = LoadingEngine()
    client = TestClient(build_app(engine), raise_server_exceptions=False)
    _assert_loading(client.get("/health"))
    _assert_loading(client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}))
    _assert_loading(client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}))
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    engine.ready = True
    assert client.get("/health").status_code == 200
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
