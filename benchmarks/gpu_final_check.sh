#!/usr/bin/env bash
# One device call: GPU checks of asynchronous scheduling (engine tests on CUDA,
# graphs on) and piecewise CUDA graphs (vs plain PyTorch on Qwen3-8B, 4 layers),
# then issue 3's table (benchmarks/gpu_h200_table.sh without the HF peer).
# Usage (device): OUT=$OUT bash benchmarks/gpu_final_check.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu_engine.py tests/engine/test_async_scheduling.py \
    tests/core/test_schedule_ahead.py 2>&1 | tail -3
timeout 120 python3 benchmarks/check_gpu_vs_torch.py --model Qwen3-8B --layers 4 --json "$OUT/check_Qwen3-8B.json" 2>&1 \
    | grep -E "^\{|Error|piecewise"
HF_TIMEOUT=1 bash benchmarks/gpu_h200_table.sh
