#!/usr/bin/env bash
# The GPU test run: the kernel tests (on CUDA they run at full shapes) and every
# test marked `gpu`, then the plain-PyTorch checks of 4-layer Llama-3.1-8B and
# Qwen3-8B presets. Test modules that need packages the GPU machine lacks are
# reported as collection errors and the rest still run.
# Usage: OUT=results bash benchmarks/gpu/gpu_tests.sh
source "$(dirname "$0")/_common.sh"
gpu_name
cd "$ROOT"
PYTEST="python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors"
timeout "${KERNEL_TIMEOUT:-240}" $PYTEST -m "not slow" tests/kernels --junitxml="$OUT/gpu_kernel_tests.xml" 2>&1 \
    | tee "$OUT/gpu_kernel_tests.log" | grep -E "passed|failed|FAILED|ERROR" | tail -25
timeout "${TEST_TIMEOUT:-300}" $PYTEST -m gpu ${TESTS:-tests/layers tests/models tests/engine tests/sample tests/worker} \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|ERROR" | tail -25
for M in ${CHECKS-Llama-3.1-8B Qwen3-8B}; do
  timeout 120 python3 benchmarks/check_gpu_vs_torch.py --model "$M" --layers 4 2>&1 | tail -1
done
