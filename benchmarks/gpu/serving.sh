#!/usr/bin/env bash
# Serving latency (BENCHMARKS.md, "Serving"): `ember serve` runs the 8B preset
# ($PRESET, default Llama-3.1-8B; or Qwen3-8B) with random bf16 weights and text
# through the tokenizer files in $TOKENIZER (default .carry/qwen-tokenizer, made
# by `python benchmarks/gpu/save_tokenizer.py`), and `ember bench serve` sends,
# after 16 warm-up requests:
#   - 200 streaming requests at concurrency 4 ($CONC), input 1000 / output 200;
#   - (SAMPLED=1, default) 200 requests with lengths sampled the way SGLang's
#     bench_serving samples them by default for 1000 / 200 (uniform in
#     [1, 1000] and [1, 200]; here input 500 and output 100 with
#     --random-range-ratio 0.99);
#   - (C1=1, default) $C1_NUM (50) requests of 1000 / 200 at concurrency 1,
#     where no request waits for another's prefill.
# One server per token budget (--max-num-batched-tokens) in $BUDGETS (default
# 2048); $EXTRA is passed to `ember serve`. The server's request log (one JSON
# line per request: queue time and TTFT inside the engine) goes to
# $OUT/serve_<preset>_<budget>.log.
# NOTE: the tokenizer's vocabulary must hold every id the model can sample, or
# the text of those tokens is empty and the client sees no chunk until the end
# (TTFT = end-to-end; SmolLM2's 49,152 ids under Llama-3.1-8B do that).
# Qwen2.5's 151,665 ids hold Llama's 128,256, but a few re-tokenized random
# prompts hold Qwen ids past Llama's vocabulary and are refused with a 400
# (8 of 216 at 1000 / 200): the JSON counts them as failed. Qwen3-8B's
# vocabulary holds both.
# Needs the server's wheels on a machine without a package index
# (SERVE=1 bash benchmarks/gpu/fetch_wheels.sh).
# Usage: OUT=results bash benchmarks/gpu/serving.sh
source "$(dirname "$0")/_common.sh"
TOKENIZER=${TOKENIZER:-.carry/qwen-tokenizer}
NUM=${NUM:-200}
CONC=${CONC:-4}
gpu_name
for BUDGET in ${BUDGETS:-2048}; do
  PORT=$((8100 + RANDOM % 800))
  LOG="$OUT/serve_${PRESET}_$BUDGET.log"
  $EMBER serve --model "$PRESET" --load-format dummy --tokenizer "$TOKENIZER" --max-model-len 4096 \
      --max-num-batched-tokens "$BUDGET" --port "$PORT" --log-level warning ${EXTRA:-} > "$LOG" 2>&1 &
  SERVER=$!
  START=$(date +%s)
  until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; do
    kill -0 $SERVER 2>/dev/null || { echo "server died"; tail -30 "$LOG"; exit 1; }
    sleep 0.5
  done
  echo "$PRESET, budget $BUDGET: server ready in $(( $(date +%s) - START )) s"
  bench() {  # NAME CONCURRENCY NUM ARGS...
    local name=$1 conc=$2 num=$3; shift 3
    $EMBER bench serve --base-url "http://127.0.0.1:$PORT" --max-concurrency "$conc" --num-prompts "$num" \
        --no-progress "$@" ${name:+--output-json "$OUT/$name.json"} 2>&1 | tail -30
  }
  bench "" "$CONC" 16 --random-input-len 1000 --random-output-len 200 > /dev/null  # warm-up
  echo "== concurrency $CONC, input 1000 / output 200"
  bench "serve_c${CONC}_${PRESET}_b$BUDGET" "$CONC" "$NUM" --random-input-len 1000 --random-output-len 200
  if [ "${SAMPLED:-1}" = 1 ]; then
    echo "== concurrency $CONC, sampled lengths: input 500 +- 99%, output 100 +- 99%"
    bench "serve_c${CONC}_${PRESET}_b${BUDGET}_sampled" "$CONC" "$NUM" --random-input-len 500 \
        --random-output-len 100 --random-range-ratio 0.99
  fi
  if [ "${C1:-1}" = 1 ]; then
    echo "== concurrency 1, input 1000 / output 200"
    bench "serve_c1_${PRESET}_b$BUDGET" 1 "${C1_NUM:-50}" --random-input-len 1000 --random-output-len 200
  fi
  kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
  grep -c '"request_id"' "$LOG" | sed 's/^/request log lines: /'
done
