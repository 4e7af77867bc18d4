"""Decode GEMMs (M = 1..16 rows) of the Llama-3.1-8B shape: cuBLAS paths and a
Triton kernel, timed the way a decode step meets them.

Each projection is timed over 32 distinct weights (one per layer, as in a real
step), captured in one CUDA graph of 32 calls and replayed, so that no weight is
still in the L2 cache when it is read again: an earlier probe that replayed one
weight overstated a Triton kernel by 2-8% (BENCHMARKS.md). Printed: microseconds
per call and the achieved weight-read bandwidth (weight bytes / time); each
Triton result is checked against a float32 product first.

Variants: ``linear`` (``F.linear``, cuBLAS as PyTorch calls it), ``linear_lt``
(the same with ``torch.backends.cuda.preferred_blas_library("cublaslt")``),
``mm_t`` (``W @ x.T``, the product transposed, so cuBLAS sees N = M rows),
``triton BNxBK wW sS`` (no split-K: one program per BLOCK_N output columns, a
pipelined loop over K; ``ember.kernels.triton_gemm``), ``ember`` (that
kernel with the tiles ``skinny_linear`` picks). The LM head is timed over 4
copies (each is 1 GB, far beyond the L2 cache).

Usage (GPU): python benchmarks/skinny_gemm_probe.py [--m 1 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton

from ember.kernels.triton_gemm import launch_skinny_gemm, skinny_linear

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
LAYERS = 32


def skinny(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, block_n: int, block_k: int, warps: int,
           stages: int) -> torch.Tensor:
    launch_skinny_gemm(x, w, None, out, block_n, block_k, stages, warps)
    return out


def time_graph(calls, replays: int = 20) -> float:
    """Seconds per replay of a CUDA graph holding ``calls`` (a list of thunks)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up / compile outside the capture
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}")
    big = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(big)
    copy_s = time_graph([lambda: dst.copy_(big)])
    print(f"copy bandwidth (read + write, 1 GiB): {2 * big.numel() * 2 / copy_s / 1e12:.2f} TB/s")
    del big, dst
    results = []
    configs = list(itertools.product((16, 32, 64), (256, 512), (4,), (3, 4, 6)))
    for name in args.shapes:
        n, k = SHAPES[name]
        copies = 4 if name == "lm_head" else LAYERS
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        nbytes = n * k * 2
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            ref = (x.float() @ weights[0].float().T)
            rows = []

            def record(variant: str, seconds: float) -> None:
                us = seconds / copies * 1e6
                rows.append((variant, us, nbytes / (seconds / copies) / 1e12))
                results.append({"proj": name, "n": n, "k": k, "m": m, "variant": variant, "us": us,
                                "tb_s": nbytes / (seconds / copies) / 1e12})

            record("linear", time_graph([lambda w=w: F.linear(x, w) for w in weights]))
            torch.backends.cuda.preferred_blas_library("cublaslt")
            record("linear_lt", time_graph([lambda w=w: F.linear(x, w) for w in weights]))
            torch.backends.cuda.preferred_blas_library("cublas")
            record("mm_t", time_graph([lambda w=w: torch.mm(w, x.T) for w in weights]))
            err = ((skinny_linear(x, weights[0]).float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"skinny_linear: relative error {err:.2e}"
            record("ember", time_graph([lambda w=w: skinny_linear(x, w) for w in weights]))
            for bn, bk, warps, stages in configs:
                variant = f"triton {bn}x{bk} w{warps} s{stages}"
                try:
                    got = skinny(x, weights[0], outs[0], bn, bk, warps, stages).float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        print(f"  {variant}: relative error {err:.2e}, skipped")
                        continue
                    record(variant, time_graph([lambda w=w, o=o: skinny(x, w, o, bn, bk, warps, stages)
                                                for w, o in zip(weights, outs)]))
                except Exception as e:  # e.g. out of shared memory
                    print(f"  {variant}: {type(e).__name__} {str(e)[:60]}")
            rows.sort(key=lambda r: r[1])
            base = next(r for r in rows if r[0] == "linear")
            print(f"{name} N={n} K={k} M={m}: {nbytes / 1e6:.1f} MB per weight")
            for r in rows[:5] + ([base] if base not in rows[:5] else []) + \
                    [r for r in rows if r[0] in ("linear_lt", "mm_t", "ember") and r not in rows[:5]]:
                print(f"  {r[0]:<24} {r[1]:7.1f} us  {r[2]:5.2f} TB/s")
        del weights
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
