#!/usr/bin/env bash
# One device call: the transposed decode dots (decode_attention's `transposed`).
# Runs the attention GPU tests, benchmarks/decode_transposed_probe.py (checks
# every variant against float32, then times them over bf16 and FP8 caches),
# then 1000 x 1024/1024 offline throughput over an FP8 cache with the probe's
# fastest FP8 variant ($THR_VARIANTS: more variants to run, e.g. "plain").
# Usage (device): OUT=$OUT bash benchmarks/gpu_decode_transposed.sh   [carry .whl: msgspec, pyzmq]
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
EMBER="python3 -m ember.entrypoints.cli"
COMMON="--model Llama-3.1-8B --load-format dummy --max-model-len 4096"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -x tests/kernels/test_triton_attention.py 2>&1 | tail -4
fi
python3 benchmarks/decode_transposed_probe.py --json "$OUT/decode_transposed_probe.json" 2>&1 | tee "$OUT/probe.txt" | tail -40
BEST=$(python3 - "$OUT/decode_transposed_probe.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["timings"] if r["cache"] == "float8_e4m3fn" and r["batch"] == 256]
print(max(rows, key=lambda r: r["tb_s"])["transposed"])
PY
)
echo "fastest FP8 variant at 256x1536: $BEST"
for V in $BEST ${THR_VARIANTS:-}; do
  T=$V; [ "$V" = plain ] && T=""
  EMBER_DECODE_TRANSPOSED="$T" $EMBER bench throughput $COMMON --kv-cache-dtype fp8 --num-prompts 1000 \
      --input-len 1024 --output-len 1024 --no-progress --output-json "$OUT/thr_1024_fp8_${V/,/_}.json" 2>&1 \
      | grep -E "tok_s|bound|elapsed|captured" | sed "s/^/[$V] /"
done
