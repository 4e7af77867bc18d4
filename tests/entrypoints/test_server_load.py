"""The real server under load, on the bundled SmolLM2-135M-Instruct: 64 concurrent
streaming clients, a quarter of them disconnecting mid-stream, and a burst past
``--max-waiting-requests`` (429 + Retry-After)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from tests.entrypoints.server_process import MODEL, launch_server
from tests.entrypoints.test_server_lifecycle import (
    CLIENT_TIMEOUT_S,
    SERVER_ENV,
    StreamResult,
    assert_openai_error,
    wait_until_idle,
)

pytestmark = pytest.mark.serial

NUM_CLIENTS = 64
NUM_DISCONNECTS = NUM_CLIENTS // 4
MAX_TOKENS = 16
INPUTS = [
    ("/v1/completions", {"prompt": "The three primary colors are"}),
    ("/v1/completions", {"prompt": "def fibonacci(n):\n   "}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "You are terse."},
                                           {"role": "user", "content": "Name a large animal."}]}),
]
# Greedy, and seeded sampling (the noise depends on the seed and position only).
VARIANTS = [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.95, "seed": 7}]


def choice_text(body: dict) -> str:
    choice = body["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


async def read_stream(client: httpx.AsyncClient, url: str, body: dict,
                      disconnect_after: int | None = None) -> StreamResult:
    """Stream ``body``; with ``disconnect_after``, hang up after that many chunks
    (0: as soon as the response headers arrive)."""
    result = StreamResult()
    async with client.stream("POST", url, json={**body, "stream": True}) as resp:
        result.status = resp.status_code
        result.headers = dict(resp.headers)
        if resp.status_code != 200:
            result.body = json.loads(await resp.aread())
            return result
        if disconnect_after == 0:
            return result
        async for line in resp.aiter_lines():
            if not line:
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                result.done = True
                break
            event = json.loads(data)
            (result.errors if "error" in event else result.chunks).append(event)
            if disconnect_after is not None and len(result.chunks) >= disconnect_after:
                break  # leaving the block closes the connection mid-stream
    return result


@pytest.fixture(scope="module")
def server_url() -> str:
    with launch_server("--max-model-len", "256", "--kv-cache-memory", "256M", env=SERVER_ENV) as server:
        yield server.url


def test_concurrent_streams_with_disconnects(server_url: str) -> None:
    specs = [(path, {"model": MODEL, "max_tokens": MAX_TOKENS, **inp, **variant})
             for path, inp in INPUTS for variant in VARIANTS]
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        # Each request alone: what it must return in the crowd too.
        expected = [client.post(f"{server_url}{path}", json=body).json() for path, body in specs]
    rng = random.Random(2024)
    disconnects = {i: rng.randint(0, MAX_TOKENS // 2) for i in rng.sample(range(NUM_CLIENTS), NUM_DISCONNECTS)}

    async def crowd() -> list[StreamResult]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS, max_keepalive_connections=NUM_CLIENTS)
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
            runs = []
            for i in range(NUM_CLIENTS):
                path, body = specs[i % len(specs)]
                body = {**body, "stream_options": {"include_usage": True}}
                runs.append(read_stream(client, f"{server_url}{path}", body, disconnects.get(i)))
            return await asyncio.gather(*runs)

    start = time.monotonic()
    results = asyncio.run(crowd())
    elapsed = time.monotonic() - start
    for i, r in enumerate(results):
        assert r.status == 200, (i, r)
        if i in disconnects:
            continue
        want = expected[i % len(specs)]
        assert r.done and not r.errors, (i, r)
        assert r.finish_reason == want["choices"][0]["finish_reason"] and r.finish_reason in ("stop", "length")
        assert r.text == choice_text(want), (i, specs[i % len(specs)])
        assert r.usage == want["usage"]
    # Every request, finished or abandoned, has given its KV blocks back.
    m = wait_until_idle(server_url)
    assert (m["ember:num_requests_running"], m["ember:num_requests_waiting"], m["ember:kv_cache_usage_perc"]) \
        == (0, 0, 0), m
    # The blocks the abandoned requests left behind (prefix cache) do not corrupt later answers.
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        for (path, body), want in list(zip(specs, expected))[::3]:
            assert choice_text(client.post(f"{server_url}{path}", json=body).json()) == choice_text(want)
        assert client.get(f"{server_url}/health").status_code == 200
    print(f"{NUM_CLIENTS} clients x {MAX_TOKENS} tokens in {elapsed:.1f} s")


def test_burst_past_max_waiting_requests_gets_429() -> None:
    with launch_server("--max-model-len", "128", "--kv-cache-memory", "64M", "--max-num-seqs", "2",
                       "--max-waiting-requests", "1", env=SERVER_ENV) as server:
        url = f"{server.url}/v1/completions"
        body = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}

        async def one(client: httpx.AsyncClient, i: int) -> tuple[float, int, dict, dict]:
            start = time.monotonic()
            if i % 2:
                r = await read_stream(client, url, body)
                out = r.body if r.status != 200 else {"text": r.text, "finish_reason": r.finish_reason}
                return time.monotonic() - start, r.status, r.headers, out
            resp = await client.post(url, json=body)
            return time.monotonic() - start, resp.status_code, dict(resp.headers), resp.json()

        async def burst() -> list:
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
                return await asyncio.gather(*(one(client, i) for i in range(12)))

        results = asyncio.run(burst())
        ok = [r for r in results if r[1] == 200]
        refused = [r for r in results if r[1] == 429]
        assert len(ok) + len(refused) == len(results), [r[1:] for r in results]
        assert ok and refused, [r[1] for r in results]
        for _, _, headers, answer in refused:
            assert headers["retry-after"] == "1"
            err = assert_openai_error(answer, "server_overloaded")
            assert err["type"] == "rate_limit_exceeded"
        texts = {b["text"] if "text" in b else b["choices"][0]["text"] for _, _, _, b in ok}
        assert len(texts) == 1 and texts != {""}  # every admitted request completed, identically (greedy)
        # Refusals are immediate, not a wait for a slot.
        assert max(r[0] for r in refused) < max(r[0] for r in ok)
        # The official client, which honours Retry-After and retries 429, gets through.
        import openai

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=CLIENT_TIMEOUT_S)
        done = client.completions.create(model=MODEL, prompt=body["prompt"], max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert done.choices[0].text in texts
        m = wait_until_idle(server.url)
        assert (m["ember:num_requests_running"], m["ember:num_requests_waiting"]) == (0, 0), m
