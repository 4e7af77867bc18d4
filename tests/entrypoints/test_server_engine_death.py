"""The engine core process dying under a running server (``kill -9``): the
stream in flight ends with an error instead of hanging, a non-streaming request
in flight gets 503 (code ``engine_dead``), ``/health`` turns 503, new requests
get 503 with an OpenAI error body, and SIGTERM still stops the server."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx

from tests.entrypoints.server_process import MODEL, launch_server


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def test_engine_core_death() -> None:
    with launch_server("--max-model-len", "256", check_exit=False) as srv:
        cores = _children(srv.proc.pid)
        assert len(cores) >= 1, "the engine core should run in a child process"
        events: list[str] = []
        started = threading.Event()
        done = threading.Event()

        def stream() -> None:
            body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True,
                    "temperature": 0, "stream": True}
            try:
                with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as resp:
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            started.set()
            except httpx.HTTPError as e:  # a cut connection is an acceptable ending too
                events.append(f"transport error: {e}")
            finally:
                started.set()
                done.set()

        plain: list[httpx.Response] = []

        def non_streaming() -> None:
            body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 200, "ignore_eos": True}
            plain.append(httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60))

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        assert started.wait(60), "the stream did not start"
        waiter = threading.Thread(target=non_streaming, daemon=True)
        waiter.start()
        time.sleep(0.5)
        for pid in cores:
            os.kill(pid, signal.SIGKILL)
        assert done.wait(30), "the stream hung after the engine core died"
        waiter.join(30)
        assert plain and plain[0].status_code == 503, plain and plain[0].text
        assert plain[0].json()["error"]["code"] == "engine_dead"
        tail = [e for e in events if e != "[DONE]"][-1]
        assert "error" in tail, f"the stream should end with an error, got {tail!r}"

        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/health did not turn 503"
            time.sleep(0.2)
        resp = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                          timeout=10)
        assert resp.status_code == 503, resp.text
        assert set(resp.json()["error"]) >= {"message", "type", "param", "code"}
        json.loads(resp.text)
    assert srv.proc.returncode is not None, "the server did not stop on SIGTERM"
