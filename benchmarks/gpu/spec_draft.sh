#!/usr/bin/env bash
# Draft-model speculative decoding against plain decoding (benchmarks/spec_draft.py):
# draft = target (Llama-3.1-8B preset, k = 4, batch 1) and a small draft of the same
# vocabulary (Llama-3.2-1B preset) at batch 1 and 64; output tok/s, acceptance, and
# the proposer's and the verify step's cost per step.
# Usage: OUT=results bash benchmarks/gpu/spec_draft.sh
source "$(dirname "$0")/_common.sh"
gpu_name
python3 "$ROOT/benchmarks/spec_draft.py" --model "$PRESET" --small-draft "${DRAFT:-Llama-3.2-1B}" \
    --load-format dummy --batch-size "${BATCH:-64}" --output-len "${OUTLEN:-128}" --k "${K:-4}" \
    --json "$OUT/spec_draft.json" 2>&1 | grep -v -i warn
