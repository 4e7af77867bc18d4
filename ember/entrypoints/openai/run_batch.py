"""``ember run-batch -i requests.jsonl -o results.jsonl``: OpenAI's batch file
format, run offline on an engine in this command (no server is started).

Each input line is one request (OpenAI's Batch API input format)::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

with ``url`` one of ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` and ``body`` what that endpoint takes (``stream`` is not
allowed). Each output line, in input order, is OpenAI's batch output::

    {"id": "batch_req_...", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A request the endpoint refuses keeps its HTTP answer (``status_code`` 400 and
the error body, as OpenAI reports it); a line that is not a valid batch
request gets ``response: null`` and ``error: {"code", "message"}``. The
requests run concurrently (up to ``--max-concurrency`` at a time), each
through the same handlers as ``ember serve`` (in-process, over ASGI), so the
answers are the server's; a progress bar on stderr counts finished requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

import httpx
from tqdm import tqdm

BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def _error_line(custom_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def parse_line(line: str, number: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """One input line: ``(request, None)`` when valid, else ``(None, error output line)``."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return None, _error_line(None, "invalid_json", f"line {number}: not JSON: {e}")
    if not isinstance(item, dict):
        return None, _error_line(None, "invalid_request", f"line {number}: must be a JSON object")
    custom_id = item.get("custom_id")
    problem = None
    if not isinstance(custom_id, str):
        problem = "custom_id must be a string"
    elif item.get("method") != "POST":
        problem = f"method must be 'POST', got {item.get('method')!r}"
    elif item.get("url") not in BATCH_URLS:
        problem = f"url must be one of {', '.join(BATCH_URLS)}, got {item.get('url')!r}"
    elif not isinstance(item.get("body"), dict):
        problem = "body must be a JSON object"
    elif item["body"].get("stream"):
        problem = "body.stream: streaming is not supported in a batch"
    elif set(item) - {"custom_id", "method", "url", "body"}:
        problem = f"unknown field {sorted(set(item) - {'custom_id', 'method', 'url', 'body'})[0]!r}"
    if problem is not None:
        return None, _error_line(custom_id if isinstance(custom_id, str) else None, "invalid_request",
                                 f"line {number}: {problem}")
    return item, None


async def _run_one(client: httpx.AsyncClient, item: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(item["url"], json=item["body"])
    try:
        body = resp.json()
    except ValueError:
        body = {"error": {"message": resp.text, "type": "internal_server_error", "param": None, "code": None}}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": item["custom_id"],
            "response": {"status_code": resp.status_code, "request_id": resp.headers.get("x-request-id"),
                         "body": body},
            "error": None}


async def run_batch(app: Any, lines: list[str], max_concurrency: int = 256, show_progress: bool = True
                    ) -> list[dict[str, Any]]:
    """Run a batch file's ``lines`` through ``app`` (the server's ASGI app).

    Returns:
        The output lines' objects, in input order (blank input lines are skipped).
    """
    entries: list[tuple[dict[str, Any] | None, dict[str, Any] | None]] = [
        parse_line(line, i + 1) for i, line in enumerate(lines) if line.strip()]
    bar = tqdm(total=len(entries), desc="Processed requests", disable=not show_progress, file=sys.stderr)
    limit = asyncio.Semaphore(max_concurrency)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:

        async def run(item: dict[str, Any] | None, error: dict[str, Any] | None) -> dict[str, Any]:
            if item is None:
                bar.update(1)
                return error  # type: ignore[return-value]
            async with limit:
                out = await _run_one(client, item)
            bar.update(1)
            return out

        results = await asyncio.gather(*(run(item, error) for item, error in entries))
    bar.close()
    return list(results)


def run_batch_cli(args: argparse.Namespace) -> int:
    """``ember run-batch``: load the engine, run the file, write the results.

    Raises:
        OSError: the input file cannot be read or the output file written.
    """
    from ember.engine.arg_utils import EngineArgs
    from ember.engine.async_llm import AsyncLLM
    from ember.entrypoints.openai.api_server import build_app, pooling_of

    with open(args.input_file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args))
    try:
        app = build_app(engine, chat_template=args.chat_template, pooling=pooling_of(args),
                        max_request_body_bytes=None)
        results = asyncio.run(run_batch(app, lines, args.max_concurrency))
    finally:
        engine.shutdown()
    with open(args.output_file, "w", encoding="utf-8") as f:
        for result in results:
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
    failed = sum(1 for r in results if r["error"] is not None or r["response"]["status_code"] != 200)
    print(f"ember run-batch: {len(results)} requests, {failed} failed; results in {args.output_file}",
          file=sys.stderr)
    return 0
