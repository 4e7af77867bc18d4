"""OpenAI protocol models and the app's request handling, against a fake engine.

Fast (no model): the fake echoes the prompt back one character per step. The real
server on a real model is tested in test_server.py.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from ember.config import ModelConfig
from ember.engine.input_processor import InputProcessor
from ember.entrypoints.openai.api_server import build_app
from ember.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import RequestOutputKind

MODEL = "fake-model"
MAX_MODEL_LEN = 64

# ---------------------------------------------------------------- request models


def test_completion_prompt_forms() -> None:
    assert CompletionRequest(prompt="hi").prompt == "hi"
    assert CompletionRequest.model_validate({"prompt": ["hi"]}).prompt == "hi"
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    with pytest.raises(ValidationError, match="one prompt per request"):
        CompletionRequest.model_validate({"prompt": ["a", "b"]})
    with pytest.raises(ValidationError, match="list of token ids"):
        CompletionRequest.model_validate({"prompt": [1, "a"]})
    with pytest.raises(ValidationError, match="prompt"):
        CompletionRequest.model_validate({})


def test_requests_are_strict() -> None:
    for bad in ({"max_tokens": "16"}, {"max_tokens": True}, {"max_tokens": 1.5}, {"temperature": "0"},
                {"stream": "yes"}, {"logprobs": 2}, {"echo": True}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"prompt": "x", **bad})
    # Harmless standard fields are accepted; an int is a valid float.
    req = CompletionRequest.model_validate({"prompt": "x", "user": "u1", "stream_options": {"include_usage": True},
                                            "temperature": 0, "stop": "\n"})
    assert req.temperature == 0.0 and req.stop == ["\n"] and req.include_usage is False  # not streaming
    assert CompletionRequest.model_validate({"prompt": "x", "stream": True,
                                             "stream_options": {"include_usage": True}}).include_usage


def test_sampling_params_mapping() -> None:
    params = CompletionRequest(prompt="x").to_sampling_params(16)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (1.0, 1.0, 0, 16)
    assert params.output_kind == RequestOutputKind.FINAL_ONLY
    params = CompletionRequest.model_validate(
        {"prompt": "x", "stream": True, "temperature": 0, "top_k": 5, "min_p": 0.1, "seed": 7,
         "stop_token_ids": [2], "ignore_eos": True}).to_sampling_params(4)
    assert params.output_kind == RequestOutputKind.DELTA and params.greedy
    assert (params.top_k, params.min_p, params.seed, params.stop_token_ids, params.ignore_eos) == (5, 0.1, 7, [2], True)
    with pytest.raises(ValueError, match="temperature"):
        CompletionRequest.model_validate({"prompt": "x", "temperature": -1}).to_sampling_params(4)


def test_chat_request() -> None:
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_tokens": 5, "max_completion_tokens": 7})
    assert req.resolved_max_tokens() == 7
    assert req.message_dicts() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "q"}]}).resolved_max_tokens() is None
    for bad in ({"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                {"messages": "hi"}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(bad)


# ---------------------------------------------------------------- app with a fake engine


class CharTokenizer:
    """One token per character (its code point); EOS is 0."""

    eos_token_id = 0
    chat_template = "fake"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [min(ord(c), 255) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"


class EchoEngine:
    """AsyncLLM's interface; the output echoes the prompt, one character per step."""

    def __init__(self, fail: bool = False) -> None:
        hf_config = SimpleNamespace(vocab_size=256, eos_token_id=0, num_hidden_layers=1)
        self.model_config = ModelConfig(model="fake", hf_config=hf_config, architecture="Fake",
                                        dtype=torch.float32, max_model_len=MAX_MODEL_LEN, served_model_name=MODEL)
        self.tokenizer = CharTokenizer()
        self.input_processor = InputProcessor(self.model_config, self.tokenizer)
        self.errored = False
        self.fail = fail
        self.aborted: list[str] = []

    async def generate(self, prompt, sampling_params, request_id):
        ids = self.input_processor.tokenize(prompt)
        params = self.input_processor.check(ids, sampling_params)
        if self.fail:
            raise RuntimeError("boom")
        limit = min(params.max_tokens or MAX_MODEL_LEN, MAX_MODEL_LEN - len(ids))
        out_ids = [ids[i % len(ids)] for i in range(limit)]
        finished = False
        try:
            for step in range(1, limit + 1):
                await asyncio.sleep(0)
                finished = step == limit
                if params.output_kind == RequestOutputKind.FINAL_ONLY and not finished:
                    continue
                new = out_ids[step - 1:step] if params.output_kind == RequestOutputKind.DELTA else out_ids[:step]
                text = "".join(chr(t) for t in new)
                yield RequestOutput(request_id, None, ids, [CompletionOutput(0, text, new, "length" if finished else None)],
                                    finished)
        finally:
            if not finished:
                self.aborted.append(request_id)

    def shutdown(self) -> None:
        pass


@pytest.fixture
def engine() -> EchoEngine:
    return EchoEngine()


@pytest.fixture
def client(engine: EchoEngine) -> TestClient:
    return TestClient(build_app(engine), raise_server_exceptions=False)


def sse_events(body: str) -> list[str]:
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), body
    return [e.removeprefix("data: ") for e in events]


def assert_error(resp, status: int, param: str | None = None, match: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert match.lower() in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_health_and_models(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert_error(client.get("/v1/nothing"), 404)


def test_completion(client: TestClient) -> None:
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 5}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == MODEL
    assert body["choices"][0]["text"] == "abcab" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    # Token-id prompt; no model field means the served model.
    body = client.post("/v1/completions", json={"prompt": [104, 105], "max_tokens": 2}).json()
    assert body["choices"][0]["text"] == "hi"


def test_completion_stream(client: TestClient) -> None:
    resp = client.post("/v1/completions", json={"prompt": "xyz", "max_tokens": 4, "stream": True,
                                                "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "xyzx"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_chat(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hey"}], "max_completion_tokens": 6}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "[user]"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len("[user]hey[assistant]")


def test_chat_stream(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hey"}], "max_tokens": 3, "stream": True})
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "[us"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length",
                                        "stop_reason": None}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_errors(client: TestClient, path: str) -> None:
    chat = path.endswith("chat/completions")
    good = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    headers = {"content-type": "application/json"}
    assert_error(client.post(path, content=b'{"prompt": ', headers=headers), 400, match="malformed json")
    assert_error(client.post(path, content=b"[1, 2]", headers=headers), 400, match="json object")
    assert_error(client.post(path, json={**good, "max_tokens": "many"}), 400, "max_tokens", "max_tokens")
    assert_error(client.post(path, json={**good, "frobnicate": 1}), 400, "frobnicate", "frobnicate")
    err = assert_error(client.post(path, json={**good, "model": "gpt-4"}), 400, "model", "gpt-4")
    assert err["code"] == "model_not_found"
    assert_error(client.post(path, json={**good, "temperature": -0.5}), 400, "temperature", "temperature")
    assert_error(client.post(path, json={**good, "n": 2}), 400, "n", "n must be 1")
    long_prompt = "x" * (MAX_MODEL_LEN + 1)
    long = {"messages": [{"role": "user", "content": long_prompt}]} if chat else {"prompt": long_prompt}
    for stream in (False, True):
        assert_error(client.post(path, json={**long, "stream": stream}), 400, "messages" if chat else "prompt",
                     "context window")
    assert_error(client.post(path, json={**good, "max_tokens": MAX_MODEL_LEN}), 400, "max_tokens",
                 "maximum context length")
    missing = {} if not chat else {"model": MODEL}
    assert_error(client.post(path, json=missing), 400, "messages" if chat else "prompt", "required")
    assert client.post(path, json=good).status_code == 200


def test_internal_error_is_500_and_server_survives() -> None:
    engine = EchoEngine(fail=True)
    client = TestClient(build_app(engine), raise_server_exceptions=False)
    for stream in (False, True):
        err = assert_error(client.post("/v1/completions", json={"prompt": "a", "stream": stream}), 500, match="boom")
        assert err["type"] == "internal_server_error"
    assert client.get("/health").status_code == 200
    engine.errored = True
    assert client.get("/health").status_code == 503
    assert_error(client.post("/v1/completions", json={"prompt": "a"}), 503)


def test_stream_closed_early_aborts(engine: EchoEngine, client: TestClient) -> None:
    with client.stream("POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 40, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break
    # The engine generator was closed (the request aborted) once the stream ended.
    for _ in range(50):
        if engine.aborted:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert len(engine.aborted) == 1 and engine.aborted[0].startswith("cmpl-")
