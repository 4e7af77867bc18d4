#!/usr/bin/env bash
# GGUF kept quantized on the GPU: the GEMV kernels per ggml type (M = 1, 16 at
# 4096x4096 and 14336x4096: GB/s of the quantized bytes, speed-up over the bf16
# skinny GEMM, error against float32), then batch-1 decode tok/s of the bundled
# GGUF models quantized vs dequantized to bf16 (benchmarks/quant_gguf.py).
# The models travel as parts (benchmarks/gpu/gguf_carry.py split, here; one part
# per call); the parts already on the machine are joined into /tmp/ember-gguf,
# and the models whose parts are all there are timed. Reading GGUF files needs
# the gguf package: .whl/ from benchmarks/gpu/fetch_wheels.sh (GGUF=1).
# Usage: OUT=results bash benchmarks/gpu/quant_gguf.sh
source "$(dirname "$0")/_common.sh"
gpu_name
MODELS=()
if python3 -c "import gguf" 2>/dev/null; then
  mapfile -t MODELS < <(python3 "$ROOT/benchmarks/gpu/gguf_carry.py" join /tmp/ember-gguf)
else
  echo "gguf is not installed: kernels only (carry .whl/ made with GGUF=1 for the models)"
fi
python3 "$ROOT/benchmarks/quant_gguf.py" --models ${MODELS[@]+"${MODELS[@]}"} --json "$OUT/quant_gguf.json" 2>&1 \
    | grep -v -E "Warning|warn\(|it/s\]|tensor/s\]"
