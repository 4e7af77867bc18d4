#!/usr/bin/env bash
# One device call for the MoE / MLA models (issue 6): GPU path vs plain PyTorch on
# the same weights (reduced depth), then batch-1 and batch-64 decode figures.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
for m in Qwen3-30B-A3B DeepSeek-V3; do
  python3 benchmarks/check_gpu_vs_torch.py --model $m --layers 4 --json "$OUT/check_$m.json" 2>&1 | grep -E "^\{|Error|error" | tail -3
done
E="python3 -m ember.entrypoints.cli bench latency --load-format dummy --max-model-len 2048 --input-len 128 --output-len 64 --iters 1"
for bs in 1 64; do
  $E --model Qwen3-30B-A3B --batch-size $bs --output-json "$OUT/qwen3moe_b$bs.json" 2>&1 | grep -E "^(batch_size|decode_tok_s |decode_step|mbu|weight_gb)|Error"
  $E --model DeepSeek-V3 --hf-overrides '{"num_hidden_layers": 4}' --batch-size $bs --output-json "$OUT/dsv3_4l_b$bs.json" 2>&1 | grep -E "^(batch_size|decode_tok_s |decode_step|mbu|weight_gb)|Error"
done
