#!/usr/bin/env bash
# One device call (H200): where the offline-throughput time goes. Runs issue 3's
# 1000 x 1024/1024 row with --step-trace (per-step batch, prefill tokens, time) at
# the defaults and at each extra --max-num-seqs in SEQS, then 5000 x 128/128.
# Usage (device): OUT=$OUT SEQS="512" bash benchmarks/gpu_step_trace.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
EMBER="python3 -m ember.entrypoints.cli"
COMMON="--model Llama-3.1-8B --load-format dummy --max-model-len 4096"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
SHOW="^(output_tok_s|fraction_of_bound|elapsed_s|host_ms|num_preemptions|copy_gb_s|matmul_tflop_s|trace_)"
for S in 256 ${SEQS:-}; do
  echo "== 1000 x 1024/1024, --max-num-seqs $S"
  $EMBER bench throughput $COMMON --max-num-seqs $S --num-prompts 1000 --input-len 1024 --output-len 1024 \
    --no-progress --step-trace "$OUT/trace_1024_seqs$S.json" --output-json "$OUT/thr_1024_seqs$S.json" 2>&1 | grep -E "$SHOW"
done
if [ "${THR128:-1}" = 1 ]; then
  echo "== 5000 x 128/128"
  $EMBER bench throughput $COMMON --num-prompts 5000 --input-len 128 --output-len 128 --no-progress \
    --step-trace "$OUT/trace_128.json" --output-json "$OUT/thr_128.json" 2>&1 | grep -E "$SHOW"
fi
