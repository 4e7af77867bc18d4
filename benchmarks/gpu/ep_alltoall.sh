#!/usr/bin/env bash
# Expert-parallel dispatch on every visible GPU (at least 2; NCCL): the
# all-reduce form against the all-to-all form.
# 1. One FusedMoE layer (benchmarks/ep_alltoall.py) at Qwen3-30B-A3B and
#    DeepSeek-V3 expert shapes, 1 to 16384 tokens per step: ms of each form,
#    the forms' largest relative difference (bf16 rounding), and the token
#    count from which the all-to-all form is faster (the value for
#    ALLTOALL_MIN_TOKENS in ember/layers/moe/layer.py).
# 2. Offline throughput of the Qwen3-30B-A3B preset (random weights) at
#    tensor parallel = every GPU with --enable-expert-parallel and
#    --expert-parallel-dispatch allreduce, alltoall (steps run eagerly) and auto.
# Usage: OUT=results [SHAPES="qwen3-30b-a3b"] [PARTS="layer engine"] bash benchmarks/gpu/ep_alltoall.sh
source "$(dirname "$0")/_common.sh"
gpu_name
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
for part in ${PARTS:-layer engine}; do
  case $part in
    layer)
      for shape in ${SHAPES:-qwen3-30b-a3b deepseek-v3}; do
        timeout 900 python3 "$ROOT/benchmarks/ep_alltoall.py" --world "$NGPU" --shape "$shape" \
            --json "$OUT/ep_alltoall_$shape.json" 2>&1 | grep -vE "^\[ember\]|Warning|warn\("
      done ;;
    engine)
      for dispatch in allreduce alltoall auto; do
        echo "== Qwen3-30B-A3B -tp $NGPU --enable-expert-parallel --expert-parallel-dispatch $dispatch"
        timeout 900 $EMBER bench throughput --model Qwen3-30B-A3B --load-format dummy --max-model-len 2048 \
            -tp "$NGPU" --enable-expert-parallel --expert-parallel-dispatch $dispatch --no-progress \
            --num-prompts ${NUM_PROMPTS:-500} --input-len 1024 --output-len 128 \
            --output-json "$OUT/ep_thr_$dispatch.json" 2>&1 | grep -E "$SHOW_THROUGHPUT|Error"
      done ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
