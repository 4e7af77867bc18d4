"""Bad input against the real server (bundled SmolLM2-135M-Instruct): hypothesis
fuzzing of the completion and chat request bodies, malformed bodies, and the 4xx
each kind of mistake gets. The contract: never a 5xx, always a JSON body (OpenAI's
error shape for 4xx; a well-formed answer or stream for 200), and the server stays
healthy. Plain hypothesis over hand-written strategies (no schemathesis): the
strategies know each field's valid range, so most examples sit near the edges.

Valid examples keep ``max_tokens`` at 1..3 (faults never make it unbounded), so
that each costs at most a few engine steps."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.entrypoints.server_process import MODEL, launch_server
from tests.entrypoints.test_server_lifecycle import (
    CLIENT_TIMEOUT_S,
    SERVER_ENV,
    wait_until_idle,
)

API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 512
VOCAB = 49152  # SmolLM2's vocabulary
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
NUM_EXAMPLES = 75  # per endpoint
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with launch_server("--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "128M", "--api-key", API_KEY,
                       env=SERVER_ENV) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers=AUTH, timeout=CLIENT_TIMEOUT_S) as client:
        yield client


# ---------------------------------------------------------------- checks


def assert_openai_error(resp: httpx.Response, status: int | None = None, param: str | None = None,
                        code: str | None = None) -> dict:
    """A 4xx with OpenAI's error body (and the given status / param / code, if any)."""
    assert 400 <= resp.status_code < 500 and (status is None or resp.status_code == status), \
        (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_sane_answer(resp: httpx.Response, body: object, chat: bool) -> None:
    """The contract for any request: no 5xx; a 4xx is an OpenAI error; a 200 is a
    complete answer (or stream) with ``n`` choices per prompt (a batch of prompts has several)."""
    assert resp.status_code < 500, (body, resp.status_code, resp.text[:1000])
    if resp.status_code != 200:
        assert_openai_error(resp)
        return
    prompt = body.get("prompt")
    n = (body.get("n") or 1) * (len(prompt) if isinstance(prompt, list) and not isinstance(prompt[0], int) else 1)
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e]
        assert events[-1] == "[DONE]", resp.text[-500:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), chunks
        finished = {ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]}
        assert finished == set(range(n)), chunks
        return
    answer = resp.json()
    assert answer["object"] == ("chat.completion" if chat else "text_completion")
    assert [c["index"] for c in answer["choices"]] == list(range(n))
    assert all(c["finish_reason"] in ("stop", "length") for c in answer["choices"])


# ---------------------------------------------------------------- strategies

# Valid values of each field; a body is built from these, then 0..3 faults are put in.
texts = st.text(max_size=30)
token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
length = st.integers(1, 3)


def unit(lo: float, hi: float) -> st.SearchStrategy:
    return st.floats(lo, hi) | st.sampled_from([lo, hi])


SHARED = {
    "model": st.just(MODEL) | st.none(),
    "n": st.integers(1, 2),
    "temperature": unit(0, 2),
    "top_p": unit(0.01, 1),
    "top_k": st.integers(-1, 50) | st.just(INT64_MAX),
    "min_p": unit(0, 1),
    "presence_penalty": unit(-2, 2),
    "frequency_penalty": unit(-2, 2),
    "repetition_penalty": unit(0.5, 2),
    "seed": st.integers(INT64_MIN, INT64_MAX) | st.sampled_from([INT64_MIN, INT64_MAX]),
    "stop": st.text(min_size=1, max_size=10) | st.lists(st.text(min_size=1, max_size=10), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "priority": st.integers(-10, 10) | st.sampled_from([INT64_MIN, INT64_MAX]),
    "cache_salt": st.text(min_size=1, max_size=10),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                         "continuous_usage_stats": st.booleans()}),
    "user": texts,
    # vLLM's sampling extras.
    "min_tokens": st.integers(0, 1),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), unit(-100, 100), max_size=3),
    "allowed_token_ids": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5),
    "bad_words": st.lists(st.text(min_size=1, max_size=10).filter(str.strip), max_size=3),
    "include_stop_str_in_output": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
    "truncate_prompt_tokens": st.just(-1) | st.integers(1, 50),
    "prompt_logprobs": st.integers(0, 3),
    "return_tokens_as_token_ids": st.booleans(),
}
COMPLETION = {
    **SHARED,
    "prompt": st.text(min_size=1, max_size=30) | token_ids | st.lists(st.text(min_size=1), min_size=1, max_size=1),
    "max_tokens": length,
    "logprobs": st.integers(0, 5),
    "echo": st.booleans(),
}
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": texts})
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"])},
                                optional={"content": texts | st.lists(text_part, max_size=2), "name": texts})
CHAT = {
    **SHARED,
    "messages": st.lists(message, min_size=1, max_size=3),
    "max_tokens": length,
    "max_completion_tokens": length,
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
}

# Faults: values at the edges of each field's type, or anything JSON can carry,
# including lone surrogates (JSON escapes such as "\\ud800", not text) and
# integers beyond int64 (both refused with a 400 naming the field).
any_text = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=10)
odd_texts = any_text | st.sampled_from(["", "\x00", " ", "😀" * 50, "\u202e", "a" * 5000, "\ud800", "x\udfffy",
                                        "\udc00\ud800"])
edge_ints = st.integers(-1000, 1000) | st.integers() | st.sampled_from(
    [2 ** 31, INT64_MAX, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 10 ** 30, INT64_MIN, INT64_MIN - 1, -(10 ** 30)])
odd_floats = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, -0.5, 1e-9])
scalars = st.none() | st.booleans() | edge_ints | st.floats() | odd_floats | odd_texts
any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(any_text, inner, max_size=3), max_leaves=6)
INT_FIELDS = ("n", "top_k", "seed", "priority", "max_tokens", "max_completion_tokens", "top_logprobs", "min_tokens",
              "truncate_prompt_tokens", "prompt_logprobs")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
EDGES = {
    **{name: edge_ints | st.booleans() | odd_floats for name in INT_FIELDS},
    **{name: odd_floats | edge_ints | st.booleans() | odd_texts for name in FLOAT_FIELDS},
    **{name: odd_texts | edge_ints for name in ("model", "cache_salt", "user")},
    "logprobs": edge_ints | st.booleans() | odd_floats,
    "stop": odd_texts | st.lists(odd_texts, max_size=3),
    "stop_token_ids": st.lists(edge_ints, min_size=1, max_size=3),
    "prompt": odd_texts | st.lists(edge_ints, min_size=1, max_size=3) | st.lists(st.text(max_size=5), min_size=2),
    "messages": st.lists(st.fixed_dictionaries({"role": odd_texts | st.sampled_from(["user", "tool"]),
                                                "content": odd_texts | any_json}), max_size=2),
}


def wrong_value(name: str, length_fields: tuple[str, ...]) -> st.SearchStrategy:
    """A likely invalid value for field ``name`` (never null for a length field,
    which would make the request unbounded)."""
    values = st.one_of(EDGES.get(name, any_json), EDGES.get(name, any_json), any_json)
    return values.filter(lambda v: v is not None) if name in length_fields else values


@st.composite
def request_bodies(draw: st.DrawFn, fields: dict[str, st.SearchStrategy], required: str,
                   length_fields: tuple[str, ...]) -> tuple[dict, list[str]]:
    """``(body, faults)``: a valid body (the required field, a small length, up to
    five more fields) with 0..3 faults put in: a field set to a likely invalid value,
    the required field removed, or an unknown field added. ``faults`` names them."""
    body = {required: draw(fields[required]), draw(st.sampled_from(length_fields)): draw(length)}
    for name in draw(st.sets(st.sampled_from(sorted(fields)), max_size=5)):
        body.setdefault(name, draw(fields[name]))
    # Combinations that are invalid on purpose (tested on their own elsewhere).
    if "top_logprobs" in body and required == "messages":
        body["logprobs"] = True
    if "stream_options" in body:
        body["stream"] = True
    if body.get("stream") and body.get("prompt_logprobs"):
        body["prompt_logprobs"] = 0  # a stream carries no prompt logprobs
    faults: list[str] = []
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["wrong", "wrong", "wrong", "missing", "unknown"]))
        if kind == "wrong":
            name = draw(st.sampled_from(sorted(fields)))
            body[name] = draw(wrong_value(name, length_fields))
        elif kind == "missing":
            name = required
            body.pop(required, None)
        else:
            name = draw(any_text.filter(lambda k: k and k not in fields))
            body[name] = draw(any_json)
        faults.append(name)
    return body, faults


def check_fuzzed(resp: httpx.Response, body: dict, faults: list[str], chat: bool) -> None:
    event(f"{len(faults)} faults, HTTP {resp.status_code}")  # --hypothesis-show-statistics
    assert_sane_answer(resp, body, chat)
    if not faults:
        assert resp.status_code == 200, (body, resp.text[:1000])  # every valid body is served
    elif resp.status_code == 400 and len(faults) == 1:  # the error points at the faulty field
        err = resp.json()["error"]
        # The name as the server reads it: JSON joins an escaped surrogate pair into one character.
        name = json.loads(json.dumps(faults[0]))
        assert err["param"] == name or name in err["message"], (body, err)


FUZZ_SETTINGS = settings(max_examples=NUM_EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ_SETTINGS
@given(case=request_bodies(COMPLETION, "prompt", ("max_tokens",)))
def test_fuzz_completions(http: httpx.Client, case: tuple[dict, list[str]]) -> None:
    body, faults = case
    resp = http.post("/v1/completions", content=json.dumps(body), headers=JSON)
    if not faults and resp.status_code == 400 and tokenizes_to_nothing(http, body["prompt"]):
        # A valid string of characters the tokenizer drops (e.g. "\x1d") is no prompt.
        err = assert_openai_error(resp, 400, param="prompt")
        assert "tokenizes to no tokens" in err["message"], err
        return
    check_fuzzed(resp, body, faults, chat=False)


def tokenizes_to_nothing(http: httpx.Client, prompt: object) -> bool:
    """Some text in ``prompt`` (a string or a list of strings) has no tokens, per ``/tokenize``."""
    texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
    return any(http.post("/tokenize", json={"prompt": t}).json()["count"] == 0 for t in texts)


@FUZZ_SETTINGS
@given(case=request_bodies(CHAT, "messages", ("max_tokens", "max_completion_tokens")))
def test_fuzz_chat_completions(http: httpx.Client, case: tuple[dict, list[str]]) -> None:
    body, faults = case
    resp = http.post("/v1/chat/completions", content=json.dumps(body), headers=JSON)
    check_fuzzed(resp, body, faults, chat=True)


# ---------------------------------------------------------------- malformed bodies and specific mistakes

GOOD = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}


@pytest.mark.parametrize("raw, headers", ids=[
    "empty", "null", "array", "number", "string", "trailing-comma", "single-quotes", "not-utf8", "deep-nesting",
    "text-plain", "form-urlencoded", "multipart"], argvalues=[
    (b"", JSON),
    (b"null", JSON),
    (b"[]", JSON),
    (b"17", JSON),
    (b'"a string"', JSON),
    (b'{"model": "x", "prompt": "a",}', JSON),  # trailing comma
    (b"{'prompt': 'single quotes'}", JSON),
    (b"\xff\xfe\x00{", JSON),  # not UTF-8
    (b"[" * 100_000 + b"]" * 100_000, JSON),  # nesting deeper than the JSON parser's recursion limit
    (json.dumps(GOOD).encode(), {"content-type": "text/plain"}),
    (b"prompt=Hello&max_tokens=2", {"content-type": "application/x-www-form-urlencoded"}),
    (json.dumps(GOOD).encode(), {"content-type": "multipart/form-data; boundary=x"}),
])
def test_malformed_bodies_get_400(http: httpx.Client, raw: bytes, headers: dict) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_openai_error(http.post(path, content=raw, headers=headers), 400)


def test_specific_mistakes_get_the_right_4xx(server: str, http: httpx.Client) -> None:
    url = "/v1/completions"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    # Out-of-range values name their parameter.
    for name, value in [("max_tokens", 0), ("max_tokens", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", -2),
                        ("min_p", 1.5), ("n", 0), ("n", 129), ("presence_penalty", 2.5),
                        ("frequency_penalty", -2.5), ("repetition_penalty", 0), ("logprobs", 21),
                        ("temperature", 1e308)]:
        assert_openai_error(http.post(url, json={**GOOD, name: value}), 400, param=name)
    assert_openai_error(http.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 21}),
                        400, param="top_logprobs")
    assert_openai_error(http.post("/v1/chat/completions", json={**chat, "max_completion_tokens": -5}), 400)
    # Wrong types, unknown parameters, unknown model, bad roles and token ids.
    assert_openai_error(http.post(url, json={**GOOD, "stream": "yes"}), 400, param="stream")
    assert_openai_error(http.post(url, json={**GOOD, "stop": [1, 2]}), 400, param="stop")
    assert_openai_error(http.post(url, json={**GOOD, "best_of": 2}), 400, param="best_of")
    assert_openai_error(http.post("/v1/chat/completions", json={**chat, "tools": []}), 400, param="tools")
    assert_openai_error(http.post(url, json={**GOOD, "model": "gpt-3.5-turbo-instruct"}), 404, param="model",
                        code="model_not_found")
    assert_openai_error(http.post("/v1/chat/completions",
                                  json={**chat, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_openai_error(http.post(url, json={**GOOD, "prompt": [VOCAB]}), 400, param="prompt")
    assert_openai_error(http.post(url, json={**GOOD, "prompt": [-1]}), 400, param="prompt")
    # Over-long prompts, as token ids and as a 1 MB string, streaming or not.
    for stream in (False, True):
        assert_openai_error(http.post(url, json={**GOOD, "prompt": [1] * MAX_MODEL_LEN, "stream": stream}), 400,
                            param="prompt")
    assert_openai_error(http.post(url, json={**GOOD, "prompt": "word " * 200_000}), 400, param="prompt")
    assert_openai_error(http.post(url, json={**GOOD, "prompt": [1] * (MAX_MODEL_LEN - 1), "max_tokens": 5}),
                        400, param="max_tokens")
    # Missing or wrong API key: 401 on /v1/*, whatever the body; probes need none.
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        for resp in (httpx.post(f"{server}{url}", json=GOOD, headers=headers),
                     httpx.post(f"{server}/v1/chat/completions", content=b"{", headers={**headers, **JSON}),
                     httpx.get(f"{server}/v1/models", headers=headers)):
            err = assert_openai_error(resp, 401, code="invalid_api_key")
            assert err["type"] == "authentication_error"
    assert httpx.get(f"{server}/health").status_code == 200
    # Unknown routes and methods.
    assert_openai_error(http.post("/v1/engines/x/completions", json=GOOD), 404)
    assert_openai_error(http.get(url), 405)
    # After all of it, the server still answers properly.
    ok = http.post(url, json={**GOOD, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


# Inputs that this file's fuzzing once found getting a 5xx or a 400 without ``param``:
# ints outside [-2**63, 2**64) overflowed msgpack on the way to the engine core (all
# integers must now be int64), lone surrogates (valid JSON escapes, but not Unicode
# text) broke the tokenizer or msgpack; each must be a 400 naming the field sent.
FORMER_SERVER_ERRORS = [
    ("/v1/completions", "priority", 10 ** 30),
    ("/v1/completions", "priority", -(2 ** 63) - 1),
    ("/v1/completions", "priority", 2 ** 63),
    ("/v1/completions", "seed", 2 ** 64),
    ("/v1/completions", "seed", 2 ** 63),
    ("/v1/completions", "top_k", 10 ** 30),
    ("/v1/completions", "top_k", 2 ** 63),
    ("/v1/completions", "stop_token_ids", [10 ** 30]),
    ("/v1/completions", "n", 2 ** 64),
    ("/v1/completions", "max_tokens", 2 ** 64),
    ("/v1/completions", "logprobs", 10 ** 30),
    ("/v1/completions", "prompt", [1, 10 ** 30]),
    ("/v1/chat/completions", "max_completion_tokens", 10 ** 30),
    ("/v1/chat/completions", "top_logprobs", -(10 ** 30)),
    ("/v1/completions", "prompt", "\ud800"),
    ("/v1/chat/completions", "messages", [{"role": "user", "content": "x\udfffy"}]),
    ("/v1/completions", "stop", ["\udfff"]),
    ("/v1/completions", "cache_salt", "\ud800"),
    ("/v1/completions", "cache_salt", ""),
    ("/v1/chat/completions", "max_completion_tokens", -5),
    ("/v1/completions", "\udc00x", 1),  # an unknown field whose name is not text
]


@pytest.mark.parametrize("path, name, value", FORMER_SERVER_ERRORS, ids=[
    f"{n.encode('unicode_escape').decode()}-{i}" for i, (_, n, _) in enumerate(FORMER_SERVER_ERRORS)])
def test_former_server_errors_get_400_naming_the_field(http: httpx.Client, path: str, name: str,
                                                       value: object) -> None:
    body = {"model": MODEL, "max_tokens": 2, name: value}
    body.setdefault("prompt" if path == "/v1/completions" else "messages",
                    "Hi" if path == "/v1/completions" else [{"role": "user", "content": "Hi"}])
    if name == "top_logprobs":
        body["logprobs"] = True
    resp = http.post(path, content=json.dumps(body), headers=JSON)
    assert_openai_error(resp, 400, param=name)


def test_int64_edges_are_served(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 2, "seed": INT64_MAX, "priority": INT64_MIN,
            "top_k": INT64_MAX, "stop_token_ids": [VOCAB - 1]}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert [c["index"] for c in resp.json()["choices"]] == [0, 1]
    # An int64 stop token id passes the type check but lies outside the vocabulary.
    assert_openai_error(http.post("/v1/completions", json={**body, "stop_token_ids": [INT64_MAX]}), 400,
                        param="stop_token_ids")


def test_server_healthy_after_fuzzing(server: str, http: httpx.Client) -> None:
    assert httpx.get(f"{server}/health").status_code == 200
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                   "max_tokens": 3, "temperature": 0})
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
    m = wait_until_idle(server)
    assert (m["ember:num_requests_running"], m["ember:kv_cache_usage_perc"]) == (0, 0), m
