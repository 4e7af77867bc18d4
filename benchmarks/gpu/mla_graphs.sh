#!/usr/bin/env bash
# MLA (DeepSeek-V3) on the Triton MLA backend, in CUDA graphs vs eager:
# 1. the MLA kernel and backend tests (GPU ones at DeepSeek's dims), the engine test
#    that DeepSeek-V3 at 4 layers captures CUDA graphs and matches --enforce-eager;
# 2. the kernel against a float32 reference at real dims and its times
#    (benchmarks/gpu/mla_decode.py; SWEEP=1 adds the launch-setting sweep);
# 3. `ember bench latency` of DeepSeek-V3 cut to 4 layers at full width (random
#    weights), batch 1 and 32, with CUDA graphs and with --enforce-eager.
# Usage: OUT=results bash benchmarks/gpu/mla_graphs.sh
source "$(dirname "$0")/_common.sh"
gpu_name
python3 -m pytest -q -x "$ROOT/tests/kernels/test_triton_mla.py" "$ROOT/tests/layers/test_triton_mla_backend.py" \
    "$ROOT/tests/engine/test_mla_cuda_graphs_gpu.py" 2>&1 | tail -3
python3 "$ROOT/benchmarks/gpu/mla_decode.py" ${SWEEP:+--sweep} --json "$OUT/mla_decode.json" 2>&1 | grep -v -i warn
LAT="bench latency --model DeepSeek-V3 --hf-overrides {\"num_hidden_layers\":4} --load-format dummy \
--max-model-len 2048 --input-len ${IN:-512} --output-len ${OUTLEN:-64} --iters 1"
SHOW="^(batch_size|decode_tok_s |decode_step_ms|bound_step_ms|mbu|host_ms_per_step) |Error"
for bs in 1 32; do
  echo "== batch $bs, CUDA graphs"
  $EMBER $LAT --batch-size $bs --output-json "$OUT/dsv3_4l_graphs_b$bs.json" 2>&1 | grep -E "$SHOW"
  echo "== batch $bs, eager"
  $EMBER $LAT --batch-size $bs --enforce-eager --output-json "$OUT/dsv3_4l_eager_b$bs.json" 2>&1 | grep -E "$SHOW"
done
