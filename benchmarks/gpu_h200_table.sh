#!/usr/bin/env bash
# One device call (H200): issue 3's table on the current code (asynchronous
# scheduling and piecewise CUDA graphs on, the CUDA defaults): batch-1 latency,
# 1000 x 1024/1024 and 5000 x 128/128 offline throughput on the Llama-3.1-8B
# preset (dummy bf16 weights), then HF transformers on the same shape as the peer.
# Usage (device): OUT=$OUT bash benchmarks/gpu_h200_table.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
EMBER="python3 -m ember.entrypoints.cli"
COMMON="--model Llama-3.1-8B --load-format dummy --max-model-len 4096"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$EMBER bench latency $COMMON --batch-size 1 --input-len 128 --output-len 256 --output-json "$OUT/latency_b1.json" 2>&1 \
    | grep -E "decode|mbu|host|bound|copy|matmul"
$EMBER bench throughput $COMMON --num-prompts 1000 --input-len 1024 --output-len 1024 --no-progress \
    --output-json "$OUT/thr_1024.json" 2>&1 | grep -E "tok_s|bound|elapsed|host|captured"
$EMBER bench throughput $COMMON --num-prompts 5000 --input-len 128 --output-len 128 --no-progress \
    --output-json "$OUT/thr_128.json" 2>&1 | grep -E "tok_s|bound|elapsed|host"
timeout ${HF_TIMEOUT:-150} python3 benchmarks/hf_peer.py --preset Llama-3.1-8B --json "$OUT/hf_peer.json" 2>&1 \
    | grep -v -i warn | tail -8
