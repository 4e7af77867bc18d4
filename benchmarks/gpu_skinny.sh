#!/usr/bin/env bash
# One device call: the skinny decode GEMM (ember/kernels/triton_gemm.py).
# GPU tests of the kernels and the engine, the per-projection probe against
# cuBLAS, then whole decode steps with it on and off (EMBER_SKINNY_GEMM=0):
# batch 4 (issue 4's decode: input 1000, output 200) and batch 1 (issue 3's
# latency row: input 128, output 256), Llama-3.1-8B preset, dummy weights.
# Usage (device): OUT=$OUT bash benchmarks/gpu_skinny.sh   [needs msgspec/pyzmq: carry .whl]
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
echo "$GPU"
python3 -m pytest -q -x tests/kernels/test_triton_gemm.py tests/kernels/test_triton_ops.py \
  tests/engine/test_gpu_engine.py 2>&1 | tail -4
python3 benchmarks/skinny_gemm_probe.py --m ${PROBE_M:-1 4 16} --shapes ${PROBE_SHAPES:-qkv o_proj gate_up down lm_head} --json "$OUT/skinny_probe_$GPU.json" 2>&1 \
  | grep -v -e Warn -e OutOfResources
lat() {  # $1: batch, $2: input, $3: output, $4: tag
  python3 -m ember.entrypoints.cli bench latency --model Llama-3.1-8B --load-format dummy --max-model-len 4096 \
    --batch-size "$1" --input-len "$2" --output-len "$3" --output-json "$OUT/latency_b$1_$4_$GPU.json" 2>&1 \
    | grep -E "^(decode_step_ms|decode_tok_s |mbu|host_ms|copy_gb_s|prefill_s) "
}
for B in ${BATCHES:-4 1}; do
  if [ "$B" = 1 ]; then IN=128 OUTLEN=256; else IN=1000 OUTLEN=200; fi
  echo "== batch $B, cuBLAS"; EMBER_SKINNY_GEMM=0 lat "$B" $IN $OUTLEN cublas
  echo "== batch $B, skinny"; lat "$B" $IN $OUTLEN skinny
done
