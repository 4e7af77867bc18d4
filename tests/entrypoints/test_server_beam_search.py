"""Beam search through the real server (``ember serve`` in a subprocess, bundled
SmolLM2, float32 on CPU) with the official ``openai`` client: vLLM's
``use_beam_search`` (``n`` the beam width) and ``length_penalty`` in ``extra_body``,
on completions and chat (streamed and not), checked against a plain-PyTorch beam
search over HF transformers' model on the same weights; bad values answer 400
naming the field."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.engine.beam_reference import reference_beam_search
from tests.entrypoints.server_process import MODEL, launch_server
from tests.models.tiny import load_hf_gguf

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    # A waiting-request limit below the beam width: a search is admitted once, its
    # step requests (up to n at a time) are not refused one by one.
    with launch_server("--kv-cache-memory", "128M", "--max-model-len", "256", "--max-waiting-requests", "2") as srv:
        yield srv.url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf(smollm2_path, one_torch_thread):
    return load_hf_gguf(smollm2_path)


def _tokens(server: str, **body) -> list[int]:
    resp = httpx.post(f"{server}/tokenize", json={"model": MODEL, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()["tokens"]


def _detokenize(server: str, ids: list[int]) -> str:
    resp = httpx.post(f"{server}/detokenize", json={"model": MODEL, "tokens": ids})
    assert resp.status_code == 200, resp.text
    return resp.json()["prompt"]


def test_completions_beam_search_equals_reference(server, client, hf):
    prompt = _tokens(server, prompt="The best thing about living by the sea is")
    resp = client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=6, logprobs=1,
                                     extra_body={"use_beam_search": True, "ignore_eos": True})
    ref, gap = reference_beam_search(hf, prompt, 4, 6, set())
    assert gap > 1e-3
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert len({c.text for c in resp.choices}) == 4
    cums = []
    for choice, r in zip(resp.choices, ref):
        assert choice.text == _detokenize(server, r.token_ids)
        assert choice.finish_reason == "length"
        assert len(choice.logprobs.token_logprobs) == 6
        cums.append(sum(choice.logprobs.token_logprobs))
        assert cums[-1] == pytest.approx(r.cum_logprob, abs=1e-3)
    assert cums == sorted(cums, reverse=True)  # equal lengths: best cumulative log-probability first
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == 24
    # A batch of prompts: prompt p's beams are choices p * n .. p * n + n - 1.
    other = _tokens(server, prompt="My favourite colour is")
    batch = client.completions.create(model=MODEL, prompt=[other, prompt], n=4, max_tokens=6,
                                      extra_body={"use_beam_search": True, "ignore_eos": True})
    assert [c.index for c in batch.choices] == list(range(8))
    assert [c.text for c in batch.choices[4:]] == [c.text for c in resp.choices]
    assert len({c.text for c in batch.choices[:4]}) == 4
    assert batch.usage.prompt_tokens == len(prompt) + len(other) and batch.usage.completion_tokens == 48


def test_chat_beam_search_equals_reference(server, client, hf):
    prompt = _tokens(server, messages=QUESTION)
    eos = {_tokens(server, prompt="<|im_end|>", add_special_tokens=False)[0]}
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, n=4, max_tokens=10,
                                          extra_body={"use_beam_search": True, "length_penalty": 0.5})
    ref, gap = reference_beam_search(hf, prompt, 4, 10, eos, length_penalty=0.5)
    assert gap > 1e-3
    assert len(resp.choices) == 4
    for choice, r in zip(resp.choices, ref):
        stop = r.finish_reason == "stop"
        assert choice.message.content == _detokenize(server, r.token_ids[:-1] if stop else r.token_ids)
        assert choice.finish_reason == r.finish_reason
    assert any(r.finish_reason == "stop" for r in ref)
    assert resp.usage.completion_tokens == sum(len(r.token_ids) for r in ref)


@pytest.mark.parametrize("endpoint, extra, field", [
    ("completions", {"use_beam_search": True, "n": 11}, "n"),
    ("completions", {"use_beam_search": True, "n": 0}, "n"),
    ("chat", {"use_beam_search": True, "n": 2, "temperature": 0.7}, "temperature"),
    ("chat", {"use_beam_search": True, "top_p": 0.5}, "top_p"),
    ("completions", {"use_beam_search": True, "stop": ["."]}, "stop"),
    ("completions", {"use_beam_search": True, "echo": True, "logprobs": 1}, "echo"),
    ("chat", {"length_penalty": 2.0}, "length_penalty"),
    ("completions", {"use_beam_search": True, "length_penalty": "long"}, "length_penalty"),
    ("completions", {"use_beam_search": "yes"}, "use_beam_search"),
])
def test_bad_beam_search_values(server, endpoint, extra, field):
    if endpoint == "chat":
        url, body = f"{server}/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    else:
        url, body = f"{server}/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    resp = httpx.post(url, json={**body, **extra})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == field and field in err["message"], err


def test_streamed_beam_search_carries_the_finished_sequences(client):
    """The search ends before the stream starts: each choice's whole text comes in
    one chunk, with its finish reason (as vLLM streams a beam search)."""
    beam = {"use_beam_search": True, "ignore_eos": True}
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", n=3, max_tokens=5, extra_body=beam)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", n=3, max_tokens=5,
                                            stream=True, stream_options={"include_usage": True}, extra_body=beam))
    texts, reasons = {}, {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        reasons[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, max_tokens=6,
                                           extra_body={"use_beam_search": True})
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, max_tokens=6, stream=True,
                                                 extra_body={"use_beam_search": True}))
    for choice in whole.choices:
        deltas = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert deltas[0].delta.role == "assistant"
        assert "".join(d.delta.content or "" for d in deltas) == choice.message.content
        assert [d.finish_reason for d in deltas][-1] == choice.finish_reason
