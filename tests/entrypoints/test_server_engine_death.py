"""The engine core process dying under a running server (``kill -9``), idle and
under open-loop traffic, five times each: ``/health`` turns 503 (code
``engine_dead``) within 1 s, every request in flight ends with an error naming
the cause within 2 s (a non-streaming one with a 5xx body, a stream with an
error event and then ``data: [DONE]``), new requests get 503 within 2 s of
being sent (or of the death, if later), no request hangs,
and the server exits with a non-zero status on its own within the documented
time, or at once on SIGTERM, leaving no process behind.

NOTE: the 1 s and 2 s run from the core's death, the moment the kernel has
closed its files (when its sockets drop and its sentinel fires: nothing outside
the process can notice it earlier). ``kill -9`` first makes the kernel tear down
the process's memory, which on an overloaded machine takes a good part of a
second for a process holding a model; that part is bounded separately.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from ember.entrypoints.openai.api_server import ENGINE_DEAD_EXIT_DELAY_S
from tests.entrypoints.server_process import MODEL, ServerProcess, launch_server

pytestmark = pytest.mark.serial

RUNS = 5
SERVER_ARGS = ("--max-model-len", "256", "--kv-cache-memory", "64M")
HEALTH_WITHIN_S = 1.0
IN_FLIGHT_END_WITHIN_S = 2.0
# A new request's 503, from when it was sent or the core died, whichever is later.
# Typically under 0.3 s on a 2-core machine; 1.3 s was seen once there under load.
NEW_REQUEST_503_WITHIN_S = 2.0
# From the SIGKILL to the core's death (the kernel tearing it down), at most.
TEARDOWN_WITHIN_S = 2.0
# Documented: the server exits ENGINE_DEAD_EXIT_DELAY_S after the death, then closes
# (no grace period; requests have already ended). Slack for a busy test machine.
EXIT_WITHIN_S = ENGINE_DEAD_EXIT_DELAY_S + 8.0
SIGTERM_EXIT_WITHIN_S = 8.0
ARRIVAL_INTERVAL_S = 0.05  # open-loop arrivals: 20 new requests per second
# A client-side read timeout: a request silent this long counts as hung.
HANG_S = 10.0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is gone for our purposes
    except OSError:
        return False


def _engine_core_pid(server_pid: int) -> int:
    cores = []
    for pid in _children(server_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():  # multiprocessing's spawned child (not its resource tracker)
                cores.append(pid)
    assert len(cores) == 1, f"expected one engine core process among {_children(server_pid)}"
    return cores[0]


class CoreKill:
    """SIGKILL the engine core process; :meth:`died_at` is when the kernel had
    finished it off (its files closed), seen by a thread polling ``/proc``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._died: list[float] = []
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        self.killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)

    def _watch(self) -> None:
        while _alive(self.pid) and os.path.exists(f"/proc/{self.pid}/fd/0"):
            time.sleep(0.001)
        self._died.append(time.monotonic())

    def died_at(self) -> float:
        self._watcher.join(30)
        assert self._died, "the engine core survived SIGKILL"
        assert self._died[0] - self.killed_at <= TEARDOWN_WITHIN_S, \
            f"the kernel took {self._died[0] - self.killed_at:.2f} s to end the core"
        return self._died[0]


def _assert_engine_dead(body: dict, what: str) -> None:
    error = body.get("error")
    assert isinstance(error, dict), f"{what}: no error body: {body}"
    assert set(error) >= {"message", "type", "param", "code"}, f"{what}: {error}"
    assert error["code"] == "engine_dead", f"{what}: {error}"
    assert "SIGKILL" in error["message"], f"{what}: the cause is not named: {error}"


@dataclass
class Outcome:
    """One client request as the client saw it (``time.monotonic`` seconds)."""

    stream: bool
    start: float
    end: float | None = None
    status: int | None = None
    completed: bool = False  # a full, normal answer
    error: dict | None = None  # the error body (or the stream's error event)
    done_after_error: bool = False  # a stream's [DONE] came after its error event
    transport_error: str | None = None
    hung: bool = False
    events: list[str] = field(default_factory=list)


async def _plain(client: httpx.AsyncClient, url: str, outcomes: list[Outcome]) -> None:
    o = Outcome(False, time.monotonic())
    outcomes.append(o)
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    try:
        resp = await client.post(f"{url}/v1/completions", json=body)
        o.status = resp.status_code
        if resp.status_code == 200:
            o.completed = resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            o.error = resp.json()
    except httpx.TimeoutException:
        o.hung = True
    except httpx.TransportError as e:
        o.transport_error = repr(e)
    o.end = time.monotonic()


async def _stream(client: httpx.AsyncClient, url: str, outcomes: list[Outcome], started: asyncio.Event) -> None:
    o = Outcome(True, time.monotonic())
    outcomes.append(o)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True,
            "temperature": 0, "stream": True}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            o.status = resp.status_code
            if resp.status_code != 200:
                o.error = json.loads(await resp.aread())
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    o.events.append(data)
                    started.set()
                    if data == "[DONE]":
                        o.done_after_error = o.error is not None
                        break
                    event = json.loads(data)
                    if "error" in event:
                        o.error = event
                    elif event["choices"][0]["finish_reason"] in ("stop", "length"):
                        o.completed = True
    except httpx.TimeoutException:
        o.hung = True
    except httpx.TransportError as e:
        o.transport_error = repr(e)
    finally:
        started.set()
    o.end = time.monotonic()


async def _health_503(client: httpx.AsyncClient, url: str) -> tuple[float, dict]:
    """Poll ``/health`` every 20 ms; when it answers 503: (that time, its body)."""
    while True:
        try:
            resp = await client.get(f"{url}/health", timeout=2)
            if resp.status_code == 503:
                return time.monotonic(), resp.json()
            assert resp.status_code == 200, resp.text
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.02)


def _wait_for_exit(srv: ServerProcess, t_death: float, sigterm_at: float | None) -> None:
    """The server exits with a non-zero status in time (on its own, or after SIGTERM
    at ``sigterm_at``), and no process it started outlives it."""
    processes = _descendants(srv.proc.pid)
    if sigterm_at is not None:
        srv.proc.send_signal(signal.SIGTERM)
        limit, what = sigterm_at + SIGTERM_EXIT_WITHIN_S, "after SIGTERM"
    else:
        limit, what = t_death + EXIT_WITHIN_S, "on its own"
    try:
        rc = srv.proc.wait(timeout=max(0.1, limit - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit {what} within the documented time:\n{srv.log_tail()}")
    assert rc != 0, f"the server exited with 0 after its engine died:\n{srv.log_tail()}"
    assert "SIGKILL" in srv.log_tail(), "the exit message should name the cause"
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in processes):
        assert time.monotonic() < deadline, f"processes outlived the server: {[p for p in processes if _alive(p)]}"
        time.sleep(0.1)


@pytest.mark.parametrize("run", range(RUNS))
def test_core_killed_while_idle(run: int) -> None:
    with launch_server(*SERVER_ARGS, check_exit=False) as srv:
        core = _engine_core_pid(srv.proc.pid)

        async def main() -> tuple[float, float]:
            async with httpx.AsyncClient(timeout=HANG_S) as client:
                kill = CoreKill(core)
                t_503, body = await _health_503(client, srv.url)
                t_death = kill.died_at()
                assert t_503 - t_death <= HEALTH_WITHIN_S, f"/health turned 503 {t_503 - t_death:.2f} s after the death"
                _assert_engine_dead(body, "/health")
                for stream in (False, True):
                    resp = await client.post(f"{srv.url}/v1/completions", json={
                        "model": MODEL, "prompt": "Hi", "max_tokens": 2, "stream": stream})
                    assert resp.status_code == 503, resp.text
                    assert resp.headers.get("retry-after"), "503 should carry Retry-After"
                    _assert_engine_dead(resp.json(), f"a new request (stream={stream})")
                return t_death

        t_death = asyncio.run(main())
        _wait_for_exit(srv, t_death, time.monotonic() if run % 2 else None)


@pytest.mark.parametrize("run", range(RUNS))
def test_core_killed_under_open_loop_traffic(run: int) -> None:
    with launch_server(*SERVER_ARGS, check_exit=False) as srv:
        core = _engine_core_pid(srv.proc.pid)
        outcomes: list[Outcome] = []

        async def main() -> tuple[float, float]:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            async with httpx.AsyncClient(timeout=HANG_S, limits=limits) as client:
                tasks: set[asyncio.Task] = set()
                starts = [asyncio.Event() for _ in range(3)]
                tasks |= {asyncio.create_task(_stream(client, srv.url, outcomes, s)) for s in starts}
                for s in starts:
                    await asyncio.wait_for(s.wait(), 60)
                assert all(o.events for o in outcomes), f"the streams should be under way: {outcomes}"

                stop_arrivals = asyncio.Event()

                async def arrivals() -> None:
                    # Open loop: a new, independent request every interval, whatever
                    # happened to the earlier ones.
                    while not stop_arrivals.is_set():
                        tasks.add(asyncio.create_task(_plain(client, srv.url, outcomes)))
                        await asyncio.sleep(ARRIVAL_INTERVAL_S)

                arriving = asyncio.create_task(arrivals())
                await asyncio.sleep(1.0 + 0.1 * run)
                kill = CoreKill(core)
                t_503, body = await _health_503(client, srv.url)
                await asyncio.sleep(max(0.0, kill.killed_at + 1.5 - time.monotonic()))
                stop_arrivals.set()
                await arriving
                _, pending = await asyncio.wait(tasks, timeout=HANG_S + 5)
                assert not pending, f"{len(pending)} requests still running long after the engine died"
                t_death = kill.died_at()
                assert t_503 - t_death <= HEALTH_WITHIN_S, f"/health turned 503 {t_503 - t_death:.2f} s after the death"
                _assert_engine_dead(body, "/health")
                return kill.killed_at, t_death

        t_kill, t_death = asyncio.run(main())
        hung = [o for o in outcomes if o.hung]
        assert not hung, f"{len(hung)} of {len(outcomes)} requests hung"
        in_flight = [o for o in outcomes if o.start < t_kill and o.end is not None and o.end > t_kill]
        after = [o for o in outcomes if o.start >= t_kill]
        assert sum(o.stream for o in in_flight) == 3 and len(in_flight) > 3, \
            f"the test should catch requests in flight: {len(in_flight)}"
        assert len(after) >= 10, f"requests should keep arriving after the kill: {len(after)}"
        for o in in_flight:
            what = f"a {'stream' if o.stream else 'request'} in flight ({o.status}, {o.events[-3:]})"
            assert o.transport_error is None, f"{what}: cut without an answer: {o.transport_error}"
            if o.completed and o.error is None:
                continue  # its last outputs had left the engine before it died: a full answer
            assert o.end - t_death <= IN_FLIGHT_END_WITHIN_S, f"{what}: ended {o.end - t_death:.2f} s after the death"
            assert o.error is not None, f"{what}: ended without an error"
            _assert_engine_dead(o.error, what)
            if o.stream and o.status == 200:
                assert o.done_after_error and o.events[-1] == "[DONE]" and "error" in json.loads(o.events[-2]), \
                    f"{what}: the error event should come just before [DONE]"
            else:
                assert o.status is not None and o.status >= 500, what
        for o in after:
            what = f"a request sent {o.start - t_kill:.2f} s after the kill ({o.status})"
            if o.transport_error is not None:
                continue  # the server had exited: refused, as an orchestrator restarts it
            assert not o.completed, f"{what} was served by a dead engine"
            assert o.status == 503, what
            _assert_engine_dead(o.error, what)
            waited = o.end - max(o.start, t_death)
            assert waited <= NEW_REQUEST_503_WITHIN_S, (
                f"{what}: answered {waited:.2f} s after it was sent or the engine died "
                f"({t_death - t_kill:.2f} s after the kill):\n{srv.log_tail()}")
        _wait_for_exit(srv, t_death, time.monotonic() if run % 2 else None)
