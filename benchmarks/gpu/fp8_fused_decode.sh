#!/usr/bin/env bash
# FP8 decode fusions (benchmarks/gpu/fp8_fused_decode.py): a Llama-3.1-8B
# layer's FP8 projections with the RMSNorms folded into the W8A16 GEMV and the
# residual adds in its epilogue, against the unfused norm kernels + GEMVs
# (--no-fold-norm), per projection and per layer, M = 1, 4, 16, outputs checked
# against float32. Then (E2E=1) batch-1 and batch-4 decode with
# `--quantization fp8`, fused and --no-fold-norm, on the same machine. About a
# minute for the kernels, 2-3 more minutes with E2E=1 on one H100.
# Usage: OUT=results [E2E=1] bash benchmarks/gpu/fp8_fused_decode.sh [--m 1 4 16]
source "$(dirname "$0")/_common.sh"
gpu_name
python3 "$ROOT/benchmarks/gpu/fp8_fused_decode.py" --json "$OUT/fp8_fused_decode.json" "$@" 2>&1 | grep -v -i warn
if [ "${E2E:-0}" = 1 ]; then
  for shape in "1 128 256" "4 1000 200"; do
    set -- $shape
    for fold in "" "--no-fold-norm"; do
      echo "== batch $1, in $2, out $3, --quantization fp8 ${fold:-(fused)}"
      $EMBER bench latency $COMMON --quantization fp8 --batch-size "$1" --input-len "$2" --output-len "$3" $fold \
          --output-json "$OUT/latency_fp8_b$1${fold:+_nofold}.json" 2>&1 | grep -E "$SHOW_LATENCY|Error"
    done
  done
fi
