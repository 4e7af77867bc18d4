#!/usr/bin/env bash
# One device call: asynchronous scheduling on one GPU. Runs the GPU and
# async-scheduling tests, then `ember bench latency` at batch 4, input 1000 /
# output 200 (issue 4's decode shape) on Llama-3.1-8B dummy weights, with
# asynchronous scheduling on and off.
# Usage (device): OUT=$OUT bash benchmarks/gpu_async.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
MODEL=${MODEL:-Llama-3.1-8B}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu_engine.py tests/engine/test_async_scheduling.py tests/sample \
    tests/core/test_schedule_ahead.py 2>&1 | tail -4
for MODE in async sync; do
  echo "== $MODEL, $MODE scheduling"
  FLAG=--$([ $MODE = sync ] && echo no-)async-scheduling
  python3 -m ember.entrypoints.cli bench latency --model "$MODEL" --load-format dummy --max-model-len 4096 \
      --batch-size 4 --input-len 1000 --output-len 200 --iters 3 $FLAG \
      --output-json "$OUT/latency_b4_${MODEL}_$MODE.json" 2>&1 | tail -12
done
