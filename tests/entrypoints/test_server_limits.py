"""The server against giant requests and careless or hostile clients, on fake
engines: the API key on every working route, the request body limit (413), the
prompt-length bound before tokenizing, large inputs tokenized off the event loop
(another client's stream keeps flowing), ``HEAD /health`` and 405's ``Allow``.
Some tests run a real uvicorn server in a thread, to see what a socket sees."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from ember.engine.input_processor import InputProcessor
from ember.entrypoints.cli import make_parser
from ember.entrypoints.openai.api_server import DEFAULT_MAX_REQUEST_BODY_BYTES, BodySizeLimitMiddleware, build_app
from ember.entrypoints.openai.input_limits import MAX_CHARS_PER_TOKEN, OFFLOAD_MIN_CHARS
from tests.entrypoints.test_protocol import MAX_MODEL_LEN, MODEL, CharTokenizer, EchoEngine

pytestmark = pytest.mark.serial

BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    if code is not None:
        assert err["code"] == code, err
    return err


@contextlib.contextmanager
def uvicorn_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def raw_exchange(url: str, head: bytes, body_chunks: Iterator[bytes] | None = None, timeout: float = 5.0
                 ) -> tuple[bytes, int, float]:
    """Send an HTTP/1.1 request head, then body chunks until the server answers or
    closes; return (the answer's bytes, body bytes sent, seconds until the answer)."""
    host, port = url.removeprefix("http://").split(":")
    body_chunks = body_chunks if body_chunks is not None else iter(())
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        start = time.monotonic()
        s.sendall(head)
        sent = 0
        s.setblocking(False)
        answer = b""
        while time.monotonic() - start < timeout:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                data = None
            except ConnectionResetError:
                break
            if data == b"":  # closed
                break
            if data:
                answer += data
                continue
            if answer:  # the answer started and no more is pending: wait for the close
                time.sleep(0.01)
                continue
            chunk = next(body_chunks, None)
            if chunk is None:
                time.sleep(0.01)
                continue
            try:
                s.sendall(chunk)
            except BlockingIOError:
                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        return answer, sent, time.monotonic() - start


def parse_answer(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


# ---------------------------------------------------------------- API key


def test_api_key_guards_every_working_route() -> None:
    client = TestClient(build_app(EchoEngine(), api_key="s3cret"), raise_server_exceptions=False)
    key = {"Authorization": "Bearer s3cret"}
    for path, body in (("/tokenize", {"prompt": "abc"}), ("/detokenize", {"tokens": [97, 98]})):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            err = assert_openai_error(client.post(path, json=body, headers=headers), 401, "invalid_api_key")
            assert err["type"] == "authentication_error"
        assert client.post(path, json=body, headers=key).status_code == 200
    assert client.post("/tokenize", json={"prompt": "abc"}, headers=key).json()["count"] == 3
    for path in ("/health", "/metrics", "/version", "/openapi.json", "/docs"):  # probes and docs stay open
        assert client.get(path).status_code == 200, path
    assert client.head("/health").status_code == 200
    # The official client: a wrong key is its AuthenticationError; the right one works.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=client,
                      max_retries=0).models.list()
    models = openai.OpenAI(base_url="http://testserver/v1", api_key="s3cret", http_client=client,
                           max_retries=0).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_api_key_is_checked_before_the_body_size() -> None:
    client = TestClient(build_app(EchoEngine(), api_key="s3cret", max_request_body_bytes=16),
                        raise_server_exceptions=False)
    assert_openai_error(client.post("/tokenize", json={"prompt": "x" * 100}), 401, "invalid_api_key")
    assert_openai_error(client.post("/tokenize", json={"prompt": "x" * 100},
                                    headers={"Authorization": "Bearer s3cret"}), 413, "request_too_large")


# ---------------------------------------------------------------- request body limit


def test_body_over_the_limit_is_413_naming_the_limit() -> None:
    engine = EchoEngine()
    client = TestClient(build_app(engine, max_request_body_bytes=1000), raise_server_exceptions=False)
    resp = client.post("/v1/completions", json={**BODY, "prompt": "x" * 2000})
    err = assert_openai_error(resp, 413, "request_too_large")
    assert "1000 bytes" in err["message"] and "--max-request-body-bytes" in err["message"]
    assert resp.headers["connection"] == "close"
    assert engine.started == []
    assert client.post("/v1/completions", json={**BODY, "prompt": "x" * 20}).status_code == 200


def test_cli_flag_and_default() -> None:
    args = make_parser().parse_args(["serve"])
    assert args.max_request_body_bytes == DEFAULT_MAX_REQUEST_BODY_BYTES == 16 * 1024 * 1024
    assert make_parser().parse_args(["serve", "--max-request-body-bytes", "4096"]).max_request_body_bytes == 4096
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--max-request-body-bytes", "0"])
    with pytest.raises(ValueError, match="max_request_body_bytes"):
        build_app(EchoEngine(), max_request_body_bytes=0)


def _chunked_scope() -> dict:
    return {"type": "http", "method": "POST", "path": "/x",
            "headers": [(b"host", b"t"), (b"transfer-encoding", b"chunked")]}


def test_chunked_body_is_refused_as_soon_as_it_passes_the_limit() -> None:
    pulled: list[int] = []
    sent: list[dict] = []
    inner_called = []

    async def inner(scope, receive, send) -> None:
        inner_called.append(True)

    async def receive() -> dict:  # an endless chunked body, 30 bytes a chunk
        pulled.append(30)
        return {"type": "http.request", "body": b"x" * 30, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(BodySizeLimitMiddleware(inner, max_bytes=100)(_chunked_scope(), receive, send))
    assert len(pulled) == 4  # 120 bytes > 100: no chunk more was read
    assert not inner_called
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"


def test_chunked_body_within_the_limit_reaches_the_app_intact() -> None:
    parts = [b"ab", b"", b"cde", b"f"]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    seen: list[dict] = []

    async def inner(scope, receive, send) -> None:
        while True:
            message = await receive()
            seen.append(message)
            if message["type"] != "http.request" or not message["more_body"]:
                break
        seen.append(await receive())  # after the body: the client's own messages

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        raise AssertionError("nothing is sent")

    asyncio.run(BodySizeLimitMiddleware(inner, max_bytes=6)(_chunked_scope(), receive, send))
    assert b"".join(m.get("body", b"") for m in seen[:-1]) == b"abcdef"
    assert seen[-1] == {"type": "http.disconnect"}


def test_oversized_bodies_on_a_real_socket() -> None:
    limit = 1 << 20
    engine = EchoEngine()
    with uvicorn_server(build_app(engine, max_request_body_bytes=limit)) as url:
        # A declared length over the limit: answered before any of the body is sent.
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000000\r\n\r\n")
        answer, sent, seconds = raw_exchange(url, head)
        status, headers, body = parse_answer(answer)
        assert status == 413 and headers["connection"] == "close" and sent == 0 and seconds < 3
        assert json.loads(body)["error"]["code"] == "request_too_large" and str(limit) in body.decode()
        # A chunked body: answered once past the limit, while the client is still sending.
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        answer, sent, seconds = raw_exchange(url, head, iter([chunk] * 4096))  # up to 256 MiB
        status, headers, body = parse_answer(answer)
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
        assert sent < 64 * limit and seconds < 5  # far from the whole 256 MiB
        # The server keeps serving others.
        assert httpx.get(f"{url}/health").status_code == 200
        ok = httpx.post(f"{url}/v1/completions", json={**BODY, "prompt": "y" * 40})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
        # HEAD /health: 200, no body, on the wire too.
        answer, _, _ = raw_exchange(url, b"HEAD /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, _, body = parse_answer(answer)
        assert status == 200 and body == b""
    assert engine.started == [engine.started[-1]]  # only the good completion reached the engine


# ---------------------------------------------------------------- prompt length bound


def test_prompt_text_too_long_for_the_context_is_refused_before_tokenizing() -> None:
    engine = EchoEngine()
    calls = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda text, **kw: calls.append(len(text)) or encode(text, **kw)
    client = TestClient(build_app(engine), raise_server_exceptions=False)
    limit = MAX_MODEL_LEN * MAX_CHARS_PER_TOKEN
    long = "x" * (limit + 1)
    cases = [("/v1/completions", {**BODY, "prompt": long}, "prompt", "prompt"),
             ("/v1/completions", {**BODY, "prompt": ["ok", long]}, "prompt", "prompt[1]"),
             ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": long}]}, "messages",
              "messages"),
             ("/tokenize", {"prompt": long}, "prompt", "prompt"),
             ("/tokenize", {"messages": [{"role": "user", "content": long}]}, "messages", "messages")]
    for path, body, param, location in cases:
        err = assert_openai_error(client.post(path, json=body), 400, "context_length_exceeded")
        assert err["param"] == param, err
        assert err["message"].startswith(f"{location} is {limit + 1} characters long"), err
        assert f"{MAX_MODEL_LEN} tokens" in err["message"] and str(limit) in err["message"]
    assert calls == [len("ok")] and engine.started == []  # the long texts were refused unread
    # At the bound the text is tokenized (and then refused for its token count).
    err = assert_openai_error(client.post("/v1/completions", json={**BODY, "prompt": long[:-1]}), 400)
    assert "tokens long" in err["message"] and calls[-1] == limit


# ---------------------------------------------------------------- large inputs off the event loop


BUSY_S = 1.0  # CPU seconds the slow tokenizer spends on a large text
LARGE = 1 << 20  # characters from which it is slow


class SlowTokenizer(CharTokenizer):
    """CharTokenizer that spends BUSY_S seconds of CPU (holding the GIL between the
    interpreter's thread switches, like a pure-Python tokenizer or chat template)
    on a text of LARGE characters or more."""

    def __init__(self) -> None:
        self.slow_calls = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) >= LARGE:
            self.slow_calls += 1
            end = time.perf_counter() + BUSY_S
            while time.perf_counter() < end:
                pass
        return super().encode(text, add_special_tokens)


def test_large_prompts_do_not_stall_another_clients_stream() -> None:
    engine = EchoEngine(step_delay=0.05)
    # A context long enough that 2 MB prompts pass the character bound and get tokenized.
    engine.model_config = dataclasses.replace(engine.model_config, max_model_len=1 << 17)
    engine.tokenizer = SlowTokenizer()
    engine.input_processor = InputProcessor(engine.model_config, engine.tokenizer)
    assert 2 * LARGE < (1 << 17) * MAX_CHARS_PER_TOKEN < 6_000_000 and LARGE > OFFLOAD_MIN_CHARS
    big = "z" * (2 * LARGE)
    requests = {  # name: (path, body bytes), prebuilt so that the client threads only send
        "completion": ("/v1/completions", json.dumps({**BODY, "prompt": big}).encode()),
        "chat": ("/v1/chat/completions", json.dumps({**CHAT, "messages": [{"role": "user", "content": big}]}
                                                    ).encode()),
        "tokenize": ("/tokenize", json.dumps({"prompt": big}).encode()),
        "six_mb": ("/v1/completions", json.dumps({**BODY, "prompt": "w" * 6_000_000}).encode()),
    }
    arrivals: list[float] = []
    first_chunk = threading.Event()
    answers: dict[str, tuple[int, dict, float]] = {}

    with uvicorn_server(build_app(engine)) as url:
        def stream() -> None:
            body = {**BODY, "prompt": "hello", "max_tokens": 50, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        arrivals.append(time.monotonic())
                        first_chunk.set()

        def post(name: str) -> None:
            path, body = requests[name]
            resp = httpx.post(f"{url}{path}", content=body, headers={"Content-Type": "application/json"},
                              timeout=30)
            answers[name] = (resp.status_code, resp.json(), time.monotonic())

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert first_chunk.wait(10)
        posters = [threading.Thread(target=post, args=(name,)) for name in requests]
        for t in posters:
            t.start()
        for t in posters:
            t.join(30)
        streamer.join(30)

    assert engine.tokenizer.slow_calls == 3  # the three 2 MB inputs were tokenized (slowly)
    for name in ("completion", "chat"):  # tokenized, then refused for their token count
        status, body, _ = answers[name]
        assert status == 400 and "tokens long" in body["error"]["message"], (name, body)
    status, body, _ = answers["tokenize"]
    assert status == 200 and body["count"] == 2 * LARGE
    status, body, _ = answers["six_mb"]  # refused by its length alone
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    # The stream ran all along: it outlived the tokenizations, and no chunk waited long.
    assert len(arrivals) >= 50 and arrivals[-1] > max(answers[n][2] for n in ("completion", "chat", "tokenize"))
    # NOTE: the slow tokenizer holds the GIL, so the server's loop (and this process's
    # client threads) still wait for it at each thread switch: gaps of a few 0.1 s
    # happen on a loaded 2-core machine; run on the loop, tokenizing stalls it >= BUSY_S.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert max(gaps) < 0.5, f"the stream stalled for {max(gaps):.2f} s"


# ---------------------------------------------------------------- HEAD and 405


def test_head_health_and_405_allow() -> None:
    client = TestClient(build_app(EchoEngine()), raise_server_exceptions=False)
    head = client.head("/health")
    assert head.status_code == 200 and head.content == b""
    resp = client.get("/v1/completions")
    err = assert_openai_error(resp, 405)
    assert resp.headers["allow"] == "POST" and err["type"] == "invalid_request_error"
    resp = client.post("/health")
    assert_openai_error(resp, 405)
    assert resp.headers["allow"] == "GET, HEAD"
    assert client.delete("/tokenize").headers["allow"] == "POST"
