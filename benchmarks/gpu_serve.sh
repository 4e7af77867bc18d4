#!/usr/bin/env bash
# One device call: issue 4's serving-latency workload on one GPU. `ember serve`
# runs the Llama-3.1-8B preset (dummy bf16 weights, text through the Qwen2.5
# tokenizer given with --tokenizer, whose ids cover Llama's 128,256 vocabulary),
# and `ember bench serve` sends 200 streaming requests at concurrency 4, input
# 1000 / output 200 tokens, for each token budget in $BUDGETS.
# Usage (device): bash benchmarks/gpu_serve.sh   [needs fastapi/uvicorn/pydantic/pyzmq/msgspec]
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; mkdir -p "$OUT"
EMBER="python3 -m ember.entrypoints.cli"
TOKENIZER=${TOKENIZER:-.carry/qwen-tokenizer}
NUM=${NUM:-200}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for BUDGET in ${BUDGETS:-2048 512}; do
  PORT=$((8100 + RANDOM % 800))
  $EMBER serve --model Llama-3.1-8B --load-format dummy --tokenizer "$TOKENIZER" --max-model-len 4096 \
      --max-num-batched-tokens "$BUDGET" --port "$PORT" --log-level warning > "$OUT/serve_$BUDGET.log" 2>&1 &
  SERVER=$!
  START=$(date +%s.%N)
  until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do
    kill -0 $SERVER 2>/dev/null || { echo "server died"; tail -30 "$OUT/serve_$BUDGET.log"; exit 1; }
    sleep 0.5
  done
  echo "budget $BUDGET: server ready in $(echo "$(date +%s.%N) - $START" | bc) s"
  BENCH="$EMBER bench serve --base-url http://127.0.0.1:$PORT --random-input-len 1000 --random-output-len 200 \
         --max-concurrency 4 --no-progress"
  $BENCH --num-prompts 16 > /dev/null  # warm-up (Triton autotune, allocator)
  $BENCH --num-prompts "$NUM" --output-json "$OUT/serve_c4_b$BUDGET.json" 2>&1 | tail -30
  kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
  grep -c '"request_id"' "$OUT/serve_$BUDGET.log" | sed 's/^/request log lines: /'
done
