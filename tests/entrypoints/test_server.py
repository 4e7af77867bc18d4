"""The real server (``ember serve`` in a subprocess) on the bundled SmolLM2-135M-Instruct,
driven with the official ``openai`` client and raw HTTP for malformed requests."""

from __future__ import annotations

import json
import math
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
        assert f"{srv.url}/v1" in srv.log_tail(1 << 20)  # the URL is logged (before the /health polls)
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
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}], stream=True)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, frequency_penalty=2.5)
    assert_error(httpx.post(url, json={**good, "top_logprobs": 2}), 400, "top_logprobs", "logprobs")
    assert_error(httpx.post(url, json={**good, "n": 0}), 400, "n", "n must be")


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
    base = {"model": MODEL, "prompt": "Salted prompt", "max_tokens": 3, "temperature": 0}
    plain = client.completions.create(**base)
    salted = client.completions.create(**base, extra_body={"priority": 5, "cache_salt": "tenant-a"})
    assert salted.choices[0].text == plain.choices[0].text  # the salt changes caching, not the output
    assert_error(httpx.post(f"{server}/v1/completions", json={**base, "cache_salt": ""}), 400, match="cache_salt")
    assert_error(httpx.post(f"{server}/v1/completions", json={**base, "priority": "high"}), 400, "priority")


# ---------------------------------------------------------------- n, logprobs, seeds, penalties, echo

PROMPT = "The capital of France is"


def test_chat_n_seeded_stream_matches_non_stream(client: openai.OpenAI) -> None:
    """n=3 sampled choices with a seed: reproducible (the stream repeats the
    non-streamed answer choice by choice) and different from each other."""
    kwargs = {"model": MODEL, "messages": QUESTION, "n": 3, "temperature": 1.0, "seed": 1234, "max_tokens": 5,
              "logprobs": True}
    resp = client.chat.completions.create(**kwargs)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [c.message.content for c in resp.choices]
    assert len(set(texts)) > 1, texts  # completion i samples with seed + i
    # usage sums the choices: one logprob per text token, plus the EOS of a "stop" choice.
    assert resp.usage.completion_tokens == sum(len(c.logprobs.content) + (c.finish_reason == "stop")
                                               for c in resp.choices)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == resp.usage
    assert all(len(c.choices) == 1 for c in chunks[:-1])
    choice_chunks = [c.choices[0] for c in chunks[:-1]]
    assert [(c.index, c.delta.role) for c in choice_chunks[:3]] == [(0, "assistant"), (1, "assistant"),
                                                                    (2, "assistant")]
    for choice in resp.choices:
        mine = [c for c in choice_chunks if c.index == choice.index]
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
        assert mine[-1].finish_reason == choice.finish_reason
        # Same tokens; the logprobs agree up to float rounding (the second request's
        # prompt comes from the prefix cache, so its prefill computes fewer positions).
        streamed = [e for c in mine if c.logprobs for e in c.logprobs.content]
        assert [e.token for e in streamed] == [e.token for e in choice.logprobs.content]
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in choice.logprobs.content], abs=1e-4)


def test_completion_n_seeded(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPT, "n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 4}
    resp = client.completions.create(**kwargs)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.text for c in resp.choices}) > 1
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == resp.usage
    for choice in resp.choices:
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]


def check_top1(chosen_token: str, chosen_logprob: float, top: list[tuple[str, float]]) -> None:
    """Greedy decoding's definition: the chosen token is the most likely one."""
    assert top and all(lp <= 0 for _, lp in top)
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert sum(math.exp(lp) for _, lp in top) <= 1 + 1e-4
    assert top[0][0] == chosen_token and math.isclose(top[0][1], chosen_logprob, abs_tol=1e-5)


def test_chat_logprobs_greedy(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8,
                                          logprobs=True, top_logprobs=5)
    choice = resp.choices[0]
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens - (choice.finish_reason == "stop")
    for e in content:
        assert len(e.top_logprobs) == 5 and e.logprob <= 0
        check_top1(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
        assert e.bytes == list(e.token.encode()) or "\ufffd" in e.token
        assert all(t.bytes is not None for t in e.top_logprobs)
    # The tokens' bytes join into the answer's text.
    assert b"".join(bytes(e.bytes) for e in content).decode() == choice.message.content


def test_completion_logprobs(client: openai.OpenAI) -> None:
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=5, logprobs=3,
                                       extra_body={"ignore_eos": True})
    lp = greedy.choices[0].logprobs
    assert "".join(lp.tokens) == greedy.choices[0].text and len(lp.tokens) == 5
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3  # the chosen token is among the 3 most likely: no extra entry
        check_top1(token, logprob, sorted(top.items(), key=lambda kv: -kv[1]))
    # Sampling: the chosen token is reported even when it is not among the top ones.
    sampled = client.completions.create(model=MODEL, prompt=PROMPT, temperature=1.5, seed=3, max_tokens=5,
                                        logprobs=1, extra_body={"ignore_eos": True})
    lp = sampled.choices[0].logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top and top[token] == logprob and logprob <= max(top.values()) <= 0
        assert 1 <= len(top) <= 2


def test_echo_logprobs_score_the_prompt(server: str, client: openai.OpenAI) -> None:
    """echo + logprobs, as eval harnesses score a text (lm-eval's loglikelihood
    requests: token-id prompt, max_tokens 1, echo, logprobs 1): the prompt's
    tokens get logprobs too, the first with nulls. Checked against the sampler's
    logprobs of the same tokens when they were generated."""
    gen = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4, logprobs=2,
                                    extra_body={"ignore_eos": True})
    ids = httpx.post(f"{server}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    # The generated tokens' ids: each token's text is one token of this vocabulary.
    new_ids = [httpx.post(f"{server}/tokenize", json={"prompt": t, "add_special_tokens": False}).json()["tokens"]
               for t in gen.choices[0].logprobs.tokens]
    assert all(len(t) == 1 for t in new_ids), new_ids
    new_ids = [t[0] for t in new_ids]
    for stream in (False, True):
        kwargs = dict(model=MODEL, prompt=ids + new_ids, max_tokens=1, temperature=0, logprobs=2, echo=True)
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            lp = chunks[0].choices[0].logprobs  # the echoed prompt comes first, with its logprobs
            text = chunks[0].choices[0].text
        else:
            choice = client.completions.create(**kwargs).choices[0]
            lp, text = choice.logprobs, choice.text
            assert len(lp.tokens) == len(ids) + len(new_ids) + 1  # and the one generated token
        assert text.startswith(PROMPT + gen.choices[0].text)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
        assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
        assert all(len(t) <= 3 for t in lp.top_logprobs[1:])  # 2 alternatives + the token itself
        scored = lp.token_logprobs[len(ids): len(ids) + len(new_ids)]
        assert len(scored) == len(new_ids) == 4
        for got, want in zip(scored, gen.choices[0].logprobs.token_logprobs, strict=True):
            assert abs(got - want) < 1e-4, (scored, gen.choices[0].logprobs.token_logprobs)


def test_greedy_n_echo_and_stop_strings(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4).choices[0].text
    assert "." in plain  # " Paris. ..." on this model
    # Greedy with n > 1 is allowed: n identical choices; echo puts the prompt first.
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4, echo=True, n=3)
    assert [c.text for c in echoed.choices] == [PROMPT + plain] * 3
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + plain
    # A stop string ends each choice before it; the text does not hold it.
    resp = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4, stop=["."], n=2)
    assert [(c.text, c.finish_reason) for c in resp.choices] == [(plain.split(".")[0], "stop")] * 2
    assert all(c.model_extra["stop_reason"] == "." for c in resp.choices)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16,
                                                  stop="Paris", stream=True))
    assert "Paris" not in "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_penalties_change_greedy_output(client: openai.OpenAI) -> None:
    """On a repetitive prompt, each penalty changes the greedy answer. The logprobs
    are the model's raw ones (before penalties): without a penalty every chosen
    token is the raw top-1; with one, some chosen token is not."""
    base = {"model": MODEL, "prompt": "hello hello hello hello hello hello", "temperature": 0, "max_tokens": 4,
            "logprobs": 1}

    def run(**penalty):
        resp = client.completions.create(**base, extra_body={"ignore_eos": True, **penalty})
        lp = resp.choices[0].logprobs
        raw_top1 = [max(top, key=top.get) == token for token, top in zip(lp.tokens, lp.top_logprobs, strict=True)]
        return resp.choices[0].text, raw_top1

    plain, plain_top1 = run()
    assert all(plain_top1)
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        text, top1 = run(**penalty)
        assert text != plain, penalty
        assert not all(top1), penalty


def test_completion_batch_of_prompts(server: str, client: openai.OpenAI) -> None:
    """Several prompts in one request, greedy with n=2: prompt p's choices (p * 2 and
    p * 2 + 1) are what the prompt alone gives, streamed or not, as strings or token ids."""
    prompts = [PROMPT, "1, 2, 3, 4,", "Once upon a time"]
    kwargs = {"model": MODEL, "temperature": 0, "max_tokens": 6}
    singles = [client.completions.create(prompt=p, **kwargs) for p in prompts]
    expected = [(s.choices[0].text, s.choices[0].finish_reason) for s in singles for _ in range(2)]
    batch = client.completions.create(prompt=prompts, n=2, **kwargs)
    assert [c.index for c in batch.choices] == list(range(6))
    assert [(c.text, c.finish_reason) for c in batch.choices] == expected
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in singles)
    chunks = list(client.completions.create(prompt=prompts, n=2, stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    assert chunks[-1].choices == [] and chunks[-1].usage == batch.usage
    assert all(len(c.choices) == 1 for c in chunks[:-1])
    streamed = [("".join(c.choices[0].text for c in chunks[:-1] if c.choices[0].index == k),
                 [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].index == k][-1]) for k in range(6)]
    assert streamed == expected
    token_ids = [httpx.post(f"{server}/tokenize", json={"prompt": p}).json()["tokens"] for p in prompts]
    by_ids = client.completions.create(prompt=token_ids, n=2, **kwargs)
    assert [(c.text, c.finish_reason) for c in by_ids.choices] == expected
    assert by_ids.usage == batch.usage
