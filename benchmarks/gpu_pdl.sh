#!/usr/bin/env bash
# One device call: programmatic dependent launch (ember/kernels/pdl.py) on and
# off (EMBER_PDL=0) for whole decode steps of the Llama-3.1-8B preset (dummy
# weights): batch 1 (input 128, output 256) and batch 4 (input 1000, output 200),
# after the kernel tests.
# Usage (device): OUT=$OUT BATCHES="1 4" bash benchmarks/gpu_pdl.sh   [needs msgspec/pyzmq: carry .whl]
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
echo "$GPU"
python3 -m pytest -q -x tests/kernels/test_triton_gemm.py tests/kernels/test_triton_ops.py 2>&1 | tail -1
for B in ${BATCHES:-1 4}; do
  if [ "$B" = 1 ]; then IN=128 OUTLEN=256; else IN=1000 OUTLEN=200; fi
  for P in 0 1; do
    echo "== batch $B, EMBER_PDL=$P"
    EMBER_PDL=$P python3 -m ember.entrypoints.cli bench latency --model Llama-3.1-8B --load-format dummy \
      --max-model-len 4096 --batch-size "$B" --input-len $IN --output-len $OUTLEN \
      --output-json "$OUT/latency_b${B}_pdl${P}_$GPU.json" 2>&1 | grep -E "^(decode_step_ms|decode_tok_s |mbu|copy_gb_s) "
  done
done
