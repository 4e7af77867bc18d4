#!/usr/bin/env bash
# N-gram speculative decoding against plain decoding (benchmarks/spec_decode.py):
# greedy tokens compared on the GPU, output tok/s at batch 1 and 64, acceptance.
# Usage: OUT=results bash benchmarks/gpu/spec_decode.sh
source "$(dirname "$0")/_common.sh"
gpu_name
python3 "$ROOT/benchmarks/spec_decode.py" --model "$PRESET" --load-format dummy --batch-size "${BATCH:-64}" \
    --output-len "${OUTLEN:-256}" --k "${K:-4}" --json "$OUT/spec_decode.json" 2>&1 | grep -v -i warn
