#!/usr/bin/env bash
# FP8 W8A8 linear layers (benchmarks/quant_fp8.py): kernel timings and errors at
# Llama-3.1-8B's projection shapes (M = 1, 16, 4096; FP8 vs bf16 F.linear, and
# a tile sweep of the decode GEMV), then batch-1 decode 128/256 and offline
# throughput NUM_PROMPTS x 1024/1024 (default 500), bf16 vs --quantization fp8,
# on the $PRESET preset with random weights. About 6 minutes on one H100.
# Usage: OUT=results [NUM_PROMPTS=1000] [PARTS="kernels engine"] bash benchmarks/gpu/quant_fp8.sh
source "$(dirname "$0")/_common.sh"
gpu_name
# shellcheck disable=SC2086
python3 "$ROOT/benchmarks/quant_fp8.py" --model "$PRESET" --parts ${PARTS:-kernels engine} \
    --num-prompts "${NUM_PROMPTS:-500}" --json "$OUT/quant_fp8.json" 2>&1 | grep -v -i warn
