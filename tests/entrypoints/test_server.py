"""The real server (``ember serve`` in a subprocess) on the bundled SmolLM2-135M-Instruct,
driven with the official ``openai`` client and raw HTTP for malformed requests."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.entrypoints.server_process import MODEL, launch_server

MAX_MODEL_LEN = 256
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Base URL of a running ``ember serve`` (default model, small context)."""
    with launch_server("--kv-cache-memory", "256M", "--max-model-len", str(MAX_MODEL_LEN)) as srv:
        assert f"{srv.url}/v1" in srv.log_tail()  # the URL is logged
        yield srv.url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120)


def assert_error(resp: httpx.Response, status: int, param: str | None = None, match: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err)
    assert match.lower() in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_chat_completion(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    assert resp.object == "chat.completion" and resp.model == MODEL and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert 0 < resp.usage.completion_tokens < 32
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    # max_completion_tokens is OpenAI's current name for max_tokens.
    expected = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                              max_completion_tokens=32)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32,
                                                  stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == expected.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "stop" and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == expected.usage


def test_completion(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    choice = resp.choices[0]
    assert choice.text.strip() and choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 8
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert streamed[-1].choices[0].finish_reason == choice.finish_reason
    # Extension fields (vLLM's) go through extra_body.
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True, "top_k": 1})
    assert resp.usage.completion_tokens == 5 and resp.choices[0].finish_reason == "length"


def test_bad_requests(server: str, client: openai.OpenAI) -> None:
    url = f"{server}/v1/chat/completions"
    good = {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    assert_error(httpx.post(url, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}),
                 400, match="malformed json")
    assert_error(httpx.post(url, json={**good, "max_tokens": "four"}), 400, "max_tokens", "max_tokens")
    assert_error(httpx.post(url, json={"model": MODEL}), 400, "messages", "messages")
    long_prompt = "hello " * (MAX_MODEL_LEN + 10)
    assert_error(httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": long_prompt, "stream": True}),
                 400, "prompt", "context")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}], stream=True)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):  # not supported yet: refused, not ignored
        client.chat.completions.create(model=MODEL, messages=QUESTION, frequency_penalty=0.5)


def test_bad_requests_do_not_disturb_a_running_stream(server: str, client: openai.OpenAI) -> None:
    max_tokens = 128  # long enough to be still running after the requests below, on any CPU
    first_chunk = threading.Event()
    result: dict = {}

    def long_stream() -> None:
        text, usage, reason = [], None, None
        for chunk in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=max_tokens,
                                               temperature=0, stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True}):
            first_chunk.set()
            if chunk.choices:
                text.append(chunk.choices[0].text)
                reason = chunk.choices[0].finish_reason or reason
            usage = chunk.usage or usage
        result.update(text="".join(text), usage=usage, reason=reason)

    thread = threading.Thread(target=long_stream)
    thread.start()
    try:
        assert first_chunk.wait(60)
        url = f"{server}/v1/completions"
        for bad in (b"{", json.dumps({"prompt": "x", "max_tokens": -3}).encode(),
                    json.dumps({"prompt": "x", "bogus": 1}).encode(),
                    json.dumps({"prompt": "x " * 400, "stream": True}).encode()):
            assert httpx.post(url, content=bad, headers={"content-type": "application/json"}).status_code == 400
        # A good request meanwhile shares the engine steps with the stream.
        short = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
        assert short.choices[0].text
        assert thread.is_alive(), "the stream should still be running (raise max_tokens if this machine is fast)"
    finally:
        thread.join(120)
    assert result["reason"] == "length" and result["usage"].completion_tokens == max_tokens
    assert result["text"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_prometheus_metrics(server: str, client: openai.OpenAI) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, str], float]:
        resp = httpx.get(f"{server}/metrics")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        out = {}
        for family in text_string_to_metric_families(resp.text):
            for s in family.samples:
                out[(s.name, s.labels.get("finished_reason", ""))] = s.value
        return out

    before = scrape()
    prompt = "Metrics test: count the tokens of this prompt"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body={
        "ignore_eos": True})
    after = scrape()

    def delta(name: str, label: str = "") -> float:
        return after.get((name, label), 0.0) - before.get((name, label), 0.0)

    assert delta("ember:prompt_tokens_total") == resp.usage.prompt_tokens
    assert delta("ember:generation_tokens_total") == resp.usage.completion_tokens == 6
    assert delta("ember:request_success_total", "length") == 1
    assert delta("ember:time_to_first_token_seconds_count") == 1
    assert delta("ember:e2e_request_latency_seconds_count") == 1
    assert delta("ember:prefix_cache_queries_total") >= resp.usage.prompt_tokens
    # Nothing is left running once the request has finished.
    assert after[("ember:num_requests_running", "")] == 0
    assert after[("ember:kv_cache_usage_perc", "")] == 0


def test_priority_and_cache_salt_fields(server: str, client: openai.OpenAI) -> None:
    base = dict(model=MODEL, prompt="Salted prompt", max_tokens=3, temperature=0)
    plain = client.completions.create(**base)
    salted = client.completions.create(**base, extra_body={"priority": 5, "cache_salt": "tenant-a"})
    assert salted.choices[0].text == plain.choices[0].text  # the salt changes caching, not the output
    assert_error(httpx.post(f"{server}/v1/completions", json={**base, "cache_salt": ""}), 400, match="cache_salt")
    assert_error(httpx.post(f"{server}/v1/completions", json={**base, "priority": "high"}), 400, "priority")
