"""The real server (``ember serve`` in a subprocess, bundled SmolLM2-135M-Instruct in
float32) with the official ``openai`` client: ``/v1/embeddings`` against Hugging
Face's hidden states, ``X-Request-Id`` in the request log, vLLM's metric set counted
once per request, and the Grafana dashboard's every query against ``/metrics``."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.entrypoints.server_process import MODEL, launch_server
from tests.models.tiny import load_hf_gguf

MAX_MODEL_LEN = 256
DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "ember-dashboard.json"
TEXTS = ["The capital of France is Paris.", "Vectors of numbers stand for texts."]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with launch_server("--kv-cache-memory", "256M", "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32",
                       "--max-num-batched-tokens", "16") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_hidden(smollm2_path) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    path, name = os.path.dirname(smollm2_path), os.path.basename(smollm2_path)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=name)
    model = load_hf_gguf(smollm2_path, base_model=True)
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([tok.encode(t)])).last_hidden_state[0] for t in TEXTS]


def _close(got: list[float], ref: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float32), ref.float(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- embeddings


def test_embeddings_equal_hf_last_token_normalized(server, client, hf_hidden) -> None:
    expected = [torch.nn.functional.normalize(h[-1], dim=0) for h in hf_hidden]
    # The openai client asks for base64 by default and decodes it.
    resp = client.embeddings.create(model=MODEL, input=TEXTS)
    assert [d.index for d in resp.data] == [0, 1] and resp.model == MODEL
    for d, ref in zip(resp.data, expected, strict=True):
        assert len(d.embedding) == 576
        _close(d.embedding, ref)
    tok_counts = [len(httpx.post(f"{server.url}/tokenize", json={"prompt": t}).json()["tokens"]) for t in TEXTS]
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(tok_counts)
    # float, one string, and token ids give the same vectors.
    one = client.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
    assert one.usage.prompt_tokens == tok_counts[1]
    _close(one.data[0].embedding, expected[1])
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": TEXTS[0]}).json()["tokens"]
    by_ids = client.embeddings.create(model=MODEL, input=[ids, ids], encoding_format="float")
    assert by_ids.data[0].embedding == by_ids.data[1].embedding
    _close(by_ids.data[0].embedding, expected[0])
    # base64 is the float32 little-endian bytes.
    raw = httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert raw["object"] == "list" and raw["id"].startswith("embd-") and raw["data"][0]["object"] == "embedding"
    _close(decoded.tolist(), expected[0])
    # vLLM's normalize: false gives the pooled hidden state itself; dimensions equal to the size is accepted.
    plain = client.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=576, encoding_format="float",
                                     extra_body={"normalize": False})
    _close(plain.data[0].embedding, hf_hidden[0][-1])


def test_embedding_errors_name_the_field(server, client) -> None:
    def error(body: dict) -> dict:
        resp = httpx.post(f"{server.url}/v1/embeddings", json=body)
        assert resp.status_code == 400, resp.text
        return resp.json()["error"]

    err = error({"input": "hi", "dimensions": 64})
    assert err["param"] == "dimensions" and "576 dimensions" in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="hi", dimensions=64)
    assert error({"input": ""})["param"] == "input"
    assert error({"input": ["a", ""]})["message"].startswith("input[1] must not be empty")
    assert error({"input": []})["param"] == "input"
    assert error({"input": "hi", "encoding_format": "int8"})["param"] == "encoding_format"
    err = error({"input": [[1, 2], [10 ** 9]]})
    assert err["param"] == "input" and "input[1]" in err["message"] and "vocabulary" in err["message"]
    err = error({"input": [1] * MAX_MODEL_LEN})
    assert err["param"] == "input" and err["code"] == "context_length_exceeded"
    assert error({"input": "hi", "normalize": "yes"})["param"] == "normalize"
    assert error({"input": "hi", "temperature": 0})["param"] == "temperature"  # not an embeddings field
    resp = httpx.post(f"{server.url}/v1/embeddings", json={"input": "hi", "model": "other"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------- X-Request-Id


def test_request_id_is_the_logged_id(server, client) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_headers={"X-Request-Id": "trace-abc-1"})
    assert raw.headers["x-request-id"] == "trace-abc-1" and raw.parse().id == "chatcmpl-trace-abc-1"
    emb = client.embeddings.with_raw_response.create(model=MODEL, input="x", extra_headers={"X-Request-Id": "e-9"})
    assert emb.headers["x-request-id"] == "e-9" and emb.parse().id == "embd-e-9"
    log = server.log_tail(1 << 20)
    records = [json.loads(line[line.index("{"):]) for line in log.splitlines() if '{"request_id": ' in line]
    by_id = {r["request_id"]: r for r in records}
    assert by_id["chatcmpl-trace-abc-1"]["output_tokens"] == 2
    assert by_id["embd-e-9"]["output_tokens"] == 0


# ---------------------------------------------------------------- metrics


def scrape(url: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(f"{url}/metrics")
    assert resp.status_code == 200
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            labels = s.labels.get("finished_reason", "") or s.labels.get("le", "")
            out[(s.name, labels)] = s.value
    return out


def test_request_metrics_are_counted_once_per_request(server, client) -> None:
    before = scrape(server.url)
    resp = client.completions.create(model=MODEL, prompt="Count: one, two,", n=3, max_tokens=5, temperature=1.0,
                                     seed=1, extra_body={"ignore_eos": True})
    after = scrape(server.url)

    def delta(name: str, label: str = "") -> float:
        return after.get((name, label), 0.0) - before.get((name, label), 0.0)

    prompt_tokens = resp.usage.prompt_tokens
    assert resp.usage.completion_tokens == 15
    for name in ("request_queue_time_seconds", "time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens", "request_params_n",
                 "request_params_max_tokens", "request_max_num_generation_tokens",
                 "time_per_output_token_seconds"):
        assert delta(f"ember:{name}_count") == 1, name
    assert delta("ember:request_success_total", "length") == 1
    assert delta("ember:request_params_n_sum") == 3
    assert delta("ember:request_params_max_tokens_sum") == 5
    assert delta("ember:request_prompt_tokens_sum") == prompt_tokens
    assert delta("ember:request_generation_tokens_sum") == 15
    assert delta("ember:request_max_num_generation_tokens_sum") == 5
    assert delta("ember:prompt_tokens_total") == 3 * prompt_tokens  # each completion's prompt, as vLLM counts
    assert delta("ember:generation_tokens_total") == 15
    assert delta("ember:gpu_prefix_cache_queries_total") == delta("ember:prefix_cache_queries_total") > 0
    # Every step computed some tokens: prefill chunks (at most 16 tokens each) and decode steps.
    steps = delta("ember:iteration_tokens_total_count")
    # Each completion computes its prompt (less prefix-cache hits) and its tokens but the last.
    hits = delta("ember:prefix_cache_hits_total")
    assert steps >= 5 and delta("ember:iteration_tokens_total_sum") == 3 * prompt_tokens - hits + 3 * 4
    assert delta("ember:iteration_tokens_total_bucket", "16.0") == steps  # within the 16-token budget
    # Prefill and decode time add up to the inference time.
    assert abs(delta("ember:request_prefill_time_seconds_sum") + delta("ember:request_decode_time_seconds_sum")
               - delta("ember:request_inference_time_seconds_sum")) < 1e-6
    text = httpx.get(f"{server.url}/metrics").text
    info = re.search(r"^ember:cache_config_info\{(.*)\} 1\.0$", text, re.M)
    assert info and 'block_size="16"' in info.group(1) and re.search(r'num_gpu_blocks="\d+"', info.group(1))
    assert f'ember:request_success_total{{engine="0",finished_reason="length",model_name="{MODEL}"}}' in text
    assert 'engine="0"' in info.group(1)


def dashboard_metric_names() -> set[str]:
    """Every ``ember:`` sample name the dashboard's queries (and variables) use."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    exprs.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    assert len(exprs) > 30
    names = {n for e in exprs for n in re.findall(r"\b(ember:[A-Za-z0-9_:]+)", e)}
    assert all(not re.search(r"\bvllm:", e) for e in exprs)
    return names


def test_grafana_dashboard_queries_only_exported_metrics(server, client) -> None:
    client.completions.create(model=MODEL, prompt="Dashboard", max_tokens=3)
    from prometheus_client.parser import text_string_to_metric_families

    exported = {s.name for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
                for s in f.samples}
    names = dashboard_metric_names()
    assert len(names) >= 25
    missing = sorted(names - exported)
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
    # vLLM's dashboard panels' metrics are all there.
    for name in ("e2e_request_latency_seconds_bucket", "prompt_tokens_total", "generation_tokens_total",
                 "time_per_output_token_seconds_bucket", "num_requests_running", "num_requests_waiting",
                 "time_to_first_token_seconds_bucket", "kv_cache_usage_perc", "request_prompt_tokens_bucket",
                 "request_generation_tokens_bucket", "request_success_total", "request_queue_time_seconds_sum",
                 "request_prefill_time_seconds_sum", "request_decode_time_seconds_sum",
                 "request_max_num_generation_tokens_sum"):
        assert f"ember:{name}" in names, name
