#!/usr/bin/env bash
# Data-parallel attention (--enable-dp-attention) on 2 GPUs: the GPU test (two
# ranks with NCCL and the Triton MLA kernels give one GPU's greedy tokens on a
# tiny random DeepSeek-V3), then DeepSeek-V3 cut to 4 layers (full width,
# random bf16 weights) at tensor parallelism 2 with and without it: the KV
# cache size the start-up log prints ("KV cache: N blocks ... tokens"; data-
# parallel attention holds about twice the tokens in the same memory, less the
# replicated attention weights) and batch-64 decode speed.
# Usage: OUT=results bash benchmarks/gpu/dp_attention.sh   (2 GPUs)
source "$(dirname "$0")/_common.sh"
gpu_name
timeout 600 python3 -m pytest -q -p no:cacheprovider "$ROOT/tests/distributed/test_dp_attention.py" \
    -k gpu_dp_attention 2>&1 | tail -3
LAT="bench latency --model DeepSeek-V3 --hf-overrides {\"num_hidden_layers\":4} --load-format dummy
     --max-model-len 2048 --input-len 128 --output-len 64 --iters 1 --batch-size 64 -tp 2 --no-enable-prefix-caching"
SHOW="KV cache:|^(decode_tok_s |decode_step_ms|weight_gb) |Error"
$EMBER $LAT --output-json "$OUT/dsv3_4l_tp2.json" 2>&1 | grep -E "$SHOW"
$EMBER $LAT --enable-dp-attention --output-json "$OUT/dsv3_4l_tp2_dp_attention.json" 2>&1 | grep -E "$SHOW"
