"""``ember bench serve``: statistics against numpy, Poisson arrivals against the
exponential law, SSE timing/parsing against a scripted mock server, and whole runs
against a real ``ember serve``."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from scipy import stats

from ember.entrypoints.bench import serve as bs
from ember.entrypoints.bench import serve_metrics as sm
from ember.entrypoints.cli import make_parser
from tests.entrypoints.server_process import MODEL, free_port, launch_server

# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_and_summary_match_numpy(n: int) -> None:
    values = np.random.default_rng(n).exponential(0.05, size=n)
    for q in (0, 10, 50, 90, 99, 99.9, 100):
        assert sm.percentile(list(values), q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-15)
    s = sm.summarize_ms("ttft", list(values))
    ms = values * 1e3
    assert s["mean_ttft_ms"] == pytest.approx(ms.mean())
    assert s["median_ttft_ms"] == pytest.approx(np.median(ms))
    assert s["std_ttft_ms"] == pytest.approx(ms.std(), abs=1e-9)
    assert s["p90_ttft_ms"] == pytest.approx(np.percentile(ms, 90))
    assert s["p99_ttft_ms"] == pytest.approx(np.percentile(ms, 99))


def test_statistics_edge_cases() -> None:
    assert set(sm.summarize_ms("itl", []).values()) == {None}
    with pytest.raises(ValueError, match="values"):
        sm.percentile([], 50)
    with pytest.raises(ValueError, match="q must"):
        sm.percentile([1.0], 101)


def test_poisson_arrivals_are_exponential_and_seeded() -> None:
    rate, n = 4.0, 20_000
    times = sm.poisson_arrival_times(n, rate, seed=7)
    assert times[0] == 0.0 and times == sorted(times)
    gaps = np.diff(times)
    # Mean and standard deviation of Exp(rate) are both 1/rate; the sample has n - 1 gaps.
    se = (1 / rate) / math.sqrt(n - 1)
    assert abs(gaps.mean() - 1 / rate) < 4 * se
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 1e-3
    # Arrival counts in unit windows of a Poisson process are Poisson(rate): variance == mean.
    counts = np.bincount(np.floor(times).astype(int))[:-1]
    assert counts.mean() == pytest.approx(rate, rel=0.05) and counts.var() == pytest.approx(rate, rel=0.15)
    assert sm.poisson_arrival_times(50, rate, seed=7) == times[:50]
    assert sm.poisson_arrival_times(50, rate, seed=8) != times[:50]
    assert sm.poisson_arrival_times(5, math.inf, seed=0) == [0.0] * 5
    with pytest.raises(ValueError, match="request_rate"):
        sm.poisson_arrival_times(5, 0.0, seed=0)


def test_compute_metrics_by_hand() -> None:
    ok1 = sm.RequestResult(True, "", 10, 5, ttft=0.2, e2el=1.0, itl=[0.1, 0.3, 0.2, 0.2])
    ok2 = sm.RequestResult(True, "", 6, 1, ttft=0.5, e2el=0.5, itl=[])
    bad = sm.RequestResult(False, "HTTP 400: too long", 900)
    m = sm.compute_metrics([ok1, bad, ok2], duration=2.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 16, 6)
    assert (m["request_throughput"], m["input_throughput"], m["output_throughput"]) == (1.0, 8.0, 3.0)
    assert m["total_token_throughput"] == 11.0
    assert m["mean_ttft_ms"] == pytest.approx(350) and m["median_e2el_ms"] == pytest.approx(750)
    # TPOT only where there are >= 2 output tokens: (1.0 - 0.2) / 4 s.
    assert m["mean_tpot_ms"] == pytest.approx(200) and m["p99_tpot_ms"] == pytest.approx(200)
    assert m["mean_itl_ms"] == pytest.approx(200) and m["p90_itl_ms"] == pytest.approx(np.percentile([100, 300, 200, 200], 90))
    none = sm.compute_metrics([bad], duration=1.0)
    assert none["completed"] == 0 and none["mean_ttft_ms"] is None and none["output_throughput"] == 0
    report = sm.format_report({"config": {"model": "m", "base_url": "u", "endpoint": "/e", "request_rate": "inf",
                                          "max_concurrency": None}, **none,
                               "requests": [{"success": False, "error": "HTTP 400: too long"}]})
    assert "n/a" in report and "1 x HTTP 400: too long" in report


# ---------------------------------------------------------------- SSE parsing on a scripted server


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def _text(t: str) -> bytes:
    return _sse({"choices": [{"index": 0, "text": t, "finish_reason": None}]})


def _endpoint(script: list[tuple[float, bytes]], status: int = 200, endpoint: str = bs.COMPLETIONS,
              ) -> tuple[bs.OpenAIEndpoint, list[dict]]:
    """An endpoint whose server answers every POST with ``script`` ((delay s, bytes) pieces)."""
    seen: list[dict] = []

    async def body() -> AsyncIterator[bytes]:
        for delay, piece in script:
            await asyncio.sleep(delay)
            yield piece

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append({**json.loads(request.content), "_auth": request.headers.get("authorization")})
        return httpx.Response(status, content=body())

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return bs.OpenAIEndpoint(client, "http://mock", endpoint, "m", api_key="k"), seen


def _send(ep: bs.OpenAIEndpoint, req: bs.BenchRequest, ignore_eos: bool = True) -> bs.RequestResult:
    return asyncio.run(ep.send(ep.payload(req, 0.0, ignore_eos, {"top_k": 5}), req.prompt_len))


def test_stream_timings_and_usage() -> None:
    gap = 0.05
    script = [(0.1, _text("a")), (gap, _text("b")), (gap, _text("")), (gap, _text("c")),
              (0, _sse({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4}})), (0, _sse("[DONE]"))]
    ep, seen = _endpoint(script)
    r = _send(ep, bs.BenchRequest("hi", 3, 4))
    assert r.success and r.error == ""
    assert r.output_tokens == 4 and r.prompt_len == 11  # usage wins over the client's counts
    assert r.ttft >= 0.1 and len(r.itl) == 2  # the empty-text chunk is no token
    assert r.itl[0] >= gap and r.itl[1] >= 2 * gap
    assert r.e2el >= r.ttft + sum(r.itl)
    assert r.tpot == pytest.approx((r.e2el - r.ttft) / 3)
    body = seen[0]
    assert body["prompt"] == "hi" and body["max_tokens"] == 4 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and body["top_k"] == 5
    assert body["_auth"] == "Bearer k"


def test_chat_stream_counts_chunks_without_usage() -> None:
    def delta(**d: str) -> bytes:
        return _sse({"choices": [{"index": 0, "delta": d, "finish_reason": None}]})

    script = [(0, delta(role="assistant", content="")), (0.02, delta(reasoning_content="hm")),
              (0.02, delta(content="x")), (0, _sse("[DONE]"))]
    ep, seen = _endpoint(script, endpoint=bs.CHAT)
    r = _send(ep, bs.BenchRequest("q", None, 2), ignore_eos=False)
    assert r.success and r.output_tokens == 2 and len(r.itl) == 1 and r.ttft >= 0.02
    assert seen[0]["messages"] == [{"role": "user", "content": "q"}] and seen[0]["max_completion_tokens"] == 2
    assert "ignore_eos" not in seen[0]


@pytest.mark.parametrize("script, status, match", [
    ([(0, b'{"error": {"message": "no such model", "type": "x"}}')], 404, "HTTP 404: no such model"),
    ([(0, b"<html>Bad Gateway</html>")], 502, "HTTP 502: <html>Bad Gateway"),
    ([(0, _text("a")), (0, _sse({"error": {"message": "engine died", "type": "internal_server_error"}}))],
     200, "stream error: engine died"),
    ([(0, _text("a")), (0, _text("b"))], 200, "without 'data: [DONE]'"),
    ([(0, b"data: {not json\n\n")], 200, "bad stream chunk"),
    ([(0, _sse("[DONE]"))], 200, "no choices"),
])
def test_failures_are_results_not_exceptions(script: list, status: int, match: str) -> None:
    ep, _ = _endpoint(script, status=status)
    r = _send(ep, bs.BenchRequest("hi", 2, 4))
    assert not r.success and match in r.error and r.tpot is None


def test_broken_connection_is_a_failed_result() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset by peer")

    ep = bs.OpenAIEndpoint(httpx.AsyncClient(transport=httpx.MockTransport(handler)), "http://mock",
                           bs.COMPLETIONS, "m")
    r = _send(ep, bs.BenchRequest("hi", 2, 4))
    assert not r.success and r.error == "ReadError: connection reset by peer"


def test_token_id_prompts_without_tokenize() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Not Found"})

    args = _args("--random-input-len", "20", "--random-output-len", "6", "--random-range-ratio", "0.5",
                 "--num-prompts", "50", "--random-vocab-size", "500")
    ep = bs.OpenAIEndpoint(httpx.AsyncClient(transport=httpx.MockTransport(handler)), "http://mock",
                           bs.COMPLETIONS, "m")
    reqs = asyncio.run(bs.random_requests(ep, args))
    assert len(reqs) == 50
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len and 10 <= r.prompt_len <= 30
        assert all(bs.FIRST_RANDOM_ID <= t < 500 for t in r.prompt) and 3 <= r.output_len <= 9
    assert len({r.prompt_len for r in reqs}) > 5  # the lengths do vary
    again = asyncio.run(bs.random_requests(ep, args))
    assert [r.prompt for r in again] == [r.prompt for r in reqs]  # seeded
    ep.endpoint = bs.CHAT
    with pytest.raises(ValueError, match="dataset"):
        asyncio.run(bs.random_requests(ep, args))


def test_exact_length_through_a_merging_tokenizer() -> None:
    """A toy tokenizer (BOS + characters, where "ab" merges into one token) that
    changes the length on every round trip."""
    async def detokenize(ids: list[int]) -> str:
        return "".join("ab"[t % 2] for t in ids)

    async def count(text: str) -> int:
        return 1 + len(text) - text.count("ab")

    for target in (1, 2, 5, 40):
        text, n = asyncio.run(bs.exact_length_prompt(target, detokenize, count, 1000, random.Random(target)))
        assert n == asyncio.run(count(text))
        assert n == max(target, 2)  # BOS plus at least one token


def _args(*flags: str) -> object:
    return make_parser().parse_args(["bench", "serve", "--no-progress", *flags])


def test_bad_flags_name_the_parameter(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for flags, name in ((("--random-range-ratio", "1.0"), "random_range_ratio"),
                        (("--request-rate", "0"), "request_rate"), (("--max-concurrency", "0"), "max_concurrency"),
                        (("--dataset", "jsonl"), "dataset_path")):
        assert bs.cmd_bench_serve(_args(*flags)) == 2
        assert name in capsys.readouterr().err
    assert bs.cmd_bench_serve(_args("--base-url", f"http://127.0.0.1:{free_port()}")) == 2
    assert "base_url: cannot list the models" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "output_len": 2}\n{"prompt": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        bs.read_jsonl(str(bad), 10)


# ---------------------------------------------------------------- a real ember serve


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    # NOTE: one torch thread: on a shared CPU, OpenMP threads waiting on each other
    # make every step several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with launch_server("--kv-cache-memory", "256M", "--max-model-len", "256", env=env) as srv:
        yield srv.url


FIELDS = {"duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
          "input_throughput", "output_throughput", "total_token_throughput",
          *(f"{s}_{m}_ms" for s in ("mean", "median", "std", "p90", "p99") for m in ("ttft", "tpot", "itl", "e2el"))}


def test_random_run_against_ember_serve(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "serve.json"
    args = _args("--base-url", server, "--num-prompts", "8", "--random-input-len", "16", "--random-output-len", "8",
                 "--max-concurrency", "4", "--request-rate", "50", "--output-json", str(out))
    assert bs.cmd_bench_serve(args) == 0
    table = capsys.readouterr().out
    assert "completed requests" in table and "p99 TTFT (ms)" in table
    result = json.loads(out.read_text())
    assert FIELDS <= set(result) and all(result[k] is not None for k in FIELDS)
    assert result["config"]["model"] == MODEL and result["config"]["max_concurrency"] == 4
    assert result["completed"] == 8 and result["failed"] == 0
    reqs = result["requests"]
    assert [r["output_tokens"] for r in reqs] == [r["output_len"] for r in reqs] == [8] * 8
    assert [r["prompt_len"] for r in reqs] == [16] * 8  # the server's usage: the prompts are exactly 16 tokens
    assert result["total_input_tokens"] == 128 and result["total_output_tokens"] == 64
    for r in reqs:
        assert r["success"] and 0 < r["ttft"] <= r["e2el"] and len(r["itl"]) <= 7
        assert r["tpot"] == pytest.approx((r["e2el"] - r["ttft"]) / 7)
    assert result["output_throughput"] == pytest.approx(64 / result["duration"])
    assert result["p99_e2el_ms"] <= result["duration"] * 1e3


def test_over_long_prompts_fail_with_the_server_message(server: str, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Hello there", "output_len": 3}, {"prompt": "word " * 400, "output_len": 3},
            {"prompt": "Count to three:", "output_len": 2}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _args("--base-url", server, "--dataset", "jsonl", "--dataset-path", str(data), "--num-prompts", "3",
                 "--max-concurrency", "2", "--endpoint", "/v1/chat/completions")
    result = bs.run_serve_benchmark(args)
    assert result["completed"] == 2 and result["failed"] == 1
    bad = result["requests"][1]
    assert not bad["success"] and bad["error"].startswith("HTTP 400: ") and "256" in bad["error"]
    assert [r["output_tokens"] for r in result["requests"]] == [3, 0, 2]
    assert result["total_output_tokens"] == 5


def test_random_chat_prompts_are_exact_with_the_template(server: str) -> None:
    args = _args("--base-url", server, "--endpoint", "/v1/chat/completions", "--num-prompts", "3",
                 "--random-input-len", "40", "--random-output-len", "2", "--random-range-ratio", "0.25")
    result = bs.run_serve_benchmark(args)
    assert result["completed"] == 3
    rng = random.Random(0)  # --seed 0: the input lengths are drawn first
    targets = bs._lengths(40, 0.25, 3, rng)
    # The server's usage counts the whole templated prompt: exactly the drawn length.
    assert [r["prompt_len"] for r in result["requests"]] == targets
    assert all(r["output_tokens"] == r["output_len"] for r in result["requests"])

