"""INT8 W8A8 kernels at the Llama-3.1-8B projections against bf16 (GPU):
correctness at every shape, then time per call.

For M in (1, 16, 256, 4096) rows and each projection (qkv, o_proj, gate_up,
down), on random data:

- check: the W8A8 layer (:func:`ember.kernels.triton_int8.w8a8_int8_linear`,
  the path a model takes) against the float32 product of its own quantized
  operands (must agree to bf16 rounding: relative error < 4e-3) and against
  the bf16 product of the unquantized operands (the int8 error: < 3e-2);
  ``FAIL`` lines and a non-zero exit when one misses;
- time (µs per call, median of ``triton.testing.do_bench`` over a CUDA graph
  replaying the call on 4 weight copies in turn, so weights come from HBM):
  bf16 ``F.linear`` (cuBLAS), Ember's bf16 skinny GEMM where it applies (M <=
  16), the int8 layer, and its alternatives at that M: the Triton GEMM with
  the activation quantization fused or separate (M <= 16), ``torch._int_mm``
  + epilogue and the Triton GEMM (M > 16), plus the tile sweep of the decode
  GEMM at M = 1.

    python benchmarks/quant_int8.py [--m 1 16 256 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton

from graph_timing import graph_time_us
from ember.kernels import triton_int8 as k8
from ember.kernels.triton_gemm import skinny_linear, use_skinny_linear
from ember.layers.quantization.int8_weight_only import quantize_per_channel_int8

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
COPIES = 4
DECODE_TILES = [(16, 32, 512, 4, 4), (16, 64, 512, 3, 4), (16, 32, 1024, 3, 4), (16, 64, 256, 4, 4),
                (16, 128, 256, 3, 4), (16, 32, 256, 6, 4), (16, 32, 512, 4, 8)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check(name: str, m: int, x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor) -> list[str]:
    y = k8.w8a8_int8_linear(x, w_q, w_s, None, None)
    x_q, x_s = k8.per_token_quant_int8(x)
    exact = (x_q.float() * x_s[:, None]) @ (w_q.float() * w_s[:, None]).t()
    own, vs_bf16 = _rel(y, exact), _rel(y, F.linear(x, w))
    finite = bool(torch.isfinite(y.float()).all())
    ok = finite and own < 4e-3 and vs_bf16 < 3e-2
    print(f"check {name:8s} M={m:5d}: vs own float32 {own:.1e}  vs bf16 {vs_bf16:.1e}  "
          f"{'OK' if ok else 'FAIL'}")
    return [] if ok else [f"{name} M={m}"]


def time_shape(name: str, m: int, n: int, k: int, results: list[dict]) -> list[str]:
    g = torch.Generator(device="cuda").manual_seed(m + n)
    ws = [(torch.randn(n, k, generator=g, device="cuda") * k ** -0.5).to(torch.bfloat16) for _ in range(COPIES)]
    qs = [quantize_per_channel_int8(w) for w in ws]
    x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
    x[:, 1] = 1e4 if m > 1 else x[:, 1]  # an outlier column (1e4) in the batched runs
    failures = check(name, m, x, ws[0], *qs[0])
    x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
    row = {"shape": name, "m": m, "n": n, "k": k}
    row["bf16_cublas_us"] = graph_time_us(lambda i: F.linear(x, ws[i]), COPIES)
    if use_skinny_linear(x, ws[0]):
        row["bf16_skinny_us"] = graph_time_us(lambda i: skinny_linear(x, ws[i]), COPIES)
    row["int8_layer_us"] = graph_time_us(lambda i: k8.w8a8_int8_linear(x, qs[i][0], qs[i][1], None, None), COPIES)
    x_q, x_s = k8.per_token_quant_int8(x)
    row["int8_quant_only_us"] = graph_time_us(lambda i: k8.per_token_quant_int8(x), COPIES)
    if m <= k8.SKINNY_MAX_M:
        row["int8_triton_fused_quant_us"] = graph_time_us(
            lambda i: k8.int8_gemm(x, qs[i][0], None, qs[i][1], None, torch.bfloat16, quantize_x=True), COPIES)
        row["int8_triton_gemm_only_us"] = graph_time_us(
            lambda i: k8.int8_gemm(x_q, qs[i][0], x_s, qs[i][1], None, torch.bfloat16), COPIES)
        if m == 1:
            for tiles in DECODE_TILES:
                try:
                    row[f"int8_tiles_{'x'.join(map(str, tiles))}_us"] = graph_time_us(
                        lambda i: k8.int8_gemm(x, qs[i][0], None, qs[i][1], None, torch.bfloat16,
                                               quantize_x=True, tiles=tiles), COPIES)
                except Exception as e:  # a tile that does not fit shared memory
                    print(f"  tiles {tiles}: {type(e).__name__}")
    else:
        row["int8_int_mm_epilogue_us"] = graph_time_us(
            lambda i: k8.int8_scaled_mm(x_q, qs[i][0], x_s, qs[i][1], None, torch.bfloat16), COPIES)
        row["int8_triton_gemm_only_us"] = graph_time_us(
            lambda i: k8.int8_gemm(x_q, qs[i][0], x_s, qs[i][1], None, torch.bfloat16), COPIES)
    best_bf16 = min(row["bf16_cublas_us"], row.get("bf16_skinny_us", float("inf")))
    row["speedup_vs_bf16"] = best_bf16 / row["int8_layer_us"]
    extra = "  ".join(f"{key[:-3]}={v:.1f}" for key, v in row.items()
                      if key.endswith("_us") and key not in ("bf16_cublas_us", "bf16_skinny_us", "int8_layer_us"))
    print(f"time  {name:8s} M={m:5d}: bf16 {best_bf16:8.1f} us  int8 {row['int8_layer_us']:8.1f} us  "
          f"x{row['speedup_vs_bf16']:.2f}  | {extra}")
    results.append(row)
    return failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 256, 4096])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 references are full float32
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}")
    results: list[dict] = []
    failures: list[str] = []
    for m in args.m:
        for name, (n, k) in SHAPES.items():
            failures += time_shape(name, m, n, k, results)
        per_layer = {key: sum(r[key] for r in results if r["m"] == m and key in r)
                     for key in ("bf16_cublas_us", "int8_layer_us")}
        print(f"sum   one decoder layer M={m:5d}: bf16 cuBLAS {per_layer['bf16_cublas_us']:.1f} us, "
              f"int8 {per_layer['int8_layer_us']:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": results, "failures": failures}, f, indent=1)
    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)
    print("all checks OK")


if __name__ == "__main__":
    main()
