"""Connection hygiene of the HTTP server: header-read and keep-alive timeouts, the
connection cap that evicts connections not in a request, ``--limit-concurrency``,
rate-limited logging, and the real server (bundled model) with its open-file limit
at 256 against 400 slow connections."""

from __future__ import annotations

import contextlib
import logging
import resource
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from ember.entrypoints.openai.api_server import build_app, make_server
from ember.entrypoints.openai.connections import RateLimitFilter
from tests.entrypoints.server_process import launch_server
from tests.entrypoints.test_protocol import MODEL, EchoEngine
from tests.entrypoints.test_server_limits import assert_openai_error

pytestmark = pytest.mark.serial

SLOW_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n"  # a request head that never ends


@contextlib.contextmanager
def guarded_server(app, **options) -> Iterator[tuple[str, object]]:
    """Run ``app`` with Ember's server stack (:func:`make_server`) in a thread; yield
    (base URL, the server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, "warning", 1.0, **options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(15)


def closed_by_server(s: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closes ``s`` (None: still open after ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        ready, _, _ = select.select([s], [], [], 0.05)
        if ready:
            try:
                if s.recv(4096) == b"":
                    return time.monotonic() - start
            except (ConnectionResetError, BrokenPipeError):
                return time.monotonic() - start
    return None


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def test_header_read_and_keep_alive_timeouts() -> None:
    with guarded_server(build_app(EchoEngine()), timeout_header_read=0.6, timeout_keep_alive=0.4) as (url, _):
        connected = time.monotonic()
        silent, slow = connect(url), connect(url)
        slow.sendall(SLOW_HEAD)
        # The slow client keeps sending bytes, but never a whole head in time.
        for _ in range(3):
            time.sleep(0.15)
            slow.sendall(b"X-Pad: 1\r\n")
        assert closed_by_server(silent, 3) is not None
        assert 0.5 < time.monotonic() - connected < 1.5
        assert closed_by_server(slow, 1) is not None and time.monotonic() - connected < 1.5
        # A kept-alive connection serves its request, then closes when idle.
        kept = connect(url)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        assert (t := closed_by_server(kept, 3)) is not None and t < 1.0, t
        # A second request on a kept-alive connection gets its own head deadline.
        kept = connect(url)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\n")
        assert (t := closed_by_server(kept, 3)) is not None and 0.4 < t < 1.5, t
        # Whole requests are unaffected.
        with httpx.Client(base_url=url) as client:
            for _ in range(3):
                assert client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
                                   ).status_code == 200
                time.sleep(0.2)  # within the keep-alive timeout: the same connection


def test_at_the_cap_the_oldest_waiting_connection_makes_room() -> None:
    engine = EchoEngine(step_delay=0.05)
    with guarded_server(build_app(engine), max_connections=6, timeout_header_read=30) as (url, server):
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 20, "stream": True}
        with httpx.Client(base_url=url, timeout=10) as busy:
            with busy.stream("POST", "/v1/completions", json=body) as stream:  # in a request: never evicted
                slow = [connect(url) for _ in range(10)]
                for s in slow:
                    s.sendall(SLOW_HEAD)
                time.sleep(0.3)
                start = time.monotonic()
                assert httpx.get(f"{url}/health", timeout=5).status_code == 200
                assert time.monotonic() - start < 1.0
                text = "".join(line for line in stream.iter_lines())
        assert "[DONE]" in text  # the stream went on to its end
        assert server.guard.num_evicted >= 5
        assert server.guard.num_open <= 6
        # The oldest slow connections were the ones closed.
        assert closed_by_server(slow[0], 1) is not None and closed_by_server(slow[-1], 0.2) is None
        for s in slow:
            s.close()


def test_limit_concurrency_answers_503() -> None:
    engine = EchoEngine(step_delay=0.06)
    with guarded_server(build_app(engine, limit_concurrency=1)) as (url, _):
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 50, "stream": True}  # 3 s
        with httpx.Client(base_url=url, timeout=10) as client:
            with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()  # NOTE: kept: closing it would read the stream to its end
                next(lines)
                resp = httpx.post(f"{url}/v1/completions", json={**body, "stream": False})
                err = assert_openai_error(resp, 503, "too_many_requests")
                assert resp.headers["retry-after"] == "1" and "--limit-concurrency" in err["message"]
                assert httpx.get(f"{url}/health").status_code == 200  # probes are not counted
                assert "[DONE]" in "".join(lines)  # the stream went on
            assert client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2}).status_code == 200
    with pytest.raises(ValueError, match="limit_concurrency"):
        build_app(EchoEngine(), limit_concurrency=0)


def test_rate_limit_filter() -> None:
    now = [0.0]
    rate_limit = RateLimitFilter(burst=3, interval_s=10, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, None, None)

    passed = [rate_limit.filter(record("accept failed")) for _ in range(100)]
    assert passed == [True] * 3 + [False] * 97
    assert rate_limit.filter(record("another message"))  # each message has its own budget
    now[0] = 11.0
    again = record("accept failed")
    assert rate_limit.filter(again) and "97 more like this were not logged" in again.getMessage()


# ---------------------------------------------------------------- the real server, few file descriptors


NUM_SLOW = 400
FD_LIMIT = 256


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_slow_connections_do_not_keep_a_normal_client_out() -> None:
    from tests.entrypoints.test_server_lifecycle import SERVER_ENV

    with launch_server("--max-model-len", "256", "--kv-cache-memory", "64M", env=SERVER_ENV,
                       preexec_fn=_low_fd_limit) as srv:
        stop = threading.Event()
        opened = [0]

        def attack() -> None:
            """NUM_SLOW connections that send their head a few bytes at a time, and
            come back when the server closes them."""
            conns: list[socket.socket | None] = [None] * NUM_SLOW
            while not stop.is_set():
                for i in range(NUM_SLOW):
                    s = conns[i]
                    if s is None:
                        s = socket.socket()
                        s.setblocking(False)
                        s.connect_ex(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])))
                        conns[i] = s
                        opened[0] += 1
                        continue
                    try:
                        s.send(b"X")
                    except OSError:  # closed by the server (or not connected yet)
                        s.close()
                        conns[i] = None
                time.sleep(0.2)
            for s in conns:
                if s is not None:
                    s.close()

        def latencies() -> tuple[list[float], list[float]]:
            """Seconds to answer /health and a one-token completion, 5 times each."""
            health, completion = [], []
            with httpx.Client(timeout=10) as client:
                for _ in range(5):
                    client.headers["Connection"] = "close"  # a new connection each time, as a new client
                    start = time.monotonic()
                    assert client.get(f"{srv.url}/health").status_code == 200
                    health.append(time.monotonic() - start)
                    start = time.monotonic()
                    resp = client.post(f"{srv.url}/v1/completions",
                                       json={"prompt": "Hello", "max_tokens": 1, "temperature": 0})
                    completion.append(time.monotonic() - start)
                    assert resp.status_code == 200, resp.text
                    time.sleep(0.3)
            return health, completion

        _, baseline = latencies()
        log_before = len(srv.log_tail(1 << 30))
        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        try:
            time.sleep(2)
            health, completion = latencies()
        finally:
            stop.set()
            attacker.join(10)
        assert opened[0] >= NUM_SLOW
        # NOTE: a completion's own time (~0.5 s here on a loaded CPU) is not the attack's doing.
        assert max(health) < 1.0, health
        assert max(completion) < max(baseline) + 1.0, (completion, baseline)
        # The log stays small: a few lines per message and interval, not one per connection.
        assert len(srv.log_tail(1 << 30)) - log_before < 20_000, srv.log_tail()
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
