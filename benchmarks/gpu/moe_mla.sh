#!/usr/bin/env bash
# MoE and MLA presets (BENCHMARKS.md, "MoE and MLA"): the GPU path against the
# plain-PyTorch path on the same weights at 4 layers
# (benchmarks/check_gpu_vs_torch.py), then batch-1 and batch-64 decode of
# Qwen3-30B-A3B (48 layers, 128 experts, top-8) and of DeepSeek-V3 cut to 4
# layers (3 dense + 1 MoE, full width; MLA, 256 experts + 1 shared, top-8).
# Usage: OUT=results bash benchmarks/gpu/moe_mla.sh
source "$(dirname "$0")/_common.sh"
gpu_name
for m in Qwen3-30B-A3B DeepSeek-V3; do
  timeout 300 python3 "$ROOT/benchmarks/check_gpu_vs_torch.py" --model $m --layers 4 --json "$OUT/check_$m.json" 2>&1 \
      | grep -E "^\{|Error" | tail -3
done
LAT="bench latency --load-format dummy --max-model-len 2048 --input-len 128 --output-len 64 --iters 1"
SHOW="^(batch_size|decode_tok_s |decode_step_ms|weight_gb) |Error"
for bs in 1 64; do
  $EMBER $LAT --model Qwen3-30B-A3B --batch-size $bs --output-json "$OUT/qwen3moe_b$bs.json" 2>&1 | grep -E "$SHOW"
  $EMBER $LAT --model DeepSeek-V3 --hf-overrides '{"num_hidden_layers": 4}' --batch-size $bs \
      --output-json "$OUT/dsv3_4l_b$bs.json" 2>&1 | grep -E "$SHOW"
done
