"""vLLM's sampling fields on the real server (``ember serve`` in a subprocess, the
bundled SmolLM2-135M-Instruct in float32, asynchronous scheduling on as on CUDA),
driven with the official ``openai`` client (raw HTTP for malformed values), each
field streamed and not, with its effect on the output checked:
``logit_bias``, ``allowed_token_ids``, ``min_tokens``, ``bad_words``,
``include_stop_str_in_output``, ``prompt_logprobs`` (against HF transformers'
``log_softmax`` of the prompt), ``return_tokens_as_token_ids``,
``skip_special_tokens`` / ``spaces_between_special_tokens``,
``truncate_prompt_tokens``; bad values answer 400 naming the field."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.entrypoints.server_process import MODEL, launch_server
from tests.models.tiny import load_hf_gguf

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 256
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ID = re.compile(r"token_id:(\d+)")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with launch_server("--kv-cache-memory", "128M", "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32",
                       "--async-scheduling") as srv:
        yield srv.url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120)


def tokenize(server: str, text: str, special: bool = False) -> list[int]:
    return httpx.post(f"{server}/tokenize", json={"prompt": text, "add_special_tokens": special}).json()["tokens"]


def token_id(server: str, text: str) -> int:
    (tid,) = tokenize(server, text)
    return tid


def completion(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, list[int], str, int]:
    """(text, token ids, finish reason, completion tokens) of one completion, streamed
    or not; token ids come from ``return_tokens_as_token_ids`` logprobs."""
    body = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 8, "logprobs": 0, **kwargs}
    extra = {"return_tokens_as_token_ids": True, **body.pop("extra_body", {})}
    if not stream:
        choice = (resp := client.completions.create(**body, extra_body=extra)).choices[0]
        return (choice.text, [int(ID.fullmatch(t).group(1)) for t in choice.logprobs.tokens], choice.finish_reason,
                resp.usage.completion_tokens)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True},
                                            extra_body=extra))
    choices = [c.choices[0] for c in chunks[:-1]]
    assert all(c.finish_reason is None for c in choices[:-1]) and choices[-1].finish_reason is not None
    ids = [int(ID.fullmatch(t).group(1)) for c in choices for t in (c.logprobs.tokens if c.logprobs else [])]
    return "".join(c.text for c in choices), ids, choices[-1].finish_reason, chunks[-1].usage.completion_tokens


def chat(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, list[int], str, int]:
    """As :func:`completion`, for a chat completion of QUESTION."""
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 24, "logprobs": True, **kwargs}
    extra = {"return_tokens_as_token_ids": True, **body.pop("extra_body", {})}
    if not stream:
        resp = client.chat.completions.create(**body, extra_body=extra)
        choice = resp.choices[0]
        return (choice.message.content, [int(ID.fullmatch(e.token).group(1)) for e in choice.logprobs.content],
                choice.finish_reason, resp.usage.completion_tokens)
    chunks = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True},
                                                 extra_body=extra))
    choices = [c.choices[0] for c in chunks[:-1]]
    assert choices[0].delta.role == "assistant"
    assert all(c.finish_reason is None for c in choices[:-1]) and choices[-1].finish_reason is not None
    ids = [int(ID.fullmatch(e.token).group(1)) for c in choices for e in (c.logprobs.content if c.logprobs else [])]
    return ("".join(c.delta.content or "" for c in choices), ids, choices[-1].finish_reason,
            chunks[-1].usage.completion_tokens)


BOTH = [pytest.param(completion, id="completions"), pytest.param(chat, id="chat")]


@pytest.mark.parametrize("create", BOTH)
def test_logit_bias_bans_and_forces(server: str, client: openai.OpenAI, create) -> None:
    text, ids, _, _ = create(client, False)
    for stream in (False, True):
        assert create(client, stream)[:2] == (text, ids)  # return_tokens_as_token_ids: the ids are real
        banned_text, banned_ids, _, _ = create(client, stream, logit_bias={str(ids[0]): -100})
        assert ids[0] not in banned_ids and banned_ids[0] != ids[0] and banned_text != text
        # A milder bias on the same token leaves the output alone.
        assert create(client, stream, logit_bias={str(ids[0]): -0.01})[:2] == (text, ids)
        berlin = token_id(server, " Berlin")
        forced_text, forced_ids, finish, n = create(client, stream, logit_bias={str(berlin): 100}, max_tokens=3)
        assert forced_ids == [berlin] * 3 and forced_text == " Berlin" * 3 and (finish, n) == ("length", 3)


@pytest.mark.parametrize("create", BOTH)
def test_allowed_token_ids(server: str, client: openai.OpenAI, create) -> None:
    allowed = [token_id(server, w) for w in (" Berlin", " London", " Rome")]
    for stream in (False, True):
        text, ids, _, _ = create(client, stream, max_tokens=5, extra_body={"allowed_token_ids": allowed})
        assert len(ids) == 5 and set(ids) <= set(allowed) and text.replace(" Berlin", "").replace(
            " London", "").replace(" Rome", "") == ""


def test_min_tokens_prevents_eos(client: openai.OpenAI) -> None:
    text, ids, finish, n = chat(client, False, max_tokens=64)
    assert finish == "stop" and n < 30  # the model ends its answer with EOS early
    for stream in (False, True):
        longer, longer_ids, finish, m = chat(client, stream, max_tokens=64, extra_body={"min_tokens": 40})
        assert m > 40 and longer.startswith(text) and len(longer) > len(text)
        # A chat's EOS is <|im_end|>: no earlier copy of it among the tokens.
        assert 2 not in longer_ids[:40]
        assert chat(client, stream, max_tokens=64, extra_body={"min_tokens": 3})[:3] == (text, ids, "stop")


@pytest.mark.parametrize("create, words", [(completion, ["Paris"]), (chat, ["capital of", " Paris"])])
def test_bad_words_never_appear(client: openai.OpenAI, create, words) -> None:
    text, _, _, _ = create(client, False)
    assert all(w.strip() in text for w in words)
    for stream in (False, True):
        other, _, _, _ = create(client, stream, extra_body={"bad_words": words})
        assert other and all(w.strip() not in other for w in words), other


@pytest.mark.parametrize("create", BOTH)
def test_include_stop_str_in_output(client: openai.OpenAI, create) -> None:
    text, _, _, _ = create(client, False)
    assert "." in text
    for stream in (False, True):
        cut, _, finish, _ = create(client, stream, stop=["."])
        kept, kept_ids, finish2, _ = create(client, stream, stop=["."], extra_body={"include_stop_str_in_output": True})
        assert (finish, finish2) == ("stop", "stop")
        assert cut == text[:text.index(".")] and kept == cut + "."


def test_include_stop_str_keeps_the_stop_token(client: openai.OpenAI) -> None:
    """With include_stop_str_in_output the final EOS is part of the text (shown with
    skip_special_tokens off) and of the logprobs."""
    text, ids, finish, n = chat(client, False, max_tokens=64)
    assert finish == "stop" and len(ids) == n - 1
    for stream in (False, True):
        body = {"include_stop_str_in_output": True, "skip_special_tokens": False}
        kept, kept_ids, _, m = chat(client, stream, max_tokens=64, extra_body=body)
        assert kept == text + "<|im_end|>" and kept_ids == ids + [2] and m == n


@pytest.mark.parametrize("stream", [False, True])
def test_special_tokens_in_text(server: str, client: openai.OpenAI, stream: bool) -> None:
    """A special token forced with logit_bias: dropped from the text by default,
    kept with skip_special_tokens off; byte-level BPE decodes special tokens
    without spaces between them, with or without spaces_between_special_tokens."""
    start = token_id(server, "<|im_start|>")
    bias = {str(start): 100}
    text, ids, _, _ = completion(client, stream, logit_bias=bias, max_tokens=3)
    assert ids == [start] * 3 and text == ""
    for spaces in (True, False):
        shown, _, _, _ = completion(client, stream, logit_bias=bias, max_tokens=3,
                                    extra_body={"skip_special_tokens": False, "spaces_between_special_tokens": spaces})
        assert shown == "<|im_start|>" * 3


@pytest.mark.parametrize("stream", [False, True])
def test_return_tokens_as_token_ids(server: str, client: openai.OpenAI, stream: bool) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 5, "logprobs": 2}
    plain = client.completions.create(**kwargs).choices[0]
    as_ids = completion(client, stream, max_tokens=5, logprobs=2)
    assert as_ids[0] == plain.text
    ids = as_ids[1]
    assert httpx.post(f"{server}/detokenize", json={"tokens": ids}).json()["prompt"] == plain.text
    if not stream:
        lp = client.completions.create(**kwargs, extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
        assert lp.tokens == [f"token_id:{t}" for t in ids]
        assert lp.text_offset == plain.logprobs.text_offset  # offsets still count the text
        assert lp.token_logprobs == plain.logprobs.token_logprobs
        assert all(len(top) == 2 and all(ID.fullmatch(k) for k in top) for top in lp.top_logprobs)
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 5, "logprobs": True,
            "top_logprobs": 2, "extra_body": {"return_tokens_as_token_ids": True}}
    if stream:
        entries = [e for c in client.chat.completions.create(**body, stream=True) if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]
    else:
        entries = client.chat.completions.create(**body).choices[0].logprobs.content
    assert len(entries) == 5 and all(ID.fullmatch(e.token) for e in entries)
    assert all(len(e.top_logprobs) == 2 and all(ID.fullmatch(t.token) for t in e.top_logprobs) for e in entries)
    # bytes stay the tokens' own bytes: they join into the text.
    text = client.chat.completions.create(**{**body, "extra_body": {}}).choices[0].message.content
    assert b"".join(bytes(e.bytes) for e in entries).decode() == text


@pytest.fixture(scope="module")
def hf_model(smollm2_path: str) -> Any:
    return load_hf_gguf(smollm2_path)


def check_prompt_logprobs(plp: list, prompt_ids: list[int], k: int, hf: Any) -> None:
    """vLLM's shape (null, then {token id: {logprob, rank, decoded_token}} with the
    prompt token first and the k most likely after it) and HF's values within 1e-4."""
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([prompt_ids])).logits[0].float().log_softmax(dim=-1)
    assert len(plp) == len(prompt_ids) and plp[0] is None
    for pos in range(1, len(prompt_ids)):
        entry, tok, want = plp[pos], prompt_ids[pos], ref[pos - 1]
        keys = [int(t) for t in entry]
        values = list(entry.values())
        assert keys[0] == tok and len(set(keys)) == len(keys)
        for t, v in zip(keys, values, strict=True):
            assert abs(v["logprob"] - want[t].item()) < 1e-4, (pos, t, v, want[t].item())
            assert isinstance(v["decoded_token"], str)
        # The prompt token's rank, as HF ranks it (ties within 1e-4 either way).
        ties = int(((want - want[tok]).abs() < 1e-4).sum()) - 1
        assert abs(values[0]["rank"] - (1 + int((want > want[tok]).sum()))) <= ties
        # The k most likely tokens, ranked 1..k: the prompt token is one of them only if its rank is.
        top = sorted((v["rank"], v["logprob"]) for t, v in zip(keys, values) if t != tok or v["rank"] <= k)
        assert [r for r, _ in top] == list(range(1, k + 1)), entry
        assert torch.allclose(torch.tensor([lp for _, lp in top]), want.topk(k).values, atol=1e-4)


def test_prompt_logprobs_match_hf(server: str, client: openai.OpenAI, hf_model: Any) -> None:
    ids = tokenize(server, PROMPT, special=True)
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, n=2,
                                     extra_body={"prompt_logprobs": 3})
    for choice in resp.choices:
        check_prompt_logprobs(choice.model_extra["prompt_logprobs"], ids, 3, hf_model)
    chat_ids = httpx.post(f"{server}/tokenize", json={"messages": QUESTION}).json()["tokens"]
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, temperature=0,
                                          extra_body={"prompt_logprobs": 2})
    check_prompt_logprobs(resp.model_extra["prompt_logprobs"], chat_ids, 2, hf_model)
    # 0: only the prompt tokens themselves; echo + logprobs get their own count.
    resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1,
                                     extra_body={"prompt_logprobs": 0})
    plp = resp.choices[0].model_extra["prompt_logprobs"]
    assert all(len(e) == 1 and int(next(iter(e))) == t for e, t in zip(plp[1:], ids[1:], strict=True))
    assert all(len(top) <= 2 for top in resp.choices[0].logprobs.top_logprobs[1:])
    # Without the field nothing is added to the body.
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    assert "prompt_logprobs" not in plain.choices[0].model_extra
    # A stream has no body to carry them: 400 unless 0 (then ignored, as vLLM).
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, stream=True,
                                            extra_body={"prompt_logprobs": 0}))
    assert all("prompt_logprobs" not in c.choices[0].model_extra for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_truncate_prompt_tokens(server: str, client: openai.OpenAI, stream: bool) -> None:
    long_prompt = "Once upon a time in a land far away, there lived a king. " * 3 + PROMPT
    ids = tokenize(server, long_prompt, special=True)
    assert len(ids) > 20
    want = client.completions.create(model=MODEL, prompt=ids[-6:], max_tokens=6, temperature=0, echo=True)
    body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 6, "temperature": 0, "echo": True,
            "extra_body": {"truncate_prompt_tokens": 6}}
    if stream:
        chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks[:-1])
        usage = chunks[-1].usage
    else:
        resp = client.completions.create(**body)
        text, usage = resp.choices[0].text, resp.usage
    assert text == want.choices[0].text and usage.prompt_tokens == 6  # echo shows what is left of the prompt
    # -1: whatever fits next to max_tokens; a prompt that fits stays whole.
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"truncate_prompt_tokens": -1})
    assert resp.usage.prompt_tokens == len(tokenize(server, PROMPT, special=True))
    # Chat: the rendered conversation is cut the same way.
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, temperature=0,
                                          extra_body={"truncate_prompt_tokens": 5})
    assert resp.usage.prompt_tokens == 5


@pytest.mark.parametrize("create", BOTH)
def test_one_chunk_per_token_and_finish_reason_on_the_last(client: openai.OpenAI, create) -> None:
    """Every chunk carries one token (each of these tokens has text), and the last
    token's chunk carries the finish reason; a final EOS comes with empty text."""
    body = {"model": MODEL, "temperature": 0, "max_tokens": 6}
    if create is completion:
        chunks = list(client.completions.create(**body, prompt=PROMPT, stream=True, logprobs=0))
        texts = [c.choices[0].text for c in chunks]
        tokens = [len(c.choices[0].logprobs.tokens) for c in chunks]
    else:
        chunks = list(client.chat.completions.create(**body, messages=QUESTION, stream=True, logprobs=True))[1:]
        texts = [c.choices[0].delta.content for c in chunks]
        tokens = [len(c.choices[0].logprobs.content) for c in chunks]
    assert len(chunks) == 6 and tokens == [1] * 6 and all(texts)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 5 + ["length"]
    if create is chat:
        chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64,
                                                     stream=True))
        assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].delta.content == ""
        assert all(c.choices[0].delta.content for c in chunks[1:-1])


BAD_VALUES = [
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "x"}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": [5]}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"min_tokens": "3"}, "min_tokens"),
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words": "Paris"}, "bad_words"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [999999]}, "allowed_token_ids"),
    ({"allowed_token_ids": ["5"]}, "allowed_token_ids"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 100000}, "truncate_prompt_tokens"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    ({"return_tokens_as_token_ids": 1}, "return_tokens_as_token_ids"),
    ({"skip_special_tokens": "no"}, "skip_special_tokens"),
    ({"spaces_between_special_tokens": 3}, "spaces_between_special_tokens"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_values_answer_400_naming_the_field(server: str, path: str) -> None:
    base = {"messages": QUESTION} if "chat" in path else {"prompt": PROMPT}
    cases = BAD_VALUES + ([({"logprobs": True, "top_logprobs": 21}, "top_logprobs")] if "chat" in path
                          else [({"logprobs": 21}, "logprobs")])
    for extra, param in cases:
        resp = httpx.post(f"{server}{path}", json={"model": MODEL, "max_tokens": 16, **base, **extra}, timeout=60)
        assert resp.status_code == 400, (extra, resp.text)
        err = resp.json()["error"]
        assert err["param"] == param and param in err["message"], (extra, err)
