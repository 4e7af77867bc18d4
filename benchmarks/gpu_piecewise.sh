#!/usr/bin/env bash
# One device call: piecewise CUDA graphs for steps with prefill tokens. Runs the
# GPU engine and kernel tests, then per-step host/device times of mixed steps
# (4 decodes + a chunk) with piecewise graphs and eagerly, batch-4 decode
# latency, and a prefill-heavy offline throughput run with and without them,
# on the Llama-3.1-8B preset (dummy bf16 weights).
# Usage (device): OUT=$OUT bash benchmarks/gpu_piecewise.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
EMBER="python3 -m ember.entrypoints.cli"
COMMON="--model Llama-3.1-8B --load-format dummy --max-model-len 4096"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu_engine.py tests/kernels 2>&1 | tail -6
for MODE in piecewise no-piecewise; do
  echo "== mixed steps, $MODE"
  timeout 120 python3 benchmarks/profile_host.py --skip-launch-costs --$MODE --chunks 128 256 512 1000 2>&1 | grep -v "^\[ember\] loaded"
done
$EMBER bench latency $COMMON --batch-size 4 --input-len 1000 --output-len 200 --iters 3 \
    --output-json "$OUT/latency_b4.json" 2>&1 | grep -E "decode_tok|host|mbu|bound"
for MODE in piecewise no-piecewise; do
  echo "== throughput 2000 x 128/128, $MODE"
  $EMBER bench throughput $COMMON --num-prompts 2000 --input-len 128 --output-len 128 --no-progress \
      --$MODE-cuda-graphs --output-json "$OUT/thr_128_$MODE.json" 2>&1 | grep -E "tok_s|bound|elapsed|host|captured"
done
