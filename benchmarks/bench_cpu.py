"""CPU benchmark of the bundled model, with HF transformers as the peer.

Measures, in one process (plus one server subprocess):
  * batch-1 decode tokens/s (Ember and HF transformers, same GGUF, float32),
  * total output tokens/s with 16 concurrent requests (Ember, offline),
  * time from process start to a ready server (``ember serve`` -> /health 200).

Usage:
    python benchmarks/bench_cpu.py [--model NAME_OR_PATH] [--output-len 128] [--json results/cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request

import torch

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def ember_decode_and_batch(model: str, output_len: int, concurrency: int) -> dict[str, float]:
    from ember import LLM, SamplingParams

    llm = LLM(model, max_model_len=2048, kv_cache_memory=512 << 20)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up

    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    m = out.metrics
    decode_tps = (output_len - 1) / (m["finished_time"] - m["first_token_time"])
    ttft = m["first_token_time"] - m["arrival_time"]

    prompts = [f"{PROMPT} Variant {i}: make it about {w}." for i, w in
               enumerate(["the sea", "a cat", "winter", "a ship", "a storm", "light", "a map", "a bell",
                          "a key", "a bird", "fog", "a letter", "a lamp", "stars", "rocks", "a song"])][:concurrency]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    total_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"ember_batch1_decode_tok_s": decode_tps, "ember_batch1_ttft_s": ttft,
            f"ember_c{concurrency}_output_tok_s": total_out / elapsed, f"ember_c{concurrency}_elapsed_s": elapsed}


def hf_decode(model_path: str, prompt_ids: list[int], output_len: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path),
                                              dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=8, **kw)  # warm-up
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        hf.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return {"hf_batch1_decode_tok_s": (output_len - 1) / ((t2 - t1) - prefill)}


def server_start_time(model: str | None) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ember.entrypoints.cli", "serve", "--port", str(port)]
    if model:
        cmd += ["--model", model]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < 300:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("server did not become ready in 300 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    from ember.loader import resolve_model_source
    from ember.loader.download import DEFAULT_MODEL

    path = resolve_model_source(args.model or DEFAULT_MODEL).path
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"), "model": os.path.basename(path), "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "output_len": args.output_len,
    }
    results["server_start_to_ready_s"] = server_start_time(args.model)
    results.update(ember_decode_and_batch(path, args.output_len, args.concurrency))
    if not args.skip_hf:
        from ember.loader import load_tokenizer

        tok = load_tokenizer(resolve_model_source(path))
        results.update(hf_decode(path, tok.encode(PROMPT), args.output_len))
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
