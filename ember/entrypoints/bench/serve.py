"""``ember bench serve``: a load generator for any OpenAI-compatible server.

Sends ``num_prompts`` streaming requests to ``base_url + endpoint``
(``/v1/completions`` or ``/v1/chat/completions``) and measures, per request, from
the server-sent-event stream:

- TTFT (time to first token): request sent -> first chunk carrying generated text;
- ITL (inter-token latency): each gap between consecutive chunks carrying text;
- TPOT (time per output token): ``(e2el - ttft) / (output_tokens - 1)``;
- E2EL (end-to-end latency): request sent -> end of the stream;
- output tokens: ``usage.completion_tokens`` of the last chunk
  (``stream_options.include_usage``), else the number of text chunks.

Load: arrivals form a Poisson process of rate ``request_rate`` (exponential
inter-arrival times, seeded; ``inf`` sends everything at once) and/or at most
``max_concurrency`` requests are in flight (a semaphore; latencies are timed from
the moment a request is sent, not from its arrival). Metric names follow vLLM's
``benchmark_serving`` (``mean_ttft_ms``, ``p99_itl_ms``, ``request_throughput``...);
they are computed in :mod:`ember.entrypoints.bench.serve_metrics`.

Prompts: ``random`` builds prompts of exact token lengths from random token ids,
through the server's ``/tokenize`` and ``/detokenize`` (Ember and vLLM have them),
else as token-id prompts (``/v1/completions`` only); ``jsonl`` reads
``{"prompt": str, "output_len": int}`` per line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from ember.entrypoints.bench.serve_metrics import (
    RequestResult,
    compute_metrics,
    format_report,
    poisson_arrival_times,
)

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
# Random prompt ids are drawn from [FIRST_RANDOM_ID, vocab): low ids are special
# tokens (BOS/EOS/pad) in most vocabularies.
FIRST_RANDOM_ID = 100
MAX_LENGTH_FIXES = 10  # detokenize -> tokenize rounds to hit an exact prompt length


# ---------------------------------------------------------------- requests


@dataclass(slots=True)
class BenchRequest:
    """One prompt: text or token ids; ``prompt_len`` in tokens (None: unknown)."""

    prompt: str | list[int]
    prompt_len: int | None
    output_len: int


class OpenAIEndpoint:
    """HTTP calls to one OpenAI-compatible server.

    Args:
        client: the ``httpx.AsyncClient`` to use (its limits bound the connections).
        base_url: ``http://host:port`` (no ``/v1``).
        endpoint: ``/v1/completions`` or ``/v1/chat/completions``.
        model: the ``model`` field of every request.
        api_key: sent as ``Authorization: Bearer``, or None.
    """

    def __init__(self, client: httpx.AsyncClient, base_url: str, endpoint: str, model: str | None,
                 api_key: str | None = None) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.endpoint = endpoint
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def model_ids(self) -> list[str]:
        """The ids of ``GET /v1/models`` (also the check that the server answers).

        Raises:
            ValueError: the server is unreachable, refuses the key, or lists no model.
        """
        try:
            resp = await self.client.get(f"{self.base_url}/v1/models", headers=self.headers)
            resp.raise_for_status()
            ids = [m["id"] for m in resp.json()["data"]]
            if not ids:
                raise ValueError("no model listed")
            return ids
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"base_url: cannot list the models at {self.base_url}/v1/models "
                             f"({type(e).__name__}: {e}); is the server up?") from e

    async def count_tokens(self, prompt: str) -> int:
        """Prompt tokens the endpoint will see for ``prompt`` (``POST /tokenize``; for
        chat, the prompt as one user message in the chat template).

        Raises:
            httpx.HTTPError: the call failed (for instance no ``/tokenize``: 404).
        """
        body: dict[str, Any] = {"model": self.model}
        if self.endpoint == CHAT:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        resp = await self.client.post(f"{self.base_url}/tokenize", json=body, headers=self.headers)
        resp.raise_for_status()
        return len(resp.json()["tokens"])

    async def detokenize(self, ids: list[int]) -> str:
        resp = await self.client.post(f"{self.base_url}/detokenize", json={"model": self.model, "tokens": ids},
                                      headers=self.headers)
        resp.raise_for_status()
        return resp.json()["prompt"]

    async def has_tokenizer(self) -> bool:
        """Whether ``/tokenize`` and ``/detokenize`` answer."""
        try:
            await self.detokenize([FIRST_RANDOM_ID])
            await self.count_tokens("Hello")
            return True
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            return False

    def payload(self, req: BenchRequest, temperature: float, ignore_eos: bool,
                extra_body: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "temperature": temperature, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.endpoint == CHAT:
            body["messages"] = [{"role": "user", "content": req.prompt}]
            body["max_completion_tokens"] = req.output_len
        else:
            body["prompt"] = req.prompt
            body["max_tokens"] = req.output_len
        if ignore_eos:
            body["ignore_eos"] = True
        return {**body, **extra_body}

    async def send(self, body: dict[str, Any], prompt_len: int | None) -> RequestResult:
        """POST ``body`` and time its stream; never raises for HTTP or stream errors
        (they make a failed result carrying the server's message)."""
        result = RequestResult(prompt_len=prompt_len)
        start = time.perf_counter()
        try:
            async with self.client.stream("POST", self.base_url + self.endpoint, json=body,
                                          headers=self.headers) as resp:
                if resp.status_code != 200:
                    body_text = (await resp.aread()).decode(errors="replace")
                    result.error = f"HTTP {resp.status_code}: {_error_message(body_text)}"
                    return result
                await self._read_stream(resp, start, result)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:  # a broken stream or a malformed chunk
            result.success, result.error = False, f"{type(e).__name__}: {e}"
        return result

    async def _read_stream(self, resp: httpx.Response, start: float, result: RequestResult) -> None:
        """Fill ``result`` from the SSE stream (``data: {json}`` lines, ``data: [DONE]`` last)."""
        last_text_at: float | None = None
        first_chunk_at: float | None = None
        text_chunks = 0
        usage: dict[str, Any] | None = None
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            now = time.perf_counter()
            if data == "[DONE]":
                result.e2el = now - start
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                result.error = f"bad stream chunk: {data[:200]!r}"
                return
            if "error" in chunk:
                result.error = f"stream error: {_error_message(data)}"
                return
            usage = chunk.get("usage") or usage
            if chunk.get("choices"):
                if first_chunk_at is None:
                    first_chunk_at = now
                if _chunk_text(chunk["choices"][0]):
                    if last_text_at is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last_text_at)
                    last_text_at = now
                    text_chunks += 1
        if result.e2el is None:
            result.error = "the stream ended without 'data: [DONE]'"
            return
        if first_chunk_at is None:
            result.error = "the stream carried no choices"
            return
        if result.ttft is None:  # every token decoded to empty text: the first choice chunk stands in
            result.ttft = first_chunk_at - start
        reported = (usage or {}).get("completion_tokens")
        result.output_tokens = int(reported) if reported is not None else text_chunks
        if usage and usage.get("prompt_tokens") is not None:
            result.prompt_len = int(usage["prompt_tokens"])
        result.success = True


def _chunk_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:  # chat: content, or reasoning text (also generated tokens)
        delta = choice["delta"] or {}
        return delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""
    return choice.get("text") or ""


def _error_message(body: str) -> str:
    """``error.message`` of an OpenAI error body, else the body's start."""
    try:
        err = json.loads(body)["error"]
        return str(err["message"] if isinstance(err, dict) else err)
    except (ValueError, KeyError, TypeError):
        return body[:500]


# ---------------------------------------------------------------- datasets


def _lengths(base: int, ratio: float, n: int, rng: random.Random) -> list[int]:
    lo, hi = max(1, int(base * (1 - ratio))), max(1, int(base * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


async def exact_length_prompt(target: int, detokenize: Callable[[list[int]], Awaitable[str]],
                              count: Callable[[str], Awaitable[int]], vocab_size: int,
                              rng: random.Random) -> tuple[str, int]:
    """A text prompt of ``target`` tokens (as ``count`` sees it) made of random ids.

    Decoding random ids and encoding the text again changes the length (merges,
    special tokens, a chat template), so ids are cut or added and the round trip
    repeated up to :data:`MAX_LENGTH_FIXES` times. Returns ``(text, length)``: the
    closest found, exact unless the fixed overhead (BOS, template) exceeds ``target``.
    """
    def draw(k: int) -> list[int]:
        return [rng.randrange(FIRST_RANDOM_ID, vocab_size) for _ in range(k)]

    ids = draw(target)
    best: tuple[str, int] | None = None
    for _ in range(MAX_LENGTH_FIXES):
        text = await detokenize(ids)
        n = await count(text)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (text, n)
        if n == target or (n > target and len(ids) == 1):
            break
        ids = ids[: len(ids) - (n - target)] if n > target else ids + draw(target - n)
        ids = ids or draw(1)
    assert best is not None
    return best


async def random_requests(ep: OpenAIEndpoint, args: argparse.Namespace) -> list[BenchRequest]:
    """``num_prompts`` random prompts; lengths uniform in ``len * (1 -+ range_ratio)``."""
    rng = random.Random(args.seed)
    n = args.num_prompts
    in_lens = _lengths(args.random_input_len, args.random_range_ratio, n, rng)
    out_lens = _lengths(args.random_output_len, args.random_range_ratio, n, rng)
    rngs = [random.Random(rng.getrandbits(64)) for _ in range(n)]  # one per prompt: order-free
    if not await ep.has_tokenizer():
        if ep.endpoint == CHAT:
            raise ValueError("dataset: 'random' on /v1/chat/completions needs the server's /tokenize and "
                             "/detokenize; use /v1/completions (token-id prompts) or --dataset jsonl")
        print("ember bench serve: no /tokenize on the server; sending token-id prompts", file=sys.stderr)
        return [BenchRequest([r.randrange(FIRST_RANDOM_ID, args.random_vocab_size) for _ in range(i)], i, o)
                for r, i, o in zip(rngs, in_lens, out_lens)]
    sem = asyncio.Semaphore(16)

    async def build(i: int) -> BenchRequest:
        async with sem:
            try:
                text, length = await exact_length_prompt(in_lens[i], ep.detokenize, ep.count_tokens,
                                                         args.random_vocab_size, rngs[i])
            except httpx.HTTPStatusError as e:
                raise ValueError(f"random_vocab_size: building a prompt failed (HTTP {e.response.status_code}: "
                                 f"{_error_message(e.response.text)}); a vocabulary smaller than "
                                 f"{args.random_vocab_size} needs a lower --random-vocab-size") from e
        return BenchRequest(text, length, out_lens[i])

    return list(await asyncio.gather(*(build(i) for i in range(n))))


def read_jsonl(path: str, num_prompts: int) -> list[BenchRequest]:
    """The first ``num_prompts`` lines of ``path``, each ``{"prompt": str, "output_len": int}``.

    Raises:
        ValueError: a missing file or a malformed line (naming the line).
    """
    requests: list[BenchRequest] = []
    try:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if len(requests) == num_prompts:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    prompt, output_len = row["prompt"], row["output_len"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"dataset_path: {path}:{lineno}: want {{\"prompt\": str, \"output_len\": int}} "
                                     f"({type(e).__name__}: {e})") from e
                if not isinstance(prompt, str) or not prompt or type(output_len) is not int or output_len < 1:
                    raise ValueError(f"dataset_path: {path}:{lineno}: prompt must be a non-empty string "
                                     "and output_len an int >= 1")
                requests.append(BenchRequest(prompt, None, output_len))
    except OSError as e:
        raise ValueError(f"dataset_path: cannot read {path}: {e.strerror or e}") from e
    if not requests:
        raise ValueError(f"dataset_path: {path} has no prompts")
    return requests


async def jsonl_requests(ep: OpenAIEndpoint, args: argparse.Namespace) -> list[BenchRequest]:
    """The JSONL prompts, their lengths counted by ``/tokenize`` where the server has it."""
    requests = read_jsonl(args.dataset_path, args.num_prompts)
    if len(requests) < args.num_prompts:
        print(f"ember bench serve: {args.dataset_path} has {len(requests)} prompts; using all of them",
              file=sys.stderr)
    if await ep.has_tokenizer():
        sem = asyncio.Semaphore(16)

        async def count(r: BenchRequest) -> None:
            async with sem:
                r.prompt_len = await ep.count_tokens(r.prompt)

        await asyncio.gather(*(count(r) for r in requests))
    return requests


# ---------------------------------------------------------------- the run


async def run_load(ep: OpenAIEndpoint, requests: list[BenchRequest], args: argparse.Namespace,
                   ) -> tuple[list[RequestResult], float]:
    """Send ``requests`` at Poisson arrival times under the concurrency cap.

    Returns:
        ``(results in request order, duration in seconds from the first send to the last answer)``.
    """
    from tqdm import tqdm

    arrivals = poisson_arrival_times(len(requests), args.request_rate, args.seed)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    extra = args.extra_body or {}
    bar = tqdm(total=len(requests), disable=args.no_progress, desc="requests", file=sys.stderr)

    async def one(req: BenchRequest) -> RequestResult:
        body = ep.payload(req, args.temperature, args.ignore_eos, extra)
        if sem is None:
            result = await ep.send(body, req.prompt_len)
        else:
            async with sem:
                result = await ep.send(body, req.prompt_len)
        bar.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for req, at in zip(requests, arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    limit = args.max_concurrency or args.num_prompts
    limits = httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4)
    timeout = httpx.Timeout(args.timeout, pool=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        ep = OpenAIEndpoint(client, args.base_url, args.endpoint, args.model, args.api_key)
        served = await ep.model_ids()
        ep.model = args.model or served[0]
        if args.dataset == "random":
            requests = await random_requests(ep, args)
        else:
            requests = await jsonl_requests(ep, args)
        results, duration = await run_load(ep, requests, args)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    # NOTE: JSON has no infinity; "inf" is what --request-rate takes back.
    config.update(model=ep.model, num_prompts=len(requests),
                  request_rate="inf" if math.isinf(args.request_rate) else args.request_rate)
    return {"config": config, **compute_metrics(results, duration),
            "requests": [{"output_len": q.output_len, **asdict(r), "tpot": r.tpot} for q, r in zip(requests, results)]}


def validate_args(args: argparse.Namespace) -> None:
    """Raises ValueError naming the first bad parameter."""
    checks = [
        (args.endpoint in (COMPLETIONS, CHAT), f"endpoint must be {COMPLETIONS} or {CHAT}"),
        (args.num_prompts >= 1, "num_prompts must be >= 1"),
        (args.request_rate > 0, "request_rate must be > 0 (or inf)"),
        (args.max_concurrency is None or args.max_concurrency >= 1, "max_concurrency must be >= 1"),
        (args.random_input_len >= 1, "random_input_len must be >= 1"),
        (args.random_output_len >= 1, "random_output_len must be >= 1"),
        (0 <= args.random_range_ratio < 1, "random_range_ratio must be in [0, 1)"),
        (args.random_vocab_size > FIRST_RANDOM_ID, f"random_vocab_size must be > {FIRST_RANDOM_ID}"),
        (args.timeout > 0, "timeout must be > 0"),
        (args.dataset != "jsonl" or bool(args.dataset_path), "dataset_path is required with --dataset jsonl"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def run_serve_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args`` (the ``bench serve`` flags).

    Returns:
        ``{"config": {...}, <metrics>..., "requests": [per-request records]}``.

    Raises:
        ValueError: a bad flag, an unreadable dataset, or an unreachable server.
    """
    validate_args(args)
    if args.api_key is None:
        args.api_key = os.environ.get("OPENAI_API_KEY")
    return asyncio.run(_run(args))


# ---------------------------------------------------------------- CLI


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("want a JSON object")
    return value


def add_serve_parser(kinds: argparse._SubParsersAction) -> None:
    """The ``ember bench serve`` subcommand (``kinds``: the ``bench`` sub-parsers)."""
    p = kinds.add_parser("serve", help="load an OpenAI-compatible server; TTFT/TPOT/ITL/E2EL and throughput")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    p.add_argument("--endpoint", default=COMPLETIONS, choices=[COMPLETIONS, CHAT])
    p.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    p.add_argument("--api-key", default=None, help="Bearer key (default: $OPENAI_API_KEY)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrival rate in requests/s (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--dataset", default="random", choices=["random", "jsonl"])
    p.add_argument("--dataset-path", default=None, help='jsonl: one {"prompt": ..., "output_len": ...} a line')
    p.add_argument("--random-input-len", type=int, default=1024, help="prompt tokens")
    p.add_argument("--random-output-len", type=int, default=128, help="max_tokens")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--random-vocab-size", type=int, default=32000,
                   help=f"random prompt ids are drawn from [{FIRST_RANDOM_ID}, this) (default 32000)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos (a vLLM extra) so that every request makes max_tokens tokens")
    p.add_argument("--extra-body", type=_json_object, default=None, help="JSON object merged into every request")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds without data before a request fails")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None, help="write every figure, the config and per-request records")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Run, print the table, write the JSON; exit status 1 when no request succeeded."""
    try:
        result = run_serve_benchmark(args)
    except ValueError as e:
        print(f"ember bench serve: error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.output_json:
        os.makedirs(os.path.dirname(args.output_json) or ".", exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["completed"] else 1
