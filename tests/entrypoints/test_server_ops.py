"""Operations features of the server, on fake engines: API key, overload
protection (429 + Retry-After), /tokenize and /detokenize, /metrics, the
per-request timeout and the shutdown drain. The real server's behaviour is tested
in test_server_lifecycle.py, test_server_load.py and test_server_fuzz.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient

from ember.engine.core_client import EngineOverloadedError
from ember.entrypoints.openai.api_server import build_app
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import RequestOutputKind
from tests.entrypoints.test_protocol import MODEL, EchoEngine

pytestmark = pytest.mark.serial

BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


def test_api_key_required_except_on_probes() -> None:
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
    """Refuses requests for overload the way ``AsyncLLM(max_waiting_requests=...)`` does."""

    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__()
        self.waiting, self.limit = waiting, limit

    async def generate(self, prompt, sampling_params, request_id, **kwargs):
        if self.waiting >= self.limit:
            raise EngineOverloadedError(f"{self.limit} requests are already waiting for a slot")
        async for out in super().generate(prompt, sampling_params, request_id, **kwargs):
            yield out


def test_overload_returns_429_with_retry_after() -> None:
    engine = BusyEngine(waiting=3, limit=3)
    client = TestClient(build_app(engine), raise_server_exceptions=False)
    for stream in (False, True):
        resp = client.post("/v1/completions", json={**BODY, "stream": stream})
        assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
        err = resp.json()["error"]
        assert err["code"] == "server_overloaded" and err["type"] == "rate_limit_exceeded", err
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
    assert client.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
    assert client.post("/detokenize", json={"tokens": [10 ** 9]}).status_code == 400


def test_metrics_endpoint_renders() -> None:
    client = TestClient(build_app(EchoEngine()), raise_server_exceptions=False)
    text = client.get("/metrics").text
    assert "ember:num_requests_running" in text and "ember:prompt_tokens_total" in text


# ---------------------------------------------------------------- request timeout and shutdown drain


class SlowEngine(EchoEngine):
    """Generates ``"x"`` per choice every ``step_s`` seconds, after ``first_s``; records
    the ids of requests whose generator was closed before they finished."""

    def __init__(self, step_s: float = 0.02, first_s: float = 0.0) -> None:
        super().__init__()
        self.step_s = step_s
        self.first_s = first_s

    async def generate(self, prompt, sampling_params, request_id, **kwargs):
        ids = self.input_processor.tokenize(prompt)
        params = self.input_processor.check(ids, sampling_params)
        limit = params.max_tokens
        finished = False
        try:
            await asyncio.sleep(self.first_s)
            for step in range(1, limit + 1):
                await asyncio.sleep(self.step_s)
                finished = step == limit
                if params.output_kind == RequestOutputKind.FINAL_ONLY and not finished:
                    continue
                n_new = 1 if params.output_kind == RequestOutputKind.DELTA else step
                outputs = [CompletionOutput(i, "x" * n_new, [ord("x")] * n_new, "length" if finished else None)
                           for i in range(params.n)]
                yield RequestOutput(request_id, None, ids, outputs, finished)
        finally:
            if not finished:
                self.aborted.append(request_id)


def stream_events(text: str) -> list:
    """The SSE events of a stream body: parsed JSON, and the final ``"[DONE]"``."""
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events and events[-1] == "[DONE]", text
    return [json.loads(e) for e in events[:-1]] + ["[DONE]"]


def assert_openai_error(body: dict, code: str) -> dict:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, body
    return err


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def test_request_timeout_non_streaming_is_504_and_aborts() -> None:
    engine = SlowEngine(step_s=0.05)
    client = TestClient(build_app(engine, request_timeout=0.3), raise_server_exceptions=False)
    start = time.monotonic()
    for path, body in (("/v1/completions", {**BODY, "max_tokens": 40}), ("/v1/chat/completions",
                                                                        {**CHAT, "max_tokens": 40})):
        resp = client.post(path, json=body)
        assert resp.status_code == 504, resp.text
        err = assert_openai_error(resp.json(), "request_timeout")
        assert err["type"] == "server_error" and "0.3 s" in err["message"]
    assert time.monotonic() - start < 2.5  # 2 x 0.3 s, not 2 x 2 s of generation
    assert len(engine.aborted) == 2  # the engine requests were aborted, not left running
    # Requests within the limit are unaffected.
    ok = client.post("/v1/completions", json={**BODY, "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "xxx"
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_request_timeout_ends_a_stream_with_abort_and_an_error_event(path: str) -> None:
    engine = SlowEngine(step_s=0.05)
    client = TestClient(build_app(engine, request_timeout=0.4), raise_server_exceptions=False)
    body = {**(BODY if path == "/v1/completions" else CHAT), "max_tokens": 40, "stream": True,
            "stream_options": {"include_usage": True}}
    resp = client.post(path, json=body)
    assert resp.status_code == 200
    events = stream_events(resp.text)
    err = assert_openai_error(events[-2], "request_timeout")
    assert err["type"] == "server_error"
    usage = events[-3]["usage"]
    chunks = events[:-3]
    choices = [c["choices"][0] for c in chunks]
    assert [c["finish_reason"] for c in choices][-1] == "abort"
    assert not any(c["finish_reason"] for c in choices[:-1])
    text = "".join(c.get("text") or c.get("delta", {}).get("content") or "" for c in choices)
    assert 0 < len(text) < 40 and text == "x" * len(text)
    assert usage["completion_tokens"] == len(text)
    assert len(engine.aborted) == 1


def test_request_timeout_abort_closes_every_choice() -> None:
    engine = SlowEngine(step_s=0.05)
    client = TestClient(build_app(engine, request_timeout=0.3), raise_server_exceptions=False)
    resp = client.post("/v1/completions", json={**BODY, "max_tokens": 40, "stream": True, "n": 2})
    events = stream_events(resp.text)
    assert_openai_error(events[-2], "request_timeout")
    last_reason = {}
    for chunk in events[:-2]:
        for choice in chunk["choices"]:
            last_reason[choice["index"]] = choice["finish_reason"]
    assert last_reason == {0: "abort", 1: "abort"}


def test_request_timeout_before_the_first_token_is_504_even_when_streaming() -> None:
    engine = SlowEngine(first_s=2.0)
    client = TestClient(build_app(engine, request_timeout=0.2), raise_server_exceptions=False)
    resp = client.post("/v1/completions", json={**BODY, "stream": True})
    assert resp.status_code == 504 and resp.headers["content-type"] == "application/json"
    assert_openai_error(resp.json(), "request_timeout")
    assert len(engine.aborted) == 1


def test_bad_operation_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="request_timeout"):
        build_app(EchoEngine(), request_timeout=0)


async def asgi_request(app, method: str, path: str, body: dict | None = None,
                       first_body: asyncio.Event | None = None) -> tuple[int, dict, bytes]:
    """Call the ASGI ``app`` directly (so that other calls can run meanwhile, which
    TestClient does not allow); returns ``(status, headers, body)``. ``first_body`` is
    set once the first non-empty body part is sent."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "root_path": "", "scheme": "http", "query_string": b"",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1234), "server": ("test", 80)}
    pending = [json.dumps(body).encode()] if body is not None else [b""]
    never = asyncio.Event()
    messages: list[dict] = []

    async def receive() -> dict:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        await never.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)
        if first_body is not None and message.get("body"):
            first_body.set()

    await app(scope, receive, send)
    start = messages[0]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in messages[1:])


async def start_stream_and_plain(app, stream_request: tuple[str, dict], plain_request: tuple[str, dict]
                                 ) -> tuple[asyncio.Task, asyncio.Task]:
    """Start a streaming and a non-streaming POST ((path, body) each); return
    their tasks once the stream has sent its first chunk."""
    first = asyncio.Event()
    path, body = stream_request
    stream = asyncio.create_task(asgi_request(app, "POST", path, {**body, "stream": True}, first))
    plain = asyncio.create_task(asgi_request(app, "POST", *plain_request))
    await asyncio.wait_for(first.wait(), 5)
    return stream, plain


def test_drain_lets_running_requests_finish_and_refuses_new_ones() -> None:
    engine = SlowEngine(step_s=0.02)
    app = build_app(engine)
    supervisor = app.state.supervisor

    async def scenario() -> None:
        stream, plain = await start_stream_and_plain(app, ("/v1/completions", {**BODY, "max_tokens": 25}),
                                                     ("/v1/chat/completions", {**CHAT, "max_tokens": 25}))
        assert supervisor.num_active == 2
        start = time.monotonic()
        drain = asyncio.create_task(supervisor.drain(10.0))
        await asyncio.sleep(0.05)
        # While draining: new generations and /health get 503; other routes still answer.
        status, headers, body = await asgi_request(app, "POST", "/v1/completions", BODY)
        assert status == 503 and headers["retry-after"] == "1"
        assert_openai_error(json.loads(body), "server_shutting_down")
        status, _, body = await asgi_request(app, "GET", "/health")
        assert status == 503 and json.loads(body)["error"]["code"] == "server_shutting_down"
        assert (await asgi_request(app, "GET", "/v1/models"))[0] == 200
        await asyncio.wait_for(drain, 5)
        assert time.monotonic() - start < 5  # it ended when the requests did, not after the grace period
        status, _, body = await stream
        events = stream_events(body.decode())
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "x" * 25
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        status, _, body = await plain
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "x" * 25

    asyncio.run(scenario())
    assert engine.aborted == [] and supervisor.num_active == 0


def test_drain_aborts_what_outlives_the_grace_period() -> None:
    engine = SlowEngine(step_s=0.05)
    app = build_app(engine)
    supervisor = app.state.supervisor

    async def scenario() -> None:
        stream, plain = await start_stream_and_plain(app, ("/v1/chat/completions", {**CHAT, "max_tokens": 40}),
                                                     ("/v1/completions", {**BODY, "max_tokens": 40}))
        start = time.monotonic()
        await asyncio.wait_for(supervisor.drain(0.3), 5)
        assert 0.3 <= time.monotonic() - start < 2
        status, _, body = await stream
        events = stream_events(body.decode())
        assert status == 200 and events[-3]["choices"][0]["finish_reason"] == "abort"
        assert_openai_error(events[-2], "server_shutting_down")
        status, headers, body = await plain
        assert status == 503 and headers["retry-after"] == "1"
        assert_openai_error(json.loads(body), "server_shutting_down")

    asyncio.run(scenario())
    assert len(engine.aborted) == 2 and supervisor.num_active == 0
