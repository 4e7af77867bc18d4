"""``ember run-batch``: an OpenAI batch file through the bundled SmolLM2-135M-Instruct,
run as the command is (a subprocess), its output checked line by line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from ember.entrypoints.openai.run_batch import parse_line

CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


def test_parse_line_refuses_what_is_not_a_batch_request() -> None:
    ok = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
    assert parse_line(json.dumps(ok), 1) == (ok, None)
    cases = [
        ("{not json", None, "invalid_json", "line 3: not JSON"),
        ("[1]", None, "invalid_request", "line 3: must be a JSON object"),
        (json.dumps({**ok, "custom_id": 5}), None, "invalid_request", "custom_id must be a string"),
        (json.dumps({**ok, "method": "GET"}), "a", "invalid_request", "method must be 'POST'"),
        (json.dumps({**ok, "url": "/v1/responses"}), "a", "invalid_request", "url must be one of"),
        (json.dumps({**ok, "body": "x"}), "a", "invalid_request", "body must be a JSON object"),
        (json.dumps({**ok, "body": {"input": "x", "stream": True}}), "a", "invalid_request",
         "streaming is not supported"),
        (json.dumps({**ok, "extra": 1}), "a", "invalid_request", "unknown field 'extra'"),
    ]
    for line, custom_id, code, match in cases:
        item, error = parse_line(line, 3)
        assert item is None and error["custom_id"] == custom_id and error["response"] is None, line
        assert error["error"]["code"] == code and match in error["error"]["message"], error
        assert error["id"].startswith("batch_req_")


def test_run_batch_command(tmp_path) -> None:
    requests = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions", "body": CHAT},
        {"custom_id": "cmpl-1", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "One, two,", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "n": 2}},
        {"custom_id": "emb-1", "method": "POST", "url": "/v1/embeddings",
         "body": {"input": ["a", "b c"], "encoding_format": "float"}},
        {"custom_id": "bad-1", "method": "POST", "url": "/v1/chat/completions", "body": {**CHAT, "top_k": "x"}},
        {"custom_id": "bad-2", "method": "POST", "url": "/v1/files", "body": {}},
        {"custom_id": "chat-2", "method": "POST", "url": "/v1/chat/completions", "body": CHAT},
    ]
    infile, outfile = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    infile.write_text("\n".join(json.dumps(r) for r in requests) + "\n\n")
    proc = subprocess.run([sys.executable, "-m", "ember.entrypoints.cli", "run-batch", "-i", str(infile), "-o",
                           str(outfile), "--max-model-len", "256", "--kv-cache-memory", "64M", "--dtype", "float32"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Processed requests" in proc.stderr and "6/6" in proc.stderr  # the progress bar
    assert "6 requests, 2 failed" in proc.stderr
    lines = [json.loads(line) for line in outfile.read_text().splitlines()]
    assert [r["custom_id"] for r in lines] == [r["custom_id"] for r in requests]
    assert len({r["id"] for r in lines}) == 6 and all(r["id"].startswith("batch_req_") for r in lines)
    chat1, cmpl, emb, bad1, bad2, chat2 = lines
    for r in (chat1, cmpl, emb, chat2):
        assert r["error"] is None and r["response"]["status_code"] == 200, r
        assert r["response"]["request_id"] and r["response"]["body"]["id"].endswith(r["response"]["request_id"])
    body = chat1["response"]["body"]
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["message"]["content"] and body["choices"][0]["finish_reason"] == "length"
    # Greedy: the same request answers the same.
    assert chat2["response"]["body"]["choices"] == body["choices"]
    body = cmpl["response"]["body"]
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["usage"]["completion_tokens"] == 6
    assert body["choices"][0]["text"] == body["choices"][1]["text"]
    body = emb["response"]["body"]
    assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["prompt_tokens"] >= 3
    for d in body["data"]:
        assert len(d["embedding"]) == 576 and abs(math.sqrt(sum(x * x for x in d["embedding"])) - 1) < 1e-4
    assert bad1["error"] is None and bad1["response"]["status_code"] == 400
    assert bad1["response"]["body"]["error"]["param"] == "top_k"
    assert bad2["response"] is None and "url must be one of" in bad2["error"]["message"]
