#!/usr/bin/env bash
# One device call: GPU tests, cold start from local safetensors, batch-1 latency,
# and the full-size throughput runs (1000 x 1024/1024, 5000 x 128/128).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
EMBER="python3 -m ember.entrypoints.cli"
COMMON="--model Llama-3.1-8B --load-format dummy --max-model-len 4096"
python3 -m pytest -q -x tests/kernels tests/engine/test_gpu_engine.py 2>&1 | tail -5
python3 benchmarks/cold_start.py --dir /tmp/llama8b --json "$OUT/cold_start.json" 2>&1 | tail -12
$EMBER bench latency $COMMON --batch-size 1 --input-len 128 --output-len 256 --output-json "$OUT/latency_b1.json" 2>&1 | grep -E "decode|mbu|host|bound"
$EMBER bench throughput $COMMON --num-prompts 1000 --input-len 1024 --output-len 1024 --no-progress --output-json "$OUT/thr_1024.json" 2>&1 | grep -E "tok_s|bound|elapsed|host"
$EMBER bench throughput $COMMON --num-prompts 5000 --input-len 128 --output-len 128 --no-progress --output-json "$OUT/thr_128.json" 2>&1 | grep -E "tok_s|bound|elapsed|host"
