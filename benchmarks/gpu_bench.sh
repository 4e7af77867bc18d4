#!/usr/bin/env bash
# One device call: GPU tests, then the issue-3 table on the Llama-3.1-8B preset
# (dummy bf16 weights) and HF transformers as the peer on the same shape.
# Usage: bash benchmarks/gpu_bench.sh [quick]
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
EMBER="python3 -m ember.entrypoints.cli"
COMMON="--model Llama-3.1-8B --load-format dummy --max-model-len 4096"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 -m pytest -q -x tests/kernels tests/engine/test_gpu_engine.py 2>&1 | tail -15
$EMBER bench latency $COMMON --batch-size 1 --input-len 128 --output-len 256 --output-json "$OUT/latency_b1.json" 2>&1 | grep -E "decode|mbu|host|bound|copy|matmul|device"
[ "${1:-}" = quick ] && exit 0
$EMBER bench throughput $COMMON --num-prompts ${NUM_LONG:-200} --input-len 1024 --output-len 1024 --no-progress --output-json "$OUT/thr_1024.json" 2>&1 | grep -E "tok_s|bound|elapsed|host|num_prompts"
$EMBER bench throughput $COMMON --num-prompts ${NUM_SHORT:-1000} --input-len 128 --output-len 128 --no-progress --output-json "$OUT/thr_128.json" 2>&1 | grep -E "tok_s|bound|elapsed|host|num_prompts"
python3 benchmarks/hf_peer.py --preset Llama-3.1-8B --json "$OUT/hf_peer.json" 2>&1 | grep -v -i warn | tail -8
