#!/usr/bin/env bash
# One device call: the input RMSNorm folded into the qkv GEMM with the sums of
# squares the previous layer's down GEMM returns (EMBER_FOLD_NORM_WEIGHTS), checked
# and timed. GPU tests of the GEMM and the engine (greedy against HF), the
# plain-PyTorch checks of 4-layer Qwen3-8B and Llama-3.1-8B, then batch-1 decode
# steps: this code, the code in OLD (a directory holding an older `ember`, e.g.
# from `git archive REV ember | tar -x -C .carry/old`), in turn on the same host,
# and this code with EMBER_FOLD_NORM_WEIGHTS=0. BATCH, IN, OUTLEN change the
# decode row (issue 4's: BATCH=4 IN=1000 OUTLEN=200); TESTS replaces the test files,
# CHECKS the models of the plain-PyTorch check (CHECKS= skips it), NOWEIGHTS=0 the last run.
# Usage (device): OUT=$OUT OLD=.carry/old bash benchmarks/gpu_fold_qkv_norm.sh
set -u
export PYTHONUNBUFFERED=1
ROOT=$PWD; BASE=${PYTHONPATH:-}
OUT=${OUT:-results}; mkdir -p "$OUT"
COMMON="--model Llama-3.1-8B --load-format dummy --max-model-len 4096"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTHONPATH=$ROOT${BASE:+:$BASE}
timeout 400 python3 -m pytest -q ${TESTS:-tests/kernels/test_triton_gemm.py tests/engine/test_gpu_engine.py} \
  2>&1 | grep -E "passed|failed|Error|FAILED|assert" | tail -20
for M in ${CHECKS-Qwen3-8B Llama-3.1-8B}; do
  timeout 120 python3 benchmarks/check_gpu_vs_torch.py --model $M --layers 4 2>&1 | tail -1
done
B=${BATCH:-1}; IN=${IN:-128}; OUTLEN=${OUTLEN:-256}
latency() {  # $1: label, $2: directory whose ember runs
  (cd "$2" && PYTHONPATH=$2${BASE:+:$BASE} python3 -m ember.entrypoints.cli bench latency $COMMON --batch-size $B \
     --input-len $IN --output-len $OUTLEN --output-json "$OUT/latency_b${B}_$1.json" 2>&1 \
     | grep -E "^(decode_step_ms|mbu|copy_gb_s) " | tr '\n' ' '; echo " <- $1")
}
for R in a b; do
  latency new_$R "$ROOT"
  [ -n "${OLD:-}" ] && latency old_$R "$ROOT/$OLD"
done
[ "${NOWEIGHTS:-1}" = 1 ] && export EMBER_FOLD_NORM_WEIGHTS=0 && latency new_noweights "$ROOT"
