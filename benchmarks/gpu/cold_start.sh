#!/usr/bin/env bash
# Cold start (BENCHMARKS.md, "Cold start"): process start -> first token for the
# 8B preset read from local sharded safetensors (random bf16 weights written to
# $CKPT first, not timed), CUDA-graph capture included (benchmarks/cold_start.py).
# Usage: OUT=results [CKPT=/tmp/llama8b] bash benchmarks/gpu/cold_start.sh
source "$(dirname "$0")/_common.sh"
gpu_name
python3 "$ROOT/benchmarks/cold_start.py" --dir "${CKPT:-/tmp/llama8b}" --preset "$PRESET" \
    --json "$OUT/cold_start.json" 2>&1 | tail -12
