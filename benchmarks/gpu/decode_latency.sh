#!/usr/bin/env bash
# Batch decode latency (BENCHMARKS.md, "Decode latency"): `ember bench latency`
# on the 8B preset, then (PEER=1) HF transformers `generate()` on the same shape
# in the same call (benchmarks/hf_peer.py; it also times its static batch of 64).
# BATCH, IN, OUTLEN pick the row: 1 / 128 / 256 (default) or 4 / 1000 / 200
# (the serving workload's decode step). EXTRA is passed to `ember bench`, e.g. a
# kernel switch for an A/B: EXTRA="--no-pdl".
# Usage: OUT=results [BATCH=4 IN=1000 OUTLEN=200] [PEER=1] bash benchmarks/gpu/decode_latency.sh
source "$(dirname "$0")/_common.sh"
B=${BATCH:-1}; IN=${IN:-128}; OUTLEN=${OUTLEN:-256}
gpu_name
$EMBER bench latency $COMMON --batch-size "$B" --input-len "$IN" --output-len "$OUTLEN" ${EXTRA:-} \
    --output-json "$OUT/latency_b${B}_in${IN}_out${OUTLEN}.json" 2>&1 | grep -E "$SHOW_LATENCY|Error"
if [ "${PEER:-0}" = 1 ]; then
  timeout "${HF_TIMEOUT:-150}" python3 "$ROOT/benchmarks/hf_peer.py" --preset "$PRESET" --input-len "$IN" \
      --output-len "$OUTLEN" --json "$OUT/hf_peer.json" 2>&1 | grep -v -i warn | tail -6
fi
