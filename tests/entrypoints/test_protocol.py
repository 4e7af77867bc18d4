"""OpenAI protocol models and the app's request handling, against a fake engine.

Fast (no model): the fake echoes the prompt back one character per step (with
n > 1, choice i starts i characters later and odd choices end with EOS one step
early), with made-up log-probabilities (:func:`fake_logprob`). The real server on
a real model is tested in test_server.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace

import msgspec
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from ember.config import ModelConfig
from ember.engine.core_client import EngineCoreRequest
from ember.engine.input_processor import InputProcessor
from ember.engine.llm_engine import check_priority_and_salt
from ember.engine.output_processor import child_requests
from ember.entrypoints.openai.api_server import build_app
from ember.entrypoints.openai.protocol import (
    MAX_PROMPTS_PER_REQUEST,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
)
from ember.entrypoints.openai.serving_completion import (
    OpenAIServing,
    OpenAIServingCompletion,
)
from ember.entrypoints.openai.supervisor import RequestSupervisor
from ember.outputs import CompletionOutput, RequestOutput, SampleLogprob
from ember.sampling_params import RequestOutputKind

MODEL = "fake-model"
MAX_MODEL_LEN = 64

# ---------------------------------------------------------------- request models


def test_completion_prompt_forms() -> None:
    def located(prompt):
        return CompletionRequest.model_validate({"prompt": prompt}).located_prompts()

    # OpenAI's four forms: a string, token ids, and a batch of either (one or more).
    assert CompletionRequest(prompt="hi").located_prompts() == [("prompt", "hi")]
    assert located([1, 2, 3]) == [("prompt", [1, 2, 3])]
    assert located(["hi"]) == [("prompt[0]", "hi")]
    assert located(["a", "b"]) == [("prompt[0]", "a"), ("prompt[1]", "b")]
    assert located([[1, 2], [3]]) == [("prompt[0]", [1, 2]), ("prompt[1]", [3])]
    assert len(located(["x"] * MAX_PROMPTS_PER_REQUEST)) == MAX_PROMPTS_PER_REQUEST
    assert located([7] * 1000) == [("prompt", [7] * 1000)]  # one tokenized prompt, not a batch
    for bad, match in (([], "^prompt must not be empty"), ("", "^prompt must not be empty"),
                       (["a", ""], r"^prompt\[1\] must not be empty"), ([[1], []], r"^prompt\[1\] must not be empty"),
                       (["x"] * (MAX_PROMPTS_PER_REQUEST + 1),
                        f"^prompt holds {MAX_PROMPTS_PER_REQUEST + 1} prompts; at most {MAX_PROMPTS_PER_REQUEST}"),
                       (["a", "\ud800"], r"^prompt\[1\] is not valid Unicode text"),
                       ([1, "a"], "^prompt must be"), ([["a"]], "^prompt must be"), ([[1], "a"], "^prompt must be"),
                       ([[1, True]], "^prompt must be"), ([True], "^prompt must be"), ([1.0], "^prompt must be"),
                       ([[[1]]], "^prompt must be"), ({"a": 1}, "^prompt must be"), (None, "^prompt must be")):
        with pytest.raises(ValidationError) as e:
            CompletionRequest.model_validate({"prompt": bad})
        (error,) = e.value.errors()
        assert error["loc"] == ("prompt",)
        assert re.search(match, error["msg"].removeprefix("Value error, ")), (bad, error["msg"])
    with pytest.raises(ValidationError, match="prompt"):
        CompletionRequest.model_validate({})


def test_requests_are_strict() -> None:
    for bad in ({"max_tokens": "16"}, {"max_tokens": True}, {"max_tokens": 1.5}, {"temperature": "0"},
                {"stream": "yes"}, {"logprobs": True}, {"logprobs": 1.0}, {"echo": 1}, {"n": 2.0},
                {"presence_penalty": "1"}, {"top_logprobs": 2}, {"best_of": 2}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"prompt": "x", **bad})
    chat = {"messages": [{"role": "user", "content": "q"}]}
    for bad in ({"logprobs": 2}, {"top_logprobs": 1.0}, {"echo": True}, {"repetition_penalty": "1.1"}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({**chat, **bad})
    # Harmless standard fields are accepted; an int is a valid float.
    req = CompletionRequest.model_validate({"prompt": "x", "user": "u1", "stream_options": None,
                                            "temperature": 0, "stop": "\n"})
    assert req.temperature == 0.0 and req.stop == ["\n"] and req.include_usage is False
    for stream in ({}, {"stream": False}):  # stream_options without a stream (as OpenAI and vLLM)
        with pytest.raises(ValidationError, match="stream_options can only be set when stream is true"):
            CompletionRequest.model_validate({"prompt": "x", "stream_options": {"include_usage": True}, **stream})
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


def test_sampling_params_mapping_n_penalties_logprobs() -> None:
    params = CompletionRequest(prompt="x").to_sampling_params(16)
    assert (params.n, params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
            params.logprobs) == (1, 0.0, 0.0, 1.0, None)
    params = CompletionRequest.model_validate(
        {"prompt": "x", "n": 3, "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.3,
         "logprobs": 0, "echo": False}).to_sampling_params(4)
    assert (params.n, params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
            params.logprobs) == (3, 0.5, -1.0, 1.3, 0)
    assert CompletionRequest.model_validate({"prompt": "x", "logprobs": 5}).to_sampling_params(4).logprobs == 5
    echo_only = CompletionRequest.model_validate({"prompt": "x", "echo": True}).to_sampling_params(4)
    assert (echo_only.logprobs, echo_only.prompt_logprobs) == (None, None)
    echo_lp = CompletionRequest.model_validate({"prompt": "x", "echo": True, "logprobs": 2}).to_sampling_params(4)
    assert (echo_lp.logprobs, echo_lp.prompt_logprobs) == (2, 2)  # the prompt's logprobs too
    for field, value in (("n", 0), ("n", 129), ("presence_penalty", 2.5), ("frequency_penalty", -3),
                         ("repetition_penalty", 0), ("logprobs", 21), ("logprobs", -1)):
        with pytest.raises(ValueError, match=f"^{field} "):
            CompletionRequest.model_validate({"prompt": "x", field: value}).to_sampling_params(4)

    def chat(**fields):
        return ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "q"}], **fields}).to_sampling_params(None)

    assert chat().logprobs is None and chat(logprobs=False).logprobs is None
    assert chat(logprobs=True).logprobs == 0 and chat(logprobs=True, top_logprobs=20).logprobs == 20
    assert chat(n=2, presence_penalty=1.0).n == 2
    for fields in ({"top_logprobs": 2}, {"logprobs": False, "top_logprobs": 0},
                   {"logprobs": True, "top_logprobs": 21}, {"logprobs": True, "top_logprobs": -1}):
        with pytest.raises(ValueError, match="^top_logprobs "):
            chat(**fields)


def test_chat_request() -> None:
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_tokens": 5, "max_completion_tokens": 7})
    assert req.resolved_max_tokens() == 7
    # Text parts are joined with newlines (as vLLM does).
    assert req.message_dicts() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
    assert ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "q"}]}).resolved_max_tokens() is None
    for bad in ({"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},  # no tool_call_id
                {"messages": [{"role": "function", "content": "x"}]},
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

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"


EOS = 0


def fake_logprob(index: int, position: int, token_id: int, num_top: int) -> SampleLogprob:
    """The fake engine's log-probabilities for choice ``index`` at output ``position``:
    the chosen token is the most likely; the alternatives are the next code points,
    1 nat apart, and -inf from the fourth on."""
    logprob = -(position + 1) / 8 - index
    top = [((token_id + j) % 256, logprob - j if j < 3 else float("-inf")) for j in range(num_top)]
    return SampleLogprob(token_id, logprob, 1, top)


def fake_choice_tokens(prompt_ids: list[int], index: int, limit: int) -> list[int]:
    """Choice ``index`` echoes the prompt from character ``index`` on; odd choices
    end with EOS one token early (finish reason "stop")."""
    if index % 2 == 0:
        return [prompt_ids[(index + k) % len(prompt_ids)] for k in range(limit)]
    return [prompt_ids[(index + k) % len(prompt_ids)] for k in range(max(0, limit - 2))] + [EOS]


class EchoEngine:
    """AsyncLLM's interface; the output echoes the prompt, one character per step
    (n choices per :func:`fake_choice_tokens`, logprobs per :func:`fake_logprob`),
    following RequestOutput's DELTA / CUMULATIVE / FINAL_ONLY rules for n > 1.

    Like AsyncLLM, it checks the request and sends each engine-core request (one
    per choice) through the core process's wire format (msgpack), so that a value
    the server lets through but the transport cannot carry fails here too.

    ``fail`` / ``fail_after`` make the requests whose prompt text is ``fail_on``
    (all, if None) fail at once / after that many outputs; ``step_delay`` is the
    time of one step in seconds; ``started`` and ``aborted`` list the request ids
    that came in and those closed before they finished."""

    def __init__(self, fail: bool = False, fail_after: int | None = None, fail_on: str | None = None,
                 step_delay: float = 0.0) -> None:
        hf_config = SimpleNamespace(vocab_size=256, eos_token_id=EOS, num_hidden_layers=1)
        self.model_config = ModelConfig(model="fake", hf_config=hf_config, architecture="Fake",
                                        dtype=torch.float32, max_model_len=MAX_MODEL_LEN, served_model_name=MODEL)
        self.tokenizer = CharTokenizer()
        self.input_processor = InputProcessor(self.model_config, self.tokenizer)
        self.errored = False
        self.fail = fail
        self.fail_after = fail_after  # raise after this many outputs
        self.fail_on = fail_on
        self.step_delay = step_delay
        self.started: list[str] = []
        self.aborted: list[str] = []

    async def generate(self, prompt, sampling_params, request_id, *, priority=None, cache_salt=None):
        priority = 0 if priority is None else priority
        check_priority_and_salt(priority, cache_salt)
        ids = self.input_processor.tokenize(prompt)
        params = self.input_processor.check(ids, sampling_params)
        self.sent = [msgspec.msgpack.decode(msgspec.msgpack.encode(EngineCoreRequest(
            child_id, ids, child_params, 0.0, priority, cache_salt)), type=EngineCoreRequest)
            for child_id, child_params in child_requests(request_id, params)]
        self.started.append(request_id)
        fails = self.fail_on is None or self.tokenizer.decode(ids) == self.fail_on
        if self.fail and fails:
            raise RuntimeError("boom")
        limit = min(params.max_tokens or MAX_MODEL_LEN, MAX_MODEL_LEN - len(ids))
        tokens = [fake_choice_tokens(ids, i, limit) for i in range(params.n)]
        steps = max(len(t) for t in tokens)

        def output(i: int, start: int, end: int) -> CompletionOutput:
            new = tokens[i][start:end]
            done = end == len(tokens[i])
            finish = None if not done else ("stop" if tokens[i][-1] == EOS else "length")
            text = "".join(chr(t) for t in (new[:-1] if finish == "stop" else new))
            logprobs = None if params.logprobs is None else [
                fake_logprob(i, start + k, t, params.logprobs) for k, t in enumerate(new)]
            return CompletionOutput(i, text, new, finish, None, logprobs)

        finished = False
        try:
            for step in range(1, steps + 1):
                await asyncio.sleep(self.step_delay)
                if self.fail_after is not None and fails and step > self.fail_after:
                    raise RuntimeError("engine died mid-stream")
                finished = step == steps
                kind = params.output_kind
                if kind == RequestOutputKind.FINAL_ONLY and not finished:
                    continue
                if kind == RequestOutputKind.DELTA:
                    outputs = [output(i, step - 1, step) for i in range(params.n) if step <= len(tokens[i])]
                else:
                    outputs = [output(i, 0, min(step, len(tokens[i]))) for i in range(params.n)]
                yield RequestOutput(request_id, None, ids, outputs, finished)
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
    # As vLLM: the chunk of the last token carries the finish reason (no empty chunk after it).
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {"content": "s"}, "logprobs": None,
                                        "finish_reason": "length", "stop_reason": None}
    assert len(chunks) == 1 + 3  # the role chunk, then one chunk per token
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
    err = assert_error(client.post(path, json={**good, "model": "gpt-4"}), 404, "model", "gpt-4")
    assert err["code"] == "model_not_found"
    assert_error(client.post(path, json={**good, "temperature": -0.5}), 400, "temperature", "temperature")
    for field, value in (("n", 0), ("n", 129), ("presence_penalty", 2.5), ("frequency_penalty", -2.1),
                         ("repetition_penalty", 0), ("repetition_penalty", 2.5)):
        assert_error(client.post(path, json={**good, field: value}), 400, field, field)
    if chat:
        for bad in ({"top_logprobs": 2}, {"logprobs": False, "top_logprobs": 2},
                    {"logprobs": True, "top_logprobs": 21}):
            assert_error(client.post(path, json={**good, **bad}), 400, "top_logprobs", "top_logprobs")
    else:
        for value in (21, -1):
            assert_error(client.post(path, json={**good, "logprobs": value}), 400, "logprobs", "logprobs")
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


# ---------------------------------------------------------------- values the engine core cannot carry

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
BEYOND_INT64 = (2 ** 63, 2 ** 64, 10 ** 30, INT64_MIN - 1, -(10 ** 30))
CHAT_GOOD = {"messages": [{"role": "user", "content": "hi"}]}


def post_json(client: TestClient, path: str, body: dict):
    """POST ``body`` as JSON with ``\\u`` escapes (json.dumps' default), which is how
    a lone surrogate travels; httpx's ``json=`` cannot encode one."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_integers_beyond_int64_get_400_naming_the_field(client: TestClient, path: str) -> None:
    chat = path.endswith("chat/completions")
    good = CHAT_GOOD if chat else {"prompt": "hi"}
    fields = ["n", "top_k", "seed", "priority", "max_tokens", "stop_token_ids"]
    fields += ["max_completion_tokens", "top_logprobs"] if chat else ["logprobs", "prompt"]
    for name in fields:
        for value in BEYOND_INT64:
            body = {**good, name: [104, value] if name in ("stop_token_ids", "prompt") else value}
            if name == "top_logprobs":
                body["logprobs"] = True
            assert_error(post_json(client, path, body), 400, name, name)
    assert client.post(path, json=good).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_int64_edges_are_served(engine: EchoEngine, client: TestClient, path: str) -> None:
    good = CHAT_GOOD if path.endswith("chat/completions") else {"prompt": "hi"}
    for extra in ({"seed": INT64_MAX, "n": 3}, {"seed": INT64_MIN, "n": 2}, {"priority": INT64_MIN},
                  {"priority": INT64_MAX}, {"top_k": INT64_MAX}, {"stop_token_ids": [255, 0]}):
        resp = post_json(client, path, {**good, "max_tokens": 2, **extra})
        assert resp.status_code == 200, (extra, resp.text)
        sent = engine.sent  # as the engine core would receive them
        if "seed" in extra:  # choice i gets seed + i, wrapped within int64 (two's complement)
            assert [r.sampling_params.seed for r in sent] == [
                (extra["seed"] + i + 2 ** 63) % 2 ** 64 - 2 ** 63 for i in range(extra["n"])]
        if "priority" in extra:
            assert sent[0].priority == extra["priority"]
        if "top_k" in extra:
            assert sent[0].sampling_params.top_k == INT64_MAX
        if "stop_token_ids" in extra:
            assert sent[0].sampling_params.stop_token_ids == [255, 0]
    # An int64 stop token id is carried, but it lies outside the vocabulary (256 ids).
    assert_error(post_json(client, path, {**good, "stop_token_ids": [INT64_MAX, 0]}), 400, "stop_token_ids",
                 f"stop_token_ids: token id {INT64_MAX} is outside the vocabulary [0, 256)")


def test_detokenize_token_ids_are_checked(client: TestClient) -> None:
    assert client.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    for tokens in ([10 ** 30], [2 ** 64], [1, -(2 ** 63) - 1], [-1], [256]):
        assert_error(post_json(client, "/detokenize", {"tokens": tokens}), 400, "tokens", "tokens")


SURROGATE_CASES = [  # (path, body with one field that is not Unicode text, the field)
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": ["ab\udfff"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": "\udfff"}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": ["ok", "x\ud800"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "cache_salt": "\ud800"}, "cache_salt"),
    ("/v1/completions", {"prompt": "hi", "user": "\udc00"}, "user"),
    ("/v1/completions", {"prompt": "hi", "model": "\ud800"}, "model"),
    ("/v1/completions", {"prompt": "hi", "\U0001F600": 1, "\udc00\ud800": 2}, "\udc00\ud800"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x\udfffy"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "\udfff"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT_GOOD, "stop": ["\ud800"]}, "stop"),
    ("/v1/chat/completions", {**CHAT_GOOD, "cache_salt": "a\udbff"}, "cache_salt"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages"),
]


@pytest.mark.parametrize("path, body, field", SURROGATE_CASES,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{f.encode('unicode_escape').decode()}"
                              for p, _, f in SURROGATE_CASES])
def test_lone_surrogates_get_400_naming_the_field(client: TestClient, path: str, body: dict, field: str) -> None:
    resp = post_json(client, path, body)
    # The body is ASCII JSON, so that a field name with a lone surrogate comes back exactly.
    assert resp.content.isascii()
    assert_error(resp, 400, field, "surrogate")


def test_surrogate_pairs_are_text(client: TestClient) -> None:
    # json.dumps sends U+1F600 as the escapes \ud83d\ude00: one character, not two surrogates.
    body = {"prompt": "\U0001F600 ok", "stop": "\U0001F600", "cache_salt": "\U0001F600", "max_tokens": 2,
            "echo": True}
    assert "\\ud83d\\ude00" in json.dumps(body)
    resp = post_json(client, "/v1/completions", body)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"].startswith("\U0001F600 ok"), resp.text


def test_param_names_the_field_sent(client: TestClient) -> None:
    path = "/v1/chat/completions"
    for body, field in (({"max_completion_tokens": -5}, "max_completion_tokens"),
                        ({"max_completion_tokens": 0, "max_tokens": 4}, "max_completion_tokens"),
                        ({"max_tokens": -5}, "max_tokens")):
        err = assert_error(client.post(path, json={**CHAT_GOOD, **body}), 400, field)
        assert err["message"].startswith(f"{field} "), err
    err = assert_error(client.post(path, json={**CHAT_GOOD, "max_completion_tokens": MAX_MODEL_LEN}), 400,
                       "max_completion_tokens", "maximum context length")
    assert "lower max_completion_tokens" in err["message"]
    for p, good in ((path, CHAT_GOOD), ("/v1/completions", {"prompt": "hi"})):
        assert_error(client.post(p, json={**good, "cache_salt": ""}), 400, "cache_salt", "cache_salt")


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


# ---------------------------------------------------------------- n, logprobs, echo (OpenAI's shapes)


def expected_completion_logprobs(prompt: str, index: int, max_tokens: int, num_top: int, offset: int = 0) -> dict:
    """OpenAI's legacy ``logprobs`` object for a fake choice, built from its definition:
    the chosen tokens (a final EOS is not part of the text, so not reported), their
    logprobs, the ``num_top`` alternatives plus the chosen token, character offsets."""
    tokens = fake_choice_tokens([ord(c) for c in prompt], index, max_tokens)
    if tokens[-1] == EOS:
        tokens = tokens[:-1]
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for k, t in enumerate(tokens):
        e = fake_logprob(index, k, t, num_top)
        top = {chr(a): max(lp, -9999.0) for a, lp in e.top}
        top.setdefault(chr(t), e.logprob)
        out["tokens"].append(chr(t))
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset + k)
    return out


def expected_chat_logprobs(prompt: str, index: int, max_tokens: int, num_top: int) -> dict:
    """OpenAI's chat ``logprobs`` object for a fake choice (see above)."""
    tokens = fake_choice_tokens([ord(c) for c in prompt], index, max_tokens)
    if tokens[-1] == EOS:
        tokens = tokens[:-1]

    def entry(t: int, lp: float) -> dict:
        return {"token": chr(t), "logprob": max(lp, -9999.0), "bytes": list(chr(t).encode())}

    content = []
    for k, t in enumerate(tokens):
        e = fake_logprob(index, k, t, num_top)
        content.append({**entry(t, e.logprob), "top_logprobs": [entry(a, lp) for a, lp in e.top]})
    return {"content": content}


def expected_texts(prompt: str, n: int, max_tokens: int) -> list[str]:
    return ["".join(chr(t) for t in fake_choice_tokens([ord(c) for c in prompt], i, max_tokens) if t != EOS)
            for i in range(n)]


def stream_chunks(resp) -> list[dict]:
    assert resp.status_code == 200, resp.text
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def test_completion_n_logprobs(client: TestClient) -> None:
    prompt, n, max_tokens = "abcdef", 3, 5
    body = client.post("/v1/completions", json={"prompt": prompt, "n": n, "max_tokens": max_tokens,
                                                "logprobs": 4}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == expected_texts(prompt, n, max_tokens) == ["abcde", "bcd", "cdefa"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop", "length"]
    for i, c in enumerate(body["choices"]):
        assert c["logprobs"] == expected_completion_logprobs(prompt, i, max_tokens, 4)
        # Five entries at most (4 + the chosen one, which is the most likely here); -inf is sent as -9999.
        assert all(len(top) == 4 for top in c["logprobs"]["top_logprobs"])
    # The EOS that ended choice 1 counts as a generated token, though it is not in the text.
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 5 + 4 + 5, "total_tokens": 20}
    # Without logprobs, and logprobs=0 (only the chosen token).
    plain = client.post("/v1/completions", json={"prompt": prompt, "n": 2, "max_tokens": 3}).json()
    assert [c["logprobs"] for c in plain["choices"]] == [None, None]
    zero = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "logprobs": 0}).json()
    assert zero["choices"][0]["logprobs"] == expected_completion_logprobs(prompt, 0, 3, 0)
    assert zero["choices"][0]["logprobs"]["top_logprobs"] == [{"a": -0.125}, {"b": -0.25}, {"c": -0.375}]


def test_completion_stream_n_logprobs(client: TestClient) -> None:
    prompt, n, max_tokens = "abcdef", 3, 5
    chunks = stream_chunks(client.post("/v1/completions", json={
        "prompt": prompt, "n": n, "max_tokens": max_tokens, "logprobs": 2, "stream": True,
        "stream_options": {"include_usage": True}}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5 + 4 + 5
    choice_chunks = [c["choices"] for c in chunks[:-1]]
    assert all(len(c) == 1 for c in choice_chunks)  # one choice per chunk
    by_index: dict[int, list[dict]] = {}
    for (c,) in choice_chunks:
        by_index.setdefault(c["index"], []).append(c)
    assert sorted(by_index) == [0, 1, 2]
    for i, parts in by_index.items():
        assert "".join(p["text"] for p in parts) == expected_texts(prompt, n, max_tokens)[i]
        assert [p["finish_reason"] for p in parts][-1] == ("stop" if i == 1 else "length")
        assert not any(p["finish_reason"] for p in parts[:-1])
        joined = {k: [v for p in parts for v in p["logprobs"][k]] for k in
                  ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        assert joined == expected_completion_logprobs(prompt, i, max_tokens, 2)
    # Choice 1's last chunk holds only the EOS: its text is empty and it reports no logprob.
    assert by_index[1][-1]["text"] == "" and by_index[1][-1]["logprobs"]["tokens"] == []


def test_completion_echo(client: TestClient) -> None:
    body = client.post("/v1/completions", json={"prompt": "abc", "n": 2, "max_tokens": 3, "echo": True}).json()
    assert [c["text"] for c in body["choices"]] == ["abc" + t for t in expected_texts("abc", 2, 3)]
    assert body["usage"]["completion_tokens"] == 3 + 2
    # A token-id prompt is echoed as its decoded text.
    body = client.post("/v1/completions", json={"prompt": [104, 105], "max_tokens": 2, "echo": True}).json()
    assert body["choices"][0]["text"] == "hihi"
    chunks = stream_chunks(client.post("/v1/completions", json={
        "prompt": "abc", "n": 2, "max_tokens": 3, "echo": True, "stream": True}))
    # The prompt comes first, once per choice.
    assert [c["choices"][0] for c in chunks[:2]] == [
        {"index": i, "text": "abc", "logprobs": None, "finish_reason": None, "stop_reason": None} for i in (0, 1)]
    for i in (0, 1):
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i)
        assert text == "abc" + expected_texts("abc", 2, 3)[i]


def test_chat_n_logprobs(client: TestClient) -> None:
    messages = [{"role": "user", "content": "hey"}]
    prompt = "[user]hey[assistant]"
    body = client.post("/v1/chat/completions", json={"messages": messages, "n": 2, "max_tokens": 4,
                                                     "logprobs": True, "top_logprobs": 3}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == expected_texts(prompt, 2, 4) == ["[use", "us"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    for i, c in enumerate(body["choices"]):
        assert c["logprobs"] == expected_chat_logprobs(prompt, i, 4, 3)
    assert body["usage"]["completion_tokens"] == 4 + 3
    # logprobs without top_logprobs: the chosen tokens only; no logprobs: null.
    body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "logprobs": True}).json()
    assert body["choices"][0]["logprobs"] == expected_chat_logprobs(prompt, 0, 2, 0)
    assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "logprobs": False}).json()
    assert body["choices"][0]["logprobs"] is None


def test_chat_stream_n_logprobs(client: TestClient) -> None:
    messages = [{"role": "user", "content": "hey"}]
    prompt = "[user]hey[assistant]"
    chunks = stream_chunks(client.post("/v1/chat/completions", json={
        "messages": messages, "n": 3, "max_tokens": 4, "logprobs": True, "top_logprobs": 1, "stream": True,
        "stream_options": {"include_usage": True}}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4 + 3 + 4
    choices = [c["choices"] for c in chunks[:-1]]
    assert all(len(c) == 1 for c in choices)
    # A role chunk per choice first.
    assert [c[0]["index"] for c in choices[:3]] == [0, 1, 2]
    assert all(c[0]["delta"] == {"role": "assistant", "content": ""} and c[0]["logprobs"] is None
               for c in choices[:3])
    for i in range(3):
        mine = [c[0] for c in choices[3:] if c[0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == expected_texts(prompt, 3, 4)[i]
        finishes = [c for c in mine if c["finish_reason"] is not None]
        # The last step's text (or "") and the finish reason come in one chunk.
        assert len(finishes) == 1 and finishes[0] is mine[-1] and set(finishes[0]["delta"]) == {"content"}
        assert finishes[0]["finish_reason"] == ("stop" if i == 1 else "length")
        content = [e for c in mine if c["logprobs"] for e in c["logprobs"]["content"]]
        assert {"content": content} == expected_chat_logprobs(prompt, i, 4, 1)


def test_stream_failure_after_start_is_reported_in_band() -> None:
    engine = EchoEngine(fail_after=2)
    client = TestClient(build_app(engine), raise_server_exceptions=False)
    for path, body in (("/v1/completions", {"prompt": "abc"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        resp = client.post(path, json={**body, "max_tokens": 8, "stream": True})
        assert resp.status_code == 200
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["type"] == "internal_server_error" and "engine died mid-stream" in err["message"]
        assert all("error" not in json.loads(e) for e in events[:-2])
    assert len(engine.aborted) == 2  # the engine generator was closed both times


def _byte_level_tokenizer():
    """A tiny byte-level BPE tokenizer (GPT-2 style, like SmolLM2's), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "h\u00e9llo"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


class ByteFallbackTokenizer:
    """SentencePiece-style byte fallback: ids 0..255 are the pieces ``<0xHH>``."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return f"<0x{token_id:02X}>"


@pytest.mark.parametrize("make_tokenizer", [_byte_level_tokenizer, ByteFallbackTokenizer])
def test_token_bytes_rebuild_multibyte_characters(make_tokenizer) -> None:
    tokenizer = make_tokenizer()
    serving = OpenAIServing(SimpleNamespace(
        model_config=SimpleNamespace(served_model_name=MODEL, max_model_len=MAX_MODEL_LEN), tokenizer=tokenizer))
    text = "h\u00e9llo \U0001F600 \u4e16\u754c"  # é, an emoji and two CJK characters: several bytes each
    ids = tokenizer.encode(text) if hasattr(tokenizer, "encode") else list(text.encode())
    pieces = [serving.token_text(i) for i in ids]
    assert any(t == "\ufffd" for t, _ in pieces)  # some tokens hold part of a character
    # The reference: the bytes of the tokens join into the text's UTF-8.
    assert b"".join(bytes(raw) for _, raw in pieces) == text.encode()
    for t, raw in pieces:
        if "\ufffd" not in t:
            assert bytes(raw) == t.encode()


# ---------------------------------------------------------------- batches of prompts (/v1/completions)

BATCH = ["abcdef", "wxyz", "hi"]


def test_completion_batch(engine: EchoEngine, client: TestClient) -> None:
    n, max_tokens = 2, 4
    body = client.post("/v1/completions", json={"prompt": BATCH, "n": n, "max_tokens": max_tokens,
                                                "logprobs": 1}).json()
    # Each prompt is its own engine request, named after the response id.
    assert engine.started == [f"{body['id']}-{p}" for p in range(len(BATCH))] and not engine.aborted
    # Prompt p's completion i is choice p * n + i (OpenAI's numbering).
    assert [c["index"] for c in body["choices"]] == list(range(len(BATCH) * n))
    for p, prompt in enumerate(BATCH):
        for i in range(n):
            choice = body["choices"][p * n + i]
            assert choice["text"] == expected_texts(prompt, n, max_tokens)[i]
            assert choice["finish_reason"] == ("stop" if i == 1 else "length")
            assert choice["logprobs"] == expected_completion_logprobs(prompt, i, max_tokens, 1)
    # Usage sums over prompts and choices; each choice 1 ends one step early with an EOS.
    assert body["usage"] == {"prompt_tokens": 6 + 4 + 2, "completion_tokens": 3 * (4 + 3), "total_tokens": 12 + 21}
    # The same as one request per prompt.
    singles = [client.post("/v1/completions", json={"prompt": prompt, "n": n, "max_tokens": max_tokens,
                                                    "logprobs": 1}).json() for prompt in BATCH]
    assert [{**c, "index": None} for c in body["choices"]] == [
        {**c, "index": None} for single in singles for c in single["choices"]]
    assert sum(s["usage"]["prompt_tokens"] for s in singles) == body["usage"]["prompt_tokens"]
    assert sum(s["usage"]["completion_tokens"] for s in singles) == body["usage"]["completion_tokens"]


def test_completion_batch_token_ids_and_echo(client: TestClient) -> None:
    # Token-id lists, echoed as their decoded text, each in front of its own choices.
    body = client.post("/v1/completions", json={"prompt": [[104, 105], [97, 98, 99]], "n": 2, "max_tokens": 3,
                                                "echo": True}).json()
    assert [c["text"] for c in body["choices"]] == [
        prompt + text for prompt in ("hi", "abc") for text in expected_texts(prompt, 2, 3)]
    assert body["usage"]["prompt_tokens"] == 5
    # A batch of one answers as the prompt alone.
    one = client.post("/v1/completions", json={"prompt": ["hi"], "max_tokens": 3}).json()
    alone = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).json()
    assert one["choices"] == alone["choices"] and one["usage"] == alone["usage"]


def test_completion_batch_stream(client: TestClient) -> None:
    n, max_tokens = 2, 4
    chunks = stream_chunks(client.post("/v1/completions", json={
        "prompt": BATCH, "n": n, "max_tokens": max_tokens, "logprobs": 1, "stream": True,
        "stream_options": {"include_usage": True}}))
    # One usage chunk, at the end, summing over prompts and choices.
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 12, "completion_tokens": 21, "total_tokens": 33}
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1
    order = [c["choices"][0]["index"] for c in chunks[:-1]]
    for p, prompt in enumerate(BATCH):
        for i in range(n):
            mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == p * n + i]
            assert "".join(c["text"] for c in mine) == expected_texts(prompt, n, max_tokens)[i]
            assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["stop" if i == 1 else "length"]
            joined = {k: [v for c in mine for v in c["logprobs"][k]] for k in
                      ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
            assert joined == expected_completion_logprobs(prompt, i, max_tokens, 1)
    # The prompts run together, their chunks interleaved: prompt 2 has more than
    # its first output (one chunk per choice) out before prompt 0's last chunk.
    prompt_of = [index // n for index in order]
    last_of_0 = len(prompt_of) - 1 - prompt_of[::-1].index(0)
    assert prompt_of[:last_of_0].count(2) > n, prompt_of
    # With echo, every choice's prompt comes first, in index order.
    chunks = stream_chunks(client.post("/v1/completions", json={
        "prompt": ["ab", "xyz"], "n": 2, "max_tokens": 2, "echo": True, "stream": True}))
    assert [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks[:4]] == [
        (0, "ab"), (1, "ab"), (2, "xyz"), (3, "xyz")]
    for p, prompt in enumerate(["ab", "xyz"]):
        for i in range(2):
            text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == p * 2 + i)
            assert text == prompt + expected_texts(prompt, 2, 2)[i]


def test_completion_batch_errors_before_anything_runs(engine: EchoEngine, client: TestClient) -> None:
    cases = [  # (body, param, what the message says)
        ({"prompt": []}, "prompt", "prompt must not be empty"),
        ({"prompt": ["a", ""]}, "prompt", "prompt[1] must not be empty"),
        ({"prompt": [[104], []]}, "prompt", "prompt[1] must not be empty"),
        ({"prompt": [[104], [104, 300]]}, "prompt", "prompt[1] token id 300 is outside the vocabulary"),
        ({"prompt": ["ab", "cd", "x" * MAX_MODEL_LEN]}, "prompt", f"prompt[2] is {MAX_MODEL_LEN} tokens long"),
        ({"prompt": ["a", "b" * 50], "max_tokens": 20}, "max_tokens", "70 were requested (50 in the prompt[1]"),
        ({"prompt": ["a"] * (MAX_PROMPTS_PER_REQUEST + 1)}, "prompt", f"prompt holds {MAX_PROMPTS_PER_REQUEST + 1} prompts; at most {MAX_PROMPTS_PER_REQUEST}"),
        ({"prompt": ["a", "b"], "temperature": -1}, "temperature", "temperature"),
        ({"prompt": [[104], ["a"]]}, "prompt", "prompt must be"),
        ({"prompt": ["a", "\ud800"]}, "prompt", "prompt[1] is not valid Unicode text"),
        ({"prompt": ["a"] * 65, "n": 2}, "n", "this request asks for 65 prompts x n=2 = 130 completions"),
    ]
    for body, param, match in cases:
        for stream in (False, True):
            err = assert_error(post_json(client, "/v1/completions", {**body, "stream": stream}), 400, param, match)
            assert err["message"].startswith(match) or param != "prompt", err  # not "prompt: prompt[1] ..."
    assert engine.started == []  # nothing reached the engine


def test_completion_batch_failure_aborts_the_other_prompts() -> None:
    # One prompt fails after others started; every other prompt's request is closed.
    for fail, fail_after in ((True, None), (False, 2)):
        engine = EchoEngine(fail=fail, fail_after=fail_after, fail_on="boom")
        client = TestClient(build_app(engine), raise_server_exceptions=False)
        for stream in (False, True):
            engine.started.clear()
            engine.aborted.clear()
            resp = client.post("/v1/completions", json={"prompt": ["abcdef", "boom", "xyz"], "max_tokens": 30,
                                                        "stream": stream})
            if stream and fail_after is not None:  # failed after the stream began: reported in-band
                events = sse_events(resp.text)
                assert events[-1] == "[DONE]" and "engine died" in json.loads(events[-2])["error"]["message"]
            else:
                assert_error(resp, 500, match="boom" if fail else "engine died")
            assert len(engine.started) == 3
            others = [rid for rid in engine.started if not rid.endswith("-1")]
            assert set(others) <= set(engine.aborted), (engine.started, engine.aborted)
            if fail_after is not None:
                assert sorted(engine.aborted) == sorted(engine.started)


def test_completion_batch_stream_closed_early_aborts_all(engine: EchoEngine, client: TestClient) -> None:
    with client.stream("POST", "/v1/completions", json={"prompt": BATCH, "max_tokens": 40, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break
    for _ in range(50):
        if len(engine.aborted) == len(BATCH):
            break
        asyncio.run(asyncio.sleep(0.01))
    assert sorted(engine.aborted) == sorted(engine.started) and len(engine.started) == len(BATCH)


def test_completion_batch_cancelled_aborts_all() -> None:
    """A client that goes during a non-streaming batch cancels the handler (see
    api_server._cancel_on_disconnect): every prompt's request is aborted."""
    async def main() -> None:
        engine = EchoEngine(step_delay=0.002)
        serving = OpenAIServingCompletion(engine)
        task = asyncio.ensure_future(serving.create_completion(
            CompletionRequest.model_validate({"prompt": BATCH, "max_tokens": 50})))
        await asyncio.sleep(0.02)
        assert len(engine.started) == len(BATCH) and not engine.aborted and not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(engine.aborted) == sorted(engine.started)

    asyncio.run(main())


@pytest.mark.parametrize("stream", [False, True])
def test_completion_batch_request_timeout_aborts_all(stream: bool) -> None:
    engine = EchoEngine(step_delay=0.02)  # 50 steps: 1 s, past the 0.3 s timeout
    client = TestClient(build_app(engine, request_timeout=0.3), raise_server_exceptions=False)
    resp = client.post("/v1/completions", json={"prompt": BATCH, "max_tokens": 50, "stream": stream,
                                                "stream_options": {"include_usage": True} if stream else None})
    if stream:
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        chunks = [json.loads(e) for e in events[:-2]]
        # Every prompt's choice ends with "abort", then one usage chunk.
        finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks[:-1]
                    if c["choices"][0]["finish_reason"]}
        assert finishes == {0: "abort", 1: "abort", 2: "abort"}
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 12
    else:
        assert assert_error(resp, 504)["code"] == "request_timeout"
    assert sorted(engine.aborted) == sorted(engine.started) and len(engine.started) == len(BATCH)


def test_completion_batch_shutdown_aborts_all() -> None:
    async def main() -> None:
        engine = EchoEngine(step_delay=0.002)
        supervisor = RequestSupervisor(engine)
        task = asyncio.ensure_future(OpenAIServingCompletion(supervisor).create_completion(
            CompletionRequest.model_validate({"prompt": BATCH, "max_tokens": 50})))
        await asyncio.sleep(0.02)
        assert supervisor.abort_all() == len(BATCH)
        with pytest.raises(APIError) as e:
            await task
        assert e.value.body.error.code == "server_shutting_down"
        assert sorted(engine.aborted) == sorted(engine.started) and len(engine.started) == len(BATCH)

    asyncio.run(main())


@pytest.mark.parametrize("field, value", [("logit_bias", {"5": 1.0}), ("allowed_token_ids", [5]),
                                          ("bad_words", ["x"]), ("min_tokens", 1), ("prompt_logprobs", 0),
                                          ("include_stop_str_in_output", True)])
def test_beam_search_refuses_sampling_fields(field: str, value: object) -> None:
    from ember.entrypoints.openai.protocol import CompletionRequest

    request = CompletionRequest.model_validate({"prompt": "hi", "use_beam_search": True, "n": 2, field: value})
    with pytest.raises(ValueError, match=f"^{field} is not supported with use_beam_search"):
        request.check_beam_search()
