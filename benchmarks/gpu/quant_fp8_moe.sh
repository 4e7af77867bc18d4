#!/usr/bin/env bash
# FP8 routed experts: the FP8 MoE GPU tests at DeepSeek-V3 and Qwen3-30B-A3B
# expert shapes, then benchmarks/quant_fp8_moe.py: the FP8 grouped GEMM against
# the bf16 one (1, 64, 1024 tokens), and decode of DeepSeek-V3 cut to 3 layers
# (1 dense + 2 MoE, full width, random weights), bf16 against FP8 at batch 1
# and 64. About 5 minutes on one H100.
# Usage: OUT=results bash benchmarks/gpu/quant_fp8_moe.sh
source "$(dirname "$0")/_common.sh"
gpu_name
(cd "$ROOT" && timeout 240 python3 -m pytest -q -m gpu tests/kernels/test_triton_moe_fp8.py 2>&1 | tail -3)
timeout 480 python3 "$ROOT/benchmarks/quant_fp8_moe.py" --layers 3 --json "$OUT/quant_fp8_moe.json" 2>&1 \
    | grep -vE "^\[ember\]|Warning|warn\("
