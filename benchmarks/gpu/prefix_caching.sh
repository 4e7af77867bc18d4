#!/usr/bin/env bash
# Prefix caching on the GPU (BENCHMARKS.md, "Prefix caching"): the same
# workloads with caching on and off in one process (benchmarks/bench_prefix_caching.py),
# 16 GiB of KV cache per engine (131,072 tokens: the 64 x 2,100-token workload
# does not fit at once without caching), eager (CUDA graphs change only decode
# steps, the same for both engines).
# Usage: OUT=results bash benchmarks/gpu/prefix_caching.sh
source "$(dirname "$0")/_common.sh"
gpu_name
python3 "$ROOT/benchmarks/bench_prefix_caching.py" --model "$PRESET" --load-format dummy --device cuda \
    --enforce-eager --max-model-len 4096 --kv-cache-memory 17179869184 --num-requests 64 --prefix-len 2000 \
    --suffix-len 100 --output-len 32 --conversations 16 --turns 3 --system-len 1000 --user-len 100 \
    --unique-len 1024 --repeats 4 --json "$OUT/prefix_caching.json" 2>&1 | tail -30
