#!/usr/bin/env bash
# One device call (H200): every GPU test, the decode-fusion probe, then issue 3's batch-1 row twice and
# the 1000 x 1024/1024 throughput row on the current code, then a batch-1 decode
# kernel profile. THR=0 / PROFILE=0 skip those parts.
# Usage (device): OUT=$OUT bash benchmarks/gpu_verify_h200.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
EMBER="python3 -m ember.entrypoints.cli"
COMMON="--model Llama-3.1-8B --load-format dummy --max-model-len 4096"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 300 python3 -m pytest -q -m gpu $(grep -rl "mark.gpu" tests --include="test_*.py" | grep -v entrypoints) \
  2>&1 | grep -E "passed|failed|Error|FAILED" | tail -12
# The fused gate (asserted bit-identical to the unfused pair) and the argmax, timed.
python3 benchmarks/decode_fusion_probe.py --m 1 4 16 2>&1 | grep -v Warn
for R in a b; do
  $EMBER bench latency $COMMON --batch-size 1 --input-len 128 --output-len 256 --output-json "$OUT/latency_b1_$R.json" 2>&1 \
    | grep -E "^(decode_step_ms|decode_tok_s |mbu|host_ms|copy_gb_s) "
done
[ "${THR:-1}" = 1 ] && $EMBER bench throughput $COMMON --num-prompts 1000 --input-len 1024 --output-len 1024 --no-progress \
    --output-json "$OUT/thr_1024.json" 2>&1 | grep -E "tok_s|bound|elapsed|host"
[ "${PROFILE:-1}" = 1 ] && timeout 120 python3 benchmarks/profile_step.py --prompt-len 128 --decode-batch 1 --decode-steps 20 2>&1 | tail -40
