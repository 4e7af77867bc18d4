#!/usr/bin/env bash
# One device call: the decode fusions (fused gate, two-pass argmax) on their own
# (benchmarks/decode_fusion_probe.py), their GPU tests, then issue 3's batch-1
# row twice and a batch-1 kernel profile.
# Usage (device): OUT=$OUT bash benchmarks/gpu_fusions.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
echo "$GPU"
timeout 200 python3 -m pytest -q tests/kernels/test_triton_ops.py tests/kernels/test_triton_gemm.py \
  tests/kernels/test_triton_attention.py tests/sample/test_sampler.py 2>&1 | grep -E "passed|failed|Error|FAILED" | tail -8
python3 benchmarks/decode_fusion_probe.py 2>&1 | grep -v Warn
for R in a b; do
  python3 -m ember.entrypoints.cli bench latency --model Llama-3.1-8B --load-format dummy --max-model-len 4096 \
    --batch-size 1 --input-len 128 --output-len 256 --output-json "$OUT/latency_b1_${R}_$GPU.json" 2>&1 \
    | grep -E "^(decode_step_ms|decode_tok_s |mbu|copy_gb_s) "
done
timeout 120 python3 benchmarks/profile_step.py --prompt-len 128 --decode-batch 1 --decode-steps 20 2>&1 \
  | grep -E "kernel time per step|per step \(wall|^ +_|at::native|Memcpy" | head -24
