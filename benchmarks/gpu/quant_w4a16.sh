#!/usr/bin/env bash
# W4A16 (AWQ layout): the kernel microbenchmark with its correctness check at
# the Llama-3.1-8B shapes (benchmarks/quant_w4a16.py; SWEEP=0 skips the decode
# kernel's tile sweep), then batch-1 decode 128/256 on the 8B preset with
# random weights, bf16 and `--quantization awq` (dummy int4 packs and scales)
# in the same call.
# Usage: OUT=results [SWEEP=0] bash benchmarks/gpu/quant_w4a16.sh
source "$(dirname "$0")/_common.sh"
gpu_name
cd "$ROOT"
timeout "${KERNEL_TIMEOUT:-180}" python3 benchmarks/quant_w4a16.py $([ "${SWEEP:-1}" = 1 ] && echo --sweep) \
    --json "$OUT/quant_w4a16_kernels.json" 2>&1 | grep -v -i warn
for Q in none awq; do
  echo "== batch-1 decode 128/256, weights: $Q"
  QARG=$([ "$Q" = none ] || echo "--quantization $Q")
  timeout "${DECODE_TIMEOUT:-150}" $EMBER bench latency $COMMON $QARG --batch-size 1 --input-len 128 \
      --output-len 256 --output-json "$OUT/latency_b1_in128_out256_$Q.json" 2>&1 | grep -E "$SHOW_LATENCY|Error"
done
