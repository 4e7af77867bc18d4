#!/usr/bin/env bash
# Structured output (BENCHMARKS.md, "Structured output"): JSON-schema-constrained
# against unconstrained decoding in one engine, Qwen2.5-7B preset with random
# bf16 weights and Qwen2.5's tokenizer (its vocabulary is the preset's): output
# tok/s at batch 64, time per token at batch 1, host mask time per step, grammar
# compile time, and xgrammar's own matcher re-checking every constrained output.
# Needs the tokenizer files first: python benchmarks/gpu/save_tokenizer.py
# (writes .carry/qwen-tokenizer).
# Usage: OUT=results bash benchmarks/gpu/structured_output.sh
source "$(dirname "$0")/_common.sh"
gpu_name
python3 "$ROOT/benchmarks/structured_output.py" --model "${PRESET_SO:-Qwen2.5-7B}" --load-format dummy \
    --tokenizer "${TOKENIZER:-$ROOT/.carry/qwen-tokenizer}" --batch-size "${BATCH:-64}" \
    --output-len "${OUTLEN:-256}" --json "$OUT/structured_output.json" 2>&1 | grep -v -i warn
