#!/usr/bin/env bash
# FP8 W8A16 decode GEMV configurations (benchmarks/gpu/fp8_gemv_sweep.py) at
# Llama-3.1-8B's shapes (qkv, o, gate_up with SwiGLU, down, lm_head) and
# M = 1, 4, 8, 16: each configuration against today's kernel and the bf16
# skinny GEMM, CUDA-graph timings, outputs checked against float32. Prints a
# table, the best configuration per shape and M, and the lines of
# FP8_GEMV_CONFIGS to paste. About 2-3 minutes on one H100. `--parts w4a16`
# (or `--parts fp8 w4a16`) sweeps the W4A16 decode kernel's tiles the same way.
# Usage: OUT=results bash benchmarks/gpu/fp8_gemv_sweep.sh [--parts fp8 w4a16] [--shapes o down] [--m 1 16]
source "$(dirname "$0")/_common.sh"
gpu_name
python3 "$ROOT/benchmarks/gpu/fp8_gemv_sweep.py" --json "$OUT/fp8_gemv_sweep.json" "$@" 2>&1 | grep -v -i warn
