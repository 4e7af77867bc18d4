#!/usr/bin/env bash
# INT8 W8A8 against bf16 on the 8B preset (one GPU, about 4-5 minutes):
# 1. kernels: benchmarks/quant_int8.py, correctness at every Llama-3.1-8B
#    projection and M = 1, 16, 256, 4096, then µs per call, int8 vs bf16 (and
#    the int8 alternatives at each M, and the decode GEMM's tile sweep);
# 2. engine, bf16 then --quantization w8a8_int8 (random weights quantized at
#    load): `ember bench latency` batch 1, IN/OUTLEN tokens (default 128/256),
#    and `ember bench throughput` NUM_PROMPTS x TIN/TOUT (default 500 x 512/256).
# PARTS picks the parts (default "kernels latency throughput"); EXTRA is passed to `ember bench`.
# Usage: OUT=results [PARTS="kernels"] bash benchmarks/gpu/quant_int8.sh
source "$(dirname "$0")/_common.sh"
gpu_name
IN=${IN:-128}; OUTLEN=${OUTLEN:-256}
NUM_PROMPTS=${NUM_PROMPTS:-500}; TIN=${TIN:-512}; TOUT=${TOUT:-256}
for part in ${PARTS:-kernels latency throughput}; do
  case $part in
    kernels) python3 "$ROOT/benchmarks/quant_int8.py" --json "$OUT/quant_int8_kernels.json" 2>&1 | grep -v -i warn ;;
    latency)
      for q in bf16 w8a8_int8; do
        echo "== latency batch 1, $IN/$OUTLEN, $q"
        qarg=(); [ "$q" != bf16 ] && qarg=(--quantization "$q")
        $EMBER bench latency $COMMON "${qarg[@]}" --batch-size 1 --input-len "$IN" --output-len "$OUTLEN" \
            ${EXTRA:-} --output-json "$OUT/quant_int8_latency_$q.json" 2>&1 | grep -E "$SHOW_LATENCY|Error"
      done ;;
    throughput)
      for q in bf16 w8a8_int8; do
        echo "== throughput $NUM_PROMPTS x $TIN/$TOUT, $q"
        qarg=(); [ "$q" != bf16 ] && qarg=(--quantization "$q")
        $EMBER bench throughput $COMMON "${qarg[@]}" --no-progress --num-prompts "$NUM_PROMPTS" \
            --input-len "$TIN" --output-len "$TOUT" ${EXTRA:-} --output-json "$OUT/quant_int8_thr_$q.json" \
            2>&1 | grep -E "$SHOW_THROUGHPUT|KV cache:|Error"
      done ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
