#!/usr/bin/env bash
# Offline throughput (BENCHMARKS.md, "Offline throughput"): `ember bench
# throughput` on the 8B preset, 1000 x 1024/1024 with a bf16 and an FP8 KV
# cache, then 5000 x 128/128 and HF transformers `generate()` (static batch of
# 64, 128/128, benchmarks/hf_peer.py) in the same call. Each run prints its
# bound (bytes and FLOPs at the copy bandwidth and matmul rate measured in the
# same process) and its fraction of it.
# PARTS picks the runs (default "1024 1024_fp8 128 peer"); EXTRA is passed to
# `ember bench`; TRACE=1 adds --step-trace (where each run's time goes).
# Usage: OUT=results [PARTS="128 peer"] bash benchmarks/gpu/throughput.sh
source "$(dirname "$0")/_common.sh"
gpu_name
for part in ${PARTS:-1024 1024_fp8 128 peer}; do
  case $part in
    1024) bench_throughput 1024 --num-prompts 1000 --input-len 1024 --output-len 1024 ;;
    1024_fp8) bench_throughput 1024_fp8 --num-prompts 1000 --input-len 1024 --output-len 1024 --kv-cache-dtype fp8 ;;
    128) bench_throughput 128 --num-prompts 5000 --input-len 128 --output-len 128 ;;
    peer) timeout "${HF_TIMEOUT:-150}" python3 "$ROOT/benchmarks/hf_peer.py" --preset "$PRESET" \
              --json "$OUT/hf_peer.json" 2>&1 | grep -v -i warn | tail -6 ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
