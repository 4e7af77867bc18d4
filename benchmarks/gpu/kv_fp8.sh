#!/usr/bin/env bash
# FP8 KV cache on one GPU, in one call (about 4 minutes on an H100):
#   1. the decode-attention kernel over bf16 / FP8 / FP8-with-scales caches at
#      batch 1/64/256 x context 1k/4k/16k: microseconds and GB/s of cache bytes
#      read (benchmarks/kv_fp8.py; first a check of the scaled FP8 kernel
#      against float32 attention over the dequantized cache);
#   2. batch-64 decode on the 8B preset (random bf16 weights), input 1024 /
#      output 128, with --kv-cache-dtype auto, then fp8 with scales calibrated
#      on the first prefill (`ember bench latency`: decode step time, MBU from
#      the bytes read per step, KV bytes in the cache dtype).
# With OLD (a folder holding another version's `ember/` and `benchmarks/`, e.g.
#     mkdir -p .carry/old && git archive REV ember benchmarks | tar -x -C .carry/old
# copied to the GPU machine with the checkout), step 1 first runs that version's
# kernel table on the same machine ($OUT/kv_fp8_decode_kernel_old.json).
# Usage: OUT=results [OLD=.carry/old] bash benchmarks/gpu/kv_fp8.sh
source "$(dirname "$0")/_common.sh"
gpu_name
if [ -n "${OLD:-}" ]; then
  OLD_DIR=$(cd "$OLD" && pwd)
  echo "== kernel table, old: $OLD_DIR"
  (cd "$OLD_DIR" && PYTHONPATH=$OLD_DIR:$BASE_PYTHONPATH python3 benchmarks/kv_fp8.py \
      --json "$OUT/kv_fp8_decode_kernel_old.json") 2>&1 | grep -v -i warn
  echo "== kernel table, new: $ROOT"
fi
python3 "$ROOT/benchmarks/kv_fp8.py" --json "$OUT/kv_fp8_decode_kernel.json" 2>&1 | grep -v -i warn
for KV in auto fp8; do
  EXTRA_KV=""
  [ "$KV" = fp8 ] && EXTRA_KV="--calculate-kv-scales"
  echo "== engine batch 64, 1024 in / 128 out, --kv-cache-dtype $KV $EXTRA_KV"
  $EMBER bench latency $COMMON --batch-size 64 --input-len 1024 --output-len 128 --warmup 1 --iters 2 \
      --kv-cache-dtype "$KV" $EXTRA_KV --output-json "$OUT/kv_fp8_latency_b64_$KV.json" 2>&1 \
      | grep -E "$SHOW_LATENCY|^weight_gb|Error"
done
