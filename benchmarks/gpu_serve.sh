#!/usr/bin/env bash
# One device call: issue 4's serving-latency workload on one GPU. `ember serve`
# runs an 8B preset ($MODEL: Llama-3.1-8B by default, or Qwen3-8B) with dummy
# bf16 weights and text through the tokenizer files in $TOKENIZER (default
# .carry/qwen-tokenizer, made here by `python benchmarks/device_tokenizer.py
# Qwen2.5-Coder-0.5B-Instruct .carry/qwen-tokenizer`), and
# `ember bench serve` sends 200 streaming requests at concurrency 4 ($CONC), input
# 1000 / output 200 tokens, for each token budget (--max-num-batched-tokens) in
# $BUDGETS; $EXTRA is passed to `ember serve` (e.g. EXTRA=--no-async-scheduling TAG=_sync).
# SAMPLED=1 also runs, on the same server, lengths sampled the way SGLang's
# bench_serving samples them by default for 1000 / 200 (--random-range-ratio 0:
# uniform in [1, 1000] and [1, 200]), here input 500 and output 100 with
# --random-range-ratio 0.99; C1=1 also runs the lengths at concurrency 1
# ($C1_NUM requests), where no request waits for another's prefill.
# NOTE: the tokenizer's vocabulary must hold every id the model can sample, or
# the text of those tokens is empty and the client sees no chunks (seen with
# SmolLM2's 49,152 ids under Llama-3.1-8B, 2026-12-01: TTFT = end-to-end). Qwen2.5's
# 151,665 hold Llama's 128,256, but a few re-tokenized prompts hold Qwen ids past
# Llama's vocabulary and are refused (400): 8 of 216. Qwen3-8B's vocabulary covers both.
# Usage (device): bash benchmarks/gpu_serve.sh   [carry .whl (SERVE=1 benchmarks/device_wheels.sh) and .carry]
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
EMBER="python3 -m ember.entrypoints.cli"
TOKENIZER=${TOKENIZER:-.carry/qwen-tokenizer}
MODEL=${MODEL:-Llama-3.1-8B}
NUM=${NUM:-200}
CONC=${CONC:-4}
EXTRA=${EXTRA:-}
TAG=${TAG:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for BUDGET in ${BUDGETS:-2048 512}; do
  PORT=$((8100 + RANDOM % 800))
  $EMBER serve --model "$MODEL" --load-format dummy --tokenizer "$TOKENIZER" --max-model-len 4096 \
      --max-num-batched-tokens "$BUDGET" --port "$PORT" --log-level warning $EXTRA > "$OUT/serve_${MODEL}_$BUDGET$TAG.log" 2>&1 &
  SERVER=$!
  START=$(date +%s)
  until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; do
    kill -0 $SERVER 2>/dev/null || { echo "server died"; tail -30 "$OUT/serve_${MODEL}_$BUDGET$TAG.log"; exit 1; }
    sleep 0.5
  done
  echo "$MODEL, budget $BUDGET: server ready in $(( $(date +%s) - START )) s"
  BENCH="$EMBER bench serve --base-url http://127.0.0.1:$PORT --random-input-len 1000 --random-output-len 200 \
         --max-concurrency $CONC --no-progress"
  $BENCH --num-prompts 16 > /dev/null  # warm-up (Triton autotune, allocator)
  $BENCH --num-prompts "$NUM" --output-json "$OUT/serve_c${CONC}_${MODEL}_b$BUDGET$TAG.json" 2>&1 | tail -30
  if [ "${SAMPLED:-0}" = 1 ]; then
    echo "== sampled lengths: input 500 +- 99%, output 100 +- 99%"
    $EMBER bench serve --base-url http://127.0.0.1:$PORT --random-input-len 500 --random-output-len 100 \
        --random-range-ratio 0.99 --max-concurrency $CONC --no-progress --num-prompts "$NUM" \
        --output-json "$OUT/serve_c${CONC}_${MODEL}_b${BUDGET}_sampled$TAG.json" 2>&1 | tail -30
  fi
  if [ "${C1:-0}" = 1 ]; then
    echo "== concurrency 1, input 1000 / output 200"
    $EMBER bench serve --base-url http://127.0.0.1:$PORT --random-input-len 1000 --random-output-len 200 \
        --max-concurrency 1 --no-progress --num-prompts "${C1_NUM:-50}" \
        --output-json "$OUT/serve_c1_${MODEL}_b$BUDGET$TAG.json" 2>&1 | tail -30
  fi
  kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
  grep -c '"request_id"' "$OUT/serve_${MODEL}_$BUDGET$TAG.log" | sed 's/^/request log lines: /'
done
