# Shared set-up of the GPU benchmark scripts; each one sources it:
#     source "$(dirname "$0")/_common.sh"
# Run the scripts from the repository root of a checkout on the GPU machine.
#
# What it sets up:
# - Python: this checkout's `ember` first on PYTHONPATH (the package need not be
#   installed). A machine without a package index gets the engine's pure-Python
#   dependencies from wheels in .whl/ (made on a networked machine by
#   benchmarks/gpu/fetch_wheels.sh; SERVE=1 there for the server's), installed
#   once into $EMBER_SITE.
# - OUT: the folder the JSON results go to (default: results/, git-ignored).
# - EMBER: the CLI (`python3 -m ember.entrypoints.cli`); COMMON: the model
#   arguments every table uses (the $PRESET architecture, default Llama-3.1-8B,
#   with random bf16 weights: speed depends on shapes, not values).
# - ember_at DIR ARGS...: the CLI of another checkout's `ember` (a folder that
#   holds an `ember/` package), for same-host A/B runs.
# - gpu_name: prints the GPU's name and memory.
# - bench_throughput TAG ARGS...: `ember bench throughput` on $COMMON with ARGS
#   and $EXTRA, its JSON in $OUT/thr_TAG.json (TRACE=1: its step trace in
#   $OUT/trace_TAG.json), printing the lines the tables use.
# shellcheck shell=bash

set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
EMBER_SITE=${EMBER_SITE:-/tmp/ember-site}
if [ -d "$ROOT/.whl" ] && ! python3 -c "import msgspec, zmq, xgrammar, compressed_tensors" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$EMBER_SITE" "$ROOT"/.whl/*.whl
fi
BASE_PYTHONPATH=$EMBER_SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$ROOT:$BASE_PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
EMBER="python3 -m ember.entrypoints.cli"
PRESET=${PRESET:-Llama-3.1-8B}
COMMON="--model $PRESET --load-format dummy --max-model-len 4096"

ember_at() {  # DIR ARGS...: run the `ember` CLI of the checkout in DIR
  local dir
  dir=$(cd "$1" && pwd); shift
  (cd "$dir" && PYTHONPATH=$dir:$BASE_PYTHONPATH python3 -m ember.entrypoints.cli "$@")
}

gpu_name() {
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
}

# The lines of `ember bench latency|throughput` output that the tables use.
SHOW_LATENCY="^(decode_step_ms|decode_tok_s |mbu|bound_step_ms|host_ms_per_step|copy_gb_s|matmul_tflop_s) "
SHOW_THROUGHPUT="^(output_tok_s|fraction_of_bound|bound_output_tok_s|elapsed_s|host_ms_per_step|num_preemptions|copy_gb_s|matmul_tflop_s|trace_)"

bench_throughput() {  # TAG ARGS...
  local tag=$1; shift
  echo "== $tag: $*"
  local trace=()
  [ "${TRACE:-0}" = 1 ] && trace=(--step-trace "$OUT/trace_$tag.json")
  # shellcheck disable=SC2086
  $EMBER bench throughput $COMMON --no-progress "$@" ${EXTRA:-} "${trace[@]}" \
      --output-json "$OUT/thr_$tag.json" 2>&1 | grep -E "$SHOW_THROUGHPUT|KV cache:|Error"
}
