"""Cold start: process start -> first token, for an 8B model read from local
sharded safetensors (graph capture included).

    python benchmarks/cold_start.py --dir /tmp/llama8b [--preset Llama-3.1-8B] [--json out.json]

If ``--dir`` has no checkpoint yet, one is written first (random bf16 weights of
the preset's shapes, HF ``save_pretrained`` with 5 GB shards); that write is
not timed. The timed part is a fresh ``python3`` process that imports Ember,
builds ``LLM(dir)``, and generates one token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import sys
from ember import LLM, SamplingParams
llm = LLM(sys.argv[1], skip_tokenizer_init=True, max_model_len=4096)
llm.generate([[1000, 2000, 3000]], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
print("FIRST_TOKEN", flush=True)
"""


def prepare(path: str, preset: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from ember.loader.presets import preset_config, preset_path

    config = preset_config(str(preset_path(preset)))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--preset", default="Llama-3.1-8B")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        t = time.perf_counter()
        prepare(args.dir, args.preset)
        print(f"wrote checkpoint in {time.perf_counter() - t:.1f} s")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, args.dir], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if "FIRST_TOKEN" not in proc.stdout:
        print(proc.stderr[-3000:])
        raise SystemExit("child failed")
    log = [line for line in proc.stderr.splitlines() if line.startswith("[ember]")]
    result = {"preset": args.preset, "process_start_to_first_token_s": elapsed, "log": log}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
