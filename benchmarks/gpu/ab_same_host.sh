#!/usr/bin/env bash
# Same-host A/B of two versions of Ember on one GPU, back to back, in one call:
# the three single-GPU table workloads on the 8B preset (random bf16 weights),
#   1. batch-1 decode latency, input 128 / output 256 (`ember bench latency`),
#      ROUNDS (2) times per side, alternating;
#   2. offline throughput, 5000 x 128/128;
#   3. offline throughput, $LONG_PROMPTS x 1024/1024.
# Each workload runs old then new right away, so that host-to-host spread (about
# 1% on batch-1 decode between hosts of one GPU kind) does not enter the ratio.
#
# The old side is the `ember` package in $OLD (a folder holding `ember/`, e.g.
#     mkdir -p .carry/old && git archive REV ember | tar -x -C .carry/old
# copied to the GPU machine with the checkout), run with $OLD_FLAGS; the new side is this
# checkout, run with $NEW_FLAGS. Without OLD both sides run this checkout, so a
# kernel switch can be timed alone: OLD_FLAGS="--no-pdl" (or --no-skinny-gemm,
# --no-fold-norm, --no-fold-norm-weights). The old side only gets arguments
# that `ember bench` has long had.
#
# Time: the whole script is sized to finish within 10 minutes. On an H200 the
# runs themselves take about 4 s (latency), 39 s (5000 x 128/128) and 104 s
# (1000 x 1024/1024), plus 10-20 s to start each engine and the first start's
# Triton compiles; an H100 reads the KV cache about 30% slower, so two
# 1000-prompt long runs would leave no margin. LONG_PROMPTS is therefore 500 by
# default (same kernels and batch sizes, two waves of 256 requests instead of
# four); LONG_PROMPTS=1000 ROUNDS=1 reproduces the table's workload on an H200.
# Before each pair the script checks that the pair still fits BUDGET_S
# (default 560 s) by a conservative estimate and skips it otherwise (said so in
# the summary), so the summary always prints.
#
# Output: $OUT/ab_<workload>[_r<round>]_<old|new>.json (the `ember bench` JSON),
# $OUT/ab_summary.json, and a table of old, new and new/old per figure.
# ONLY picks workloads (default "latency short long"), e.g. to give the long run a call
# of its own: ONLY=long LONG_PROMPTS=1000.
# Usage: OUT=results OLD=.carry/old bash benchmarks/gpu/ab_same_host.sh
source "$(dirname "$0")/_common.sh"
OLD_DIR=${OLD:+$(cd "$OLD" && pwd)}
OLD_DIR=${OLD_DIR:-$ROOT}
ROUNDS=${ROUNDS:-2}
LONG_PROMPTS=${LONG_PROMPTS:-500}
BUDGET_S=${BUDGET_S:-560}
ONLY=${ONLY:-latency short long}  # which workloads: latency (batch 1), short (5000 x 128/128), long
gpu_name
echo "old: $OLD_DIR ${OLD_FLAGS:-}"
echo "new: $ROOT ${NEW_FLAGS:-}"
SKIPPED=()

side() {  # old|new NAME ARGS...: one `ember bench` run of one side
  local which=$1 name=$2 dir flags; shift 2
  if [ "$which" = old ]; then dir=$OLD_DIR; flags=${OLD_FLAGS:-}; else dir=$ROOT; flags=${NEW_FLAGS:-}; fi
  local left=$(( BUDGET_S + 30 - SECONDS ))
  (( left < 10 )) && left=10
  # shellcheck disable=SC2086
  (cd "$dir" && PYTHONPATH=$dir:$BASE_PYTHONPATH timeout "$left" python3 -m ember.entrypoints.cli "$@" $flags \
      --output-json "$OUT/ab_${name}_$which.json" 2>&1) \
      | grep -E "$SHOW_LATENCY|^(output_tok_s|fraction_of_bound|elapsed_s) |Error" | tr '\n' ' '
  echo "<- $name $which"
}

pair() {  # NAME ESTIMATE_S ARGS...: old then new, if both fit in what is left
  local name=$1 est=$2; shift 2
  if (( SECONDS + 2 * est > BUDGET_S )); then
    echo "skipped $name: ${SECONDS} s spent, the pair needs about $(( 2 * est )) s"
    SKIPPED+=("$name")
    return
  fi
  side old "$name" "$@"
  side new "$name" "$@"
}

runs() { [[ " $ONLY " == *" $1 "* ]]; }
if runs latency; then
  for r in $(seq 1 "$ROUNDS"); do
    pair "latency_b1_r$r" 30 bench latency $COMMON --batch-size 1 --input-len 128 --output-len 256
  done
fi
runs short && pair thr_128 70 bench throughput $COMMON --no-progress --num-prompts 5000 --input-len 128 --output-len 128
runs long && pair "thr_${LONG_PROMPTS}x1024" $(( 25 + LONG_PROMPTS * 15 / 100 )) bench throughput $COMMON \
    --no-progress --num-prompts "$LONG_PROMPTS" --input-len 1024 --output-len 1024

python3 - "$OUT" "${SKIPPED[@]}" <<'EOF'
import glob, json, os, re, sys

out, skipped = sys.argv[1], sys.argv[2:]
# figure -> True where higher is better
FIGURES = {"latency": {"decode_step_ms": False, "decode_tok_s": True, "mbu": True},
           "throughput": {"output_tok_s": True, "fraction_of_bound": True, "elapsed_s": False}}
runs: dict[str, dict[str, list[dict]]] = {}
for path in sorted(glob.glob(os.path.join(out, "ab_*_old.json")) + glob.glob(os.path.join(out, "ab_*_new.json"))):
    m = re.match(r"ab_(.+)_(old|new)\.json$", os.path.basename(path))
    workload = re.sub(r"_r\d+$", "", m.group(1))
    with open(path) as f:
        runs.setdefault(workload, {}).setdefault(m.group(2), []).append(json.load(f))
summary = {"skipped": skipped, "workloads": {}}
print(f"\n{'workload':<18} {'figure':<18} {'old':>10} {'new':>10} {'new/old':>8}")
for workload, sides in runs.items():
    if not sides.get("old") or not sides.get("new"):
        continue
    first = sides["new"][0]
    rows = {}
    for fig, higher in FIGURES[first["benchmark"]].items():
        old = sum(r[fig] for r in sides["old"]) / len(sides["old"])
        new = sum(r[fig] for r in sides["new"]) / len(sides["new"])
        rows[fig] = {"old": old, "new": new, "ratio": new / old, "higher_is_better": higher,
                     "old_runs": [r[fig] for r in sides["old"]], "new_runs": [r[fig] for r in sides["new"]]}
        print(f"{workload:<18} {fig:<18} {old:>10.4g} {new:>10.4g} {new / old:>8.4f}")
    summary["workloads"][workload] = {"device": first.get("device"), "figures": rows,
                                      "copy_gb_s": [r.get("copy_gb_s") for r in sides["old"] + sides["new"]]}
for name in skipped:
    print(f"{name}: skipped (time)")
with open(os.path.join(out, "ab_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
EOF
