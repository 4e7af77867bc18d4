#!/usr/bin/env bash
# Verification steps in CUDA graphs: the GPU tests (verify kernel at Llama-3.1-8B
# shapes; greedy n-gram and draft = target speculation with and without the
# verification graphs on SmolLM2 in float32), then benchmarks/spec_verify_graphs.py
# on the $PRESET (Llama-3.1-8B) with random weights: plain decode step against the
# verification step (graphed, piecewise, eager) at batch 1 and 8 for k = 1..4.
# Usage: OUT=results bash benchmarks/gpu/spec_verify_graphs.sh   (about 2-3 minutes)
source "$(dirname "$0")/_common.sh"
gpu_name
cd "$ROOT"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
    tests/kernels/test_verify_attention.py tests/worker/test_verify_graphs.py tests/spec_decode/test_verify_graphs_gpu.py \
    2>&1 | tee "$OUT/spec_verify_graphs_tests.log" | grep -E "passed|failed|FAILED|ERROR|Error" | tail -15
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/spec_verify_graphs.py --model "$PRESET" --load-format dummy \
    --k "${K:-4}" --batches "${BATCHES:-1,8}" --json "$OUT/spec_verify_graphs.json" 2>&1 | grep -v -i warn
