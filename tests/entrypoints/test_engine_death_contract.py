"""What clients see when the engine core dies, against a fake engine (fast, no
model; the real server with a real core killed by SIGKILL is tested in
test_server_engine_death.py): 503 with code ``engine_dead`` naming the cause on
``/health``, on new requests and on a non-streaming request in flight; a stream
in flight ends with ``finish_reason: "abort"`` for every unfinished choice, the
``engine_dead`` error event and ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from ember.engine.core_client import EngineDeadError
from ember.entrypoints.openai.api_server import build_app
from ember.entrypoints.openai.supervisor import RequestSupervisor
from tests.entrypoints.test_protocol import MODEL, EchoEngine, assert_error

CAUSE = "the engine core process was killed by signal SIGKILL"


class DyingEngine(EchoEngine):
    """Echoes like :class:`EchoEngine`, then the core dies after ``steps`` steps
    of the request: as ``AsyncLLM`` does, every request in flight then fails with
    :class:`EngineDeadError` and ``errored`` / ``dead_error`` are set."""

    def __init__(self, steps: int) -> None:
        super().__init__(fail_after=steps, step_delay=0.001)
        self.dead_error: EngineDeadError | None = None

    async def generate(self, prompt, sampling_params, request_id, **kwargs):
        if self.errored:
            raise self.dead_error
        inner = super().generate(prompt, sampling_params, request_id, **kwargs)
        try:
            async for out in inner:
                yield out
        except RuntimeError as e:
            assert str(e) == "engine died mid-stream"
            self.errored, self.dead_error = True, EngineDeadError(CAUSE)
            raise self.dead_error from None
        finally:
            await inner.aclose()


def _assert_engine_dead(err: dict) -> None:
    assert err["code"] == "engine_dead" and err["type"] == "server_error", err
    assert CAUSE in err["message"], err


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("n", [1, 2])
def test_stream_in_flight_ends_with_abort_error_event_and_done(route: str, n: int) -> None:
    client = TestClient(build_app(DyingEngine(steps=3)), raise_server_exceptions=False)
    body = {"model": MODEL, "max_tokens": 20, "n": n, "stream": True}
    body |= {"prompt": "abcdefghij"} if route == "/v1/completions" else {
        "messages": [{"role": "user", "content": "abcdefghij"}]}
    with client.stream("POST", route, json=body) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    _assert_engine_dead(json.loads(events[-2])["error"])
    finish = {}
    for event in events[:-2]:
        for choice in json.loads(event)["choices"]:
            if choice.get("finish_reason") is not None:
                finish[choice["index"]] = choice["finish_reason"]
    assert finish == {i: "abort" for i in range(n)}, events


def test_non_streaming_request_in_flight_gets_503() -> None:
    client = TestClient(build_app(DyingEngine(steps=2)), raise_server_exceptions=False)
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "abcdefghij", "max_tokens": 20})
    _assert_engine_dead(assert_error(resp, 503))
    assert resp.headers["Retry-After"]


def test_after_death_health_and_new_requests_get_503_naming_the_cause() -> None:
    engine = DyingEngine(steps=0)
    client = TestClient(build_app(engine), raise_server_exceptions=False)
    assert client.get("/health").status_code == 200
    _assert_engine_dead(assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "ab"}), 503))
    for resp in (client.get("/health"),
                 client.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "stream": True}),
                 client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
                     {"role": "user", "content": "ab"}]})):
        _assert_engine_dead(assert_error(resp, 503))
        assert resp.headers["Retry-After"]
    assert client.head("/health").status_code == 503


def test_drain_gives_no_grace_period_once_the_engine_is_dead() -> None:
    async def main() -> float:
        engine = DyingEngine(steps=0)
        engine.errored, engine.dead_error = True, EngineDeadError(CAUSE)
        supervisor = RequestSupervisor(engine)
        supervisor.num_active = 1  # a request that can never finish now
        loop = asyncio.get_running_loop()
        start = loop.time()
        drain = asyncio.ensure_future(supervisor.drain(grace_s=30))
        await asyncio.sleep(0.2)
        supervisor.num_active = 0  # its error end was sent once it was aborted
        await asyncio.wait_for(drain, 5)
        return loop.time() - start

    assert asyncio.run(main()) < 2
