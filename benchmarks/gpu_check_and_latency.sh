#!/usr/bin/env bash
# One device call: GPU tests (kernels vs torch backend, whole GPU path vs HF),
# then batch-1 decode latency on the Llama-3.1-8B preset.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 -m pytest -q -x tests/kernels tests/engine/test_gpu_engine.py 2>&1 | tail -30
python3 -m ember.entrypoints.cli bench latency --model Llama-3.1-8B --load-format dummy --max-model-len 8192 \
  --batch-size 1 --input-len 128 --output-len 256 --output-json "$OUT/latency_b1.json" 2>&1 | grep -v Warning | tail -25
