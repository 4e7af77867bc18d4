#!/usr/bin/env bash
# DeepSeek MTP speculative decoding against plain decoding (benchmarks/spec_mtp.py):
# the DeepSeek-V3 preset cut to 4 layers at full width plus its MTP layer, random
# weights, k = 1, batch 1 and 32: the step overhead (verify + propose) over a plain
# decode step, and its parts; then the same at 3 layers, to extrapolate the overhead to
# the full 61 layers (PROJECT_DEPTH=0 skips it).
# Usage: OUT=results bash benchmarks/gpu/spec_mtp.sh
source "$(dirname "$0")/_common.sh"
gpu_name
python3 "$ROOT/benchmarks/spec_mtp.py" --layers "${LAYERS:-4}" --k "${K:-1}" --batch-size "${BATCH:-32}" \
    --project-depth "${PROJECT_DEPTH:-61}" \
    --output-len "${OUTLEN:-64}" --json "$OUT/spec_mtp.json" 2>&1 | grep -v -i warn
