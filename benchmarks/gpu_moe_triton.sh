#!/usr/bin/env bash
# One device call: Triton fused-MoE tests, GPU-vs-torch check of Qwen3-30B-A3B
# (4 layers) and its batch-1 / batch-64 decode with the Triton MoE + CUDA graphs.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
python3 -m pytest -q -x tests/kernels/test_triton_moe.py 2>&1 | tail -4
python3 benchmarks/check_gpu_vs_torch.py --model Qwen3-30B-A3B --layers 4 --json "$OUT/check_Qwen3-30B-A3B.json" 2>&1 | grep -E "^\{|Error" | tail -2
E="python3 -m ember.entrypoints.cli bench latency --load-format dummy --max-model-len 2048 --input-len 128 --output-len 64 --iters 1"
for bs in 1 64; do
  $E --model Qwen3-30B-A3B --batch-size $bs --output-json "$OUT/qwen3moe_b$bs.json" 2>&1 | grep -E "^(batch_size|decode_tok_s |decode_step)|Error|captured"
done
