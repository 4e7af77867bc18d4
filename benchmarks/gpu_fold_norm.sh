#!/usr/bin/env bash
# One device call: the RMSNorm folded into the next GEMM (EMBER_FOLD_NORM), checked and timed.
# GPU tests of the GEMM, sampler and engine (greedy against HF), the plain-PyTorch checks of
# 4-layer Qwen3-8B and Llama-3.1-8B, the fusion probe, then batch-1 decode steps folded / unfolded / folded /
# unfolded in turn on the same host (issue 3's row; BATCH, IN, OUTLEN change it), and with THR=1
# the 1000 x 1024/1024 throughput row.
# Usage (device): OUT=$OUT bash benchmarks/gpu_fold_norm.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
EMBER="python3 -m ember.entrypoints.cli"
COMMON="--model Llama-3.1-8B --load-format dummy --max-model-len 4096"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 300 python3 -m pytest -q tests/kernels/test_triton_gemm.py tests/sample/test_sampler.py \
  tests/engine/test_gpu_engine.py tests/engine/test_prefix_caching_gpu.py 2>&1 | grep -E "passed|failed|Error|FAILED|assert" | tail -20
for M in Qwen3-8B Llama-3.1-8B; do
  timeout 120 python3 benchmarks/check_gpu_vs_torch.py --model $M --layers 4 2>&1 | tail -1
done
timeout 120 python3 benchmarks/decode_fusion_probe.py --m 1 4 --rows 1 2>&1 | grep -v Warn
B=${BATCH:-1}; IN=${IN:-128}; OUTLEN=${OUTLEN:-256}
for R in a b; do
  for F in 1 0; do
    echo "EMBER_FOLD_NORM=$F run $R"
    EMBER_FOLD_NORM=$F $EMBER bench latency $COMMON --batch-size $B --input-len $IN --output-len $OUTLEN \
      --output-json "$OUT/latency_b${B}_fold${F}_$R.json" 2>&1 | grep -E "^(decode_step_ms|decode_tok_s |mbu|copy_gb_s) "
  done
done
[ "${THR:-0}" = 1 ] && $EMBER bench throughput $COMMON --num-prompts 1000 --input-len 1024 --output-len 1024 --no-progress \
    --output-json "$OUT/thr_1024.json" 2>&1 | grep -E "tok_s|bound|elapsed|host"
