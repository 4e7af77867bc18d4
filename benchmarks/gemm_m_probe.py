"""The 8B preset's linear layers at throughput-step row counts: cuBLAS (and
cuBLASLt) against the bound, and a plain Triton GEMM as a second opinion (GPU).

The step traces of the offline throughput runs put a full decode step at batch
256 at 10.6 ms (5000 x 128/128) and 20.1 ms (1000 x 1024/1024) against about
6.4 and 17.2 ms from the bytes and FLOPs (BENCHMARKS.md); this times the GEMMs
of such steps alone. Each projection is timed over 8 weight copies in turn
(more than the L2 holds) inside a CUDA graph, median of ``do_bench``, and
compared with max(weight + activation bytes / copy bandwidth, FLOPs / matmul
rate), both measured here first by the bench tool's ``measure_ceilings``.

    python benchmarks/gemm_m_probe.py [--m 128 256 512 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from graph_timing import graph_time_us
from ember.entrypoints.bench.roofline import measure_ceilings

# name -> (N, K) of y = x @ W^T for the Llama-3.1-8B shape; per step: 32 of each layer, one LM head
SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
COPIES = 8


@triton.jit
def _matmul_kernel(X, W, Y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    # y[M, N] = x[M, K] @ w[N, K]^T, tiles grouped along M for L2 reuse (Triton tutorial 03's order).
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group_id = pid // (GROUP * num_n)
    first_m = group_id * GROUP
    size_m = min(num_m - first_m, GROUP)
    pid_m = first_m + (pid % (GROUP * num_n)) % size_m
    pid_n = (pid % (GROUP * num_n)) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        x = tl.load(X + offs_m[:, None] * K + (k + offs_k)[None, :], mask=offs_m[:, None] < M, other=0.0)
        w = tl.load(W + offs_n[:, None] * K + (k + offs_k)[None, :], mask=offs_n[:, None] < N, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(Y + offs_m[:, None] * N + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def triton_linear(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cfg: tuple[int, int, int, int, int]) -> None:
    bm, bn, bk, warps, stages = cfg
    M, K = x.shape
    N = w.shape[0]
    _matmul_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](x, w, y, M, N, K, BM=bm, BN=bn, BK=bk, GROUP=8,
                                                            num_warps=warps, num_stages=stages)


TRITON_CONFIGS = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 256, 64, 4, 4), (256, 128, 64, 8, 3),
                  (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[128, 256, 512, 2048])
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-triton", action="store_true")
    args = ap.parse_args()
    ceil = measure_ceilings(torch.device("cuda"))  # the bench tool's: the same method as its roofline
    tb_s, tflop_s = ceil.copy_bytes_per_s / 1e12, ceil.matmul_flops_per_s / 1e12
    print(f"{torch.cuda.get_device_name()}: copy {tb_s * 1e3:.0f} GB/s, bf16 matmul {tflop_s:.0f} TFLOP/s")
    rows = []
    for name, (n, k) in SHAPES.items():
        copies = 2 if name == "lm_head" else COPIES
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            bound_us = max(2 * (n * k + m * k + m * n) / tb_s / 1e6, 2 * m * n * k / tflop_s / 1e6)
            row = {"shape": name, "m": m, "n": n, "k": k, "bound_us": bound_us}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                row[lib + "_us"] = graph_time_us(lambda i: torch.mm(x, ws[i % copies].t(), out=y), COPIES)
            torch.backends.cuda.preferred_blas_library("cublas")
            if not args.no_triton:
                ref = F.linear(x.float(), ws[0].float())
                best = None
                for cfg in TRITON_CONFIGS:
                    try:
                        triton_linear(x, ws[0], y, cfg)
                        err = ((y.float() - ref).norm() / ref.norm()).item()
                        assert err < 1e-2, f"Triton GEMM {cfg}: relative error {err}"
                        us = graph_time_us(lambda i: triton_linear(x, ws[i % copies], y, cfg), COPIES)
                    except triton.runtime.errors.OutOfResources:
                        continue
                    if best is None or us < best[0]:
                        best = (us, cfg)
                row["triton_us"], row["triton_cfg"] = best
            rows.append(row)
            best_lib = min(row["cublas_us"], row["cublaslt_us"])
            print(f"{name:<8} M={m:<5} bound {bound_us:7.1f} us  cuBLAS {row['cublas_us']:7.1f}  "
                  f"cuBLASLt {row['cublaslt_us']:7.1f}  Triton {row.get('triton_us', float('nan')):7.1f} "
                  f"{row.get('triton_cfg', '')}  (best lib at {bound_us / best_lib:.0%} of bound)")
        del ws
    print("\nper decode step (32 layers + LM head), ms:")
    for m in args.m:
        sel = [r for r in rows if r["m"] == m]
        weight = {r["shape"]: (1 if r["shape"] == "lm_head" else 32) for r in sel}
        for key in ("bound_us", "cublas_us", "cublaslt_us", "triton_us"):
            if all(key in r for r in sel):
                print(f"  M={m:<5} {key[:-3]:<9} {sum(r[key] * weight[r['shape']] for r in sel) / 1e3:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_tb_s": tb_s, "matmul_tflop_s": tflop_s,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
