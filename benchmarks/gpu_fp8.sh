#!/usr/bin/env bash
# One device call (H200): GPU tests of the FP8 KV cache, then issue 3's offline
# throughput workloads with --kv-cache-dtype fp8, at max_num_seqs 256 (default)
# and 512 (decode graphs now reach 512), and bf16 at 512 as the control.
# Usage (device): OUT=$OUT bash benchmarks/gpu_fp8.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
EMBER="python3 -m ember.entrypoints.cli"
COMMON="--model Llama-3.1-8B --load-format dummy --max-model-len 4096 --no-progress"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_attention.py \
    tests/engine/test_gpu_engine.py 2>&1 | tail -3
run() {  # tag, timeout, args...
  local tag=$1 limit=$2; shift 2
  echo "== $tag"
  timeout "$limit" $EMBER bench throughput $COMMON "$@" --output-json "$OUT/thr_$tag.json" 2>&1 \
      | grep -E "KV cache:|output_tok_s|fraction|elapsed|host|bound_output"
}
run 1024_fp8 130 --num-prompts 1000 --input-len 1024 --output-len 1024 --kv-cache-dtype fp8
run 1024_fp8_seqs512 130 --num-prompts 1000 --input-len 1024 --output-len 1024 --kv-cache-dtype fp8 --max-num-seqs 512
run 128_fp8 70 --num-prompts 5000 --input-len 128 --output-len 128 --kv-cache-dtype fp8
run 1024_bf16_seqs512 140 --num-prompts 1000 --input-len 1024 --output-len 1024 --max-num-seqs 512
