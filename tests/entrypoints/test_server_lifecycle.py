"""The real server's lifecycle on the bundled SmolLM2-135M-Instruct: SIGTERM with
requests in flight (drained within the grace period; aborted after it) and the
per-request timeout. The contract is in :mod:`ember.entrypoints.openai.supervisor`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.entrypoints.server_process import MODEL, ServerProcess, launch_server

pytestmark = pytest.mark.serial

# NOTE: one OpenMP thread: on a small shared machine the spin-waiting workers of a
# second thread make every step several times slower when the cores are busy.
SERVER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLIENT_TIMEOUT_S = 120


@dataclass
class StreamResult:
    """What a client read from one SSE stream (or the error answer instead)."""

    status: int = 0
    chunks: list[dict] = field(default_factory=list)  # the JSON events other than errors
    errors: list[dict] = field(default_factory=list)  # in-band ``{"error": ...}`` events
    done: bool = False  # ``data: [DONE]`` was received
    body: dict | None = None  # the JSON body of a non-200 answer
    headers: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        parts = []
        for c in self.chunks:
            for choice in c["choices"]:
                parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
        return "".join(parts)

    @property
    def finish_reason(self) -> str | None:
        reasons = [ch["finish_reason"] for c in self.chunks for ch in c["choices"] if ch.get("finish_reason")]
        assert len(reasons) <= 1, reasons  # one choice: one finish reason, in the last chunk
        return reasons[-1] if reasons else None

    @property
    def usage(self) -> dict | None:
        return next((c["usage"] for c in self.chunks if c.get("usage")), None)


def stream(client: httpx.Client, url: str, body: dict, result: StreamResult,
           first_chunk: threading.Event | None = None, max_chunks: int | None = None) -> StreamResult:
    """POST ``body`` with ``stream: true`` and read the SSE events into ``result``;
    stop reading (disconnect) after ``max_chunks`` chunks if given."""
    with client.stream("POST", url, json={**body, "stream": True}) as resp:
        result.status = resp.status_code
        result.headers = dict(resp.headers)
        if resp.status_code != 200:
            result.body = json.loads(resp.read())
            return result
        for line in resp.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                result.done = True
                break
            event = json.loads(data)
            (result.errors if "error" in event else result.chunks).append(event)
            if first_chunk is not None:
                first_chunk.set()
            if max_chunks is not None and len(result.chunks) >= max_chunks:
                break
    return result


def assert_openai_error(body: dict, code: str) -> dict:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, body
    assert isinstance(err["message"], str) and err["message"]
    return err


def scrape_metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if not s.labels.get("finished_reason"):
                out[s.name] = s.value
    return out


def wait_until_idle(url: str, timeout_s: float = 10) -> dict[str, float]:
    """Poll ``/metrics`` until nothing runs or waits and no KV block is in use."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape_metrics(url)
        if (m["ember:num_requests_running"], m["ember:num_requests_waiting"], m["ember:kv_cache_usage_perc"]) \
                == (0, 0, 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def wait_exit(server: ServerProcess, timeout_s: float = 60) -> int:
    try:
        return server.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ember serve still running {timeout_s} s after SIGTERM:\n{server.log_tail()}")


def start_in_flight(server: ServerProcess, url: str, stream_bodies: list[dict], plain_body: dict
                    ) -> tuple[list[StreamResult], dict, list[threading.Thread]]:
    """POST each of ``stream_bodies`` as a stream and ``plain_body`` without
    streaming, each in its own thread; return once every stream has its first
    chunk. Returns the stream results, the plain response (``status``, ``body``,
    filled when it arrives) and the threads to join."""
    results = [StreamResult() for _ in stream_bodies]
    firsts = [threading.Event() for _ in stream_bodies]
    plain: dict = {}

    def run_stream(i: int) -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as c:
            stream(c, url, stream_bodies[i], results[i], firsts[i])

    def run_plain() -> None:
        resp = httpx.post(url, json=plain_body, timeout=CLIENT_TIMEOUT_S)
        plain.update(status=resp.status_code, body=resp.json())

    threads = [threading.Thread(target=run_stream, args=(i,)) for i in range(len(stream_bodies))]
    threads.append(threading.Thread(target=run_plain))
    for t in threads:
        t.start()
    for first in firsts:
        assert first.wait(CLIENT_TIMEOUT_S), server.log_tail()
    return results, plain, threads


PROMPTS = ["The three primary colors are", "def fibonacci(n):"]
DRAIN_TOKENS = 48


def test_sigterm_drains_running_requests_then_exits_0() -> None:
    with launch_server("--max-model-len", "256", "--kv-cache-memory", "128M", "--shutdown-timeout", "300",
                       env=SERVER_ENV) as server:
        completions = f"{server.url}/v1/completions"
        base = {"model": MODEL, "max_tokens": DRAIN_TOKENS, "temperature": 0, "ignore_eos": True}
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            # Each request alone first: what the drained ones must still return in full.
            expected = [client.post(completions, json={**base, "prompt": p}).json()["choices"][0]["text"]
                        for p in PROMPTS]
        results, plain, threads = start_in_flight(
            server, completions,
            [{**base, "prompt": PROMPTS[i % 2], "stream_options": {"include_usage": True}} for i in range(3)],
            {**base, "prompt": PROMPTS[1]})
        server.proc.send_signal(signal.SIGTERM)
        # While it drains: health and new generations get 503 (the socket stays open).
        time.sleep(0.3)
        health = httpx.get(f"{server.url}/health", timeout=30)
        refused = httpx.post(completions, json={**base, "prompt": "hi"}, timeout=30)
        rc = wait_exit(server)
        for t in threads:
            t.join(CLIENT_TIMEOUT_S)
        log = server.log_tail(20000)
    assert rc == 0, log
    assert health.status_code == 503 and health.json()["error"]["code"] == "server_shutting_down"
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert_openai_error(refused.json(), "server_shutting_down")
    for i, r in enumerate(results):  # finished in full, as if nothing had happened
        assert r.status == 200 and r.done and not r.errors, r
        assert r.finish_reason == "length" and r.usage["completion_tokens"] == DRAIN_TOKENS
        assert r.text == expected[i % 2]
    assert plain["status"] == 200 and plain["body"]["choices"][0]["text"] == expected[1]
    assert "Shutting down: waiting up to 300 s for 4 running requests" in log
    assert "aborting" not in log


LONG_TOKENS = 1900  # tens of seconds even on a fast CPU: these requests outlive any limit below
REQUEST_TIMEOUT_S = 8
GRACE_S = 0.5


@pytest.fixture(scope="module")
def short_fuse() -> ServerProcess:
    """A server with a per-request timeout and a tiny shutdown grace period; the last
    test here stops it with SIGTERM and checks the exit status itself."""
    with launch_server("--max-model-len", "2048", "--kv-cache-memory", "384M",
                       "--request-timeout", str(REQUEST_TIMEOUT_S), "--shutdown-timeout", str(GRACE_S),
                       env=SERVER_ENV, check_exit=False) as server:
        yield server


def test_request_timeout(short_fuse: ServerProcess) -> None:
    url = short_fuse.url
    long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": LONG_TOKENS, "temperature": 0,
            "ignore_eos": True}
    out: dict = {}
    streamed = StreamResult()

    def run_plain() -> None:
        start = time.monotonic()
        resp = httpx.post(f"{url}/v1/completions", json=long, timeout=CLIENT_TIMEOUT_S)
        out.update(status=resp.status_code, body=resp.json(), elapsed=time.monotonic() - start)

    def run_stream() -> None:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": LONG_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as c:
            stream(c, f"{url}/v1/chat/completions", chat, streamed)

    threads = [threading.Thread(target=run_plain), threading.Thread(target=run_stream)]
    for t in threads:
        t.start()
    # A short request meanwhile finishes normally.
    short = httpx.post(f"{url}/v1/completions", json={**long, "max_tokens": 4}, timeout=CLIENT_TIMEOUT_S)
    for t in threads:
        t.join(CLIENT_TIMEOUT_S)
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 4
    # Non-streaming: 504 with an OpenAI error body, about when the limit passed.
    assert out["status"] == 504, out
    err = assert_openai_error(out["body"], "request_timeout")
    assert err["type"] == "server_error" and f"{REQUEST_TIMEOUT_S} s" in err["message"]
    assert REQUEST_TIMEOUT_S <= out["elapsed"] < REQUEST_TIMEOUT_S + 20
    # Streaming: the stream ends with finish_reason "abort", the usage so far, an error event and [DONE].
    assert streamed.status == 200 and streamed.done, streamed
    assert streamed.finish_reason == "abort"
    assert [e["error"]["code"] for e in streamed.errors] == ["request_timeout"]
    assert 0 < streamed.usage["completion_tokens"] < LONG_TOKENS
    # The aborted requests' KV blocks are free again and nothing is left running.
    m = wait_until_idle(url)
    assert (m["ember:num_requests_running"], m["ember:kv_cache_usage_perc"]) == (0, 0), m
    assert httpx.get(f"{url}/health").status_code == 200


def test_sigterm_aborts_what_outlives_the_grace_period(short_fuse: ServerProcess) -> None:
    url = short_fuse.url
    long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": LONG_TOKENS, "temperature": 0,
            "ignore_eos": True}
    results, plain, threads = start_in_flight(short_fuse, f"{url}/v1/completions", [long, long], long)
    start = time.monotonic()
    short_fuse.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(CLIENT_TIMEOUT_S)
    ended_after = time.monotonic() - start
    rc = wait_exit(short_fuse)
    log = short_fuse.log_tail(20000)
    assert rc == 0, log
    assert ended_after < GRACE_S + 10  # aborted after the grace period, not run to the end
    for r in results:
        assert r.status == 200 and r.done, r
        assert r.finish_reason == "abort" and 0 < len(r.text)
        assert [e["error"]["code"] for e in r.errors] == ["server_shutting_down"]
    assert plain["status"] == 503, plain
    assert_openai_error(plain["body"], "server_shutting_down")
    assert "aborting 3 requests still running after the 0.5 s grace period" in log


def test_listening_socket_disables_nagle_for_its_connections() -> None:
    """Streamed tokens are small writes; with Nagle's algorithm on, each waits for
    the client's (possibly delayed, up to 40 ms) ACK of the previous one."""
    import socket

    from ember.entrypoints.openai.api_server import _bind_socket

    server = _bind_socket("127.0.0.1", 0)
    try:
        server.listen(1)
        client = socket.create_connection(server.getsockname()[:2])
        conn, _ = server.accept()
        try:
            assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # inherited on accept
        finally:
            conn.close()
            client.close()
    finally:
        server.close()
