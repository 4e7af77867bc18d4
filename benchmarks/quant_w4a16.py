"""W4A16 kernels at the Llama-3.1-8B linear shapes against bf16 ``torch.mm``
(GPU), with a correctness check at every shape.

For each projection (qkv, o_proj, gate_up, down; group size 128 with zero
points, as AWQ stores them) and each row count M, the W4A16 GEMM
(:func:`ember.kernels.triton_w4a16.w4a16_gemm`, the path the layer takes at
that M) and ``x @ W.T`` in bf16 are timed over 8 weight copies in turn (more
than the L2 holds) inside a CUDA graph, median of ``do_bench``. ``int4_gb_s``
is the packed weight, scale and zero bytes over the W4A16 time. The check
compares with float32 products of the dequantized weight. ``--sweep`` also
times the decode kernel's (BLOCK_N, split_k) choices at M = 1 (batch-1
decode) and prints the fastest next to the default.

    python benchmarks/quant_w4a16.py [--m 1 8 64 1024] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from graph_timing import graph_time_us
from ember.kernels.triton_w4a16 import W4A16Workspace, decode_config, w4a16_gemm
from ember.kernels.triton_gemm import _num_sms
from ember.layers.quantization.w4a16 import W4Weights, build_kernel_layout, dequantize_layout

# name -> (N, K) of y = x @ W^T for the Llama-3.1-8B shape
SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
COPIES = 8
GROUP = 128


def random_layout(n: int, k: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g, device="cuda", dtype=torch.uint8)
    z = torch.randint(0, 16, (k // GROUP, n), generator=g, device="cuda", dtype=torch.uint8)
    s = (torch.rand(k // GROUP, n, generator=g, device="cuda") * 0.004 + 0.001).half()
    return build_kernel_layout(W4Weights(q, z, s, None, GROUP))


def run(layout, x, ws, **kw):
    return w4a16_gemm(x, layout.qweight, layout.scales, layout.zeros, layout.perm, layout.group, layout.k, None, ws,
                      **kw)


def sweep(name: str, layouts, m: int, k: int, ws) -> None:
    n = layouts[0].qweight.shape[1]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    default = decode_config(m, n, k // 128, _num_sms(x.device))
    times = {}
    for bn in (32, 64, 128):
        for split in (1, 2, 4, 8, 16):
            if split > k // 128:
                continue
            try:
                times[(bn, split)] = graph_time_us(lambda i: run(layouts[i], x, ws, block_n=bn, split_k=split), COPIES)
            except triton.runtime.errors.OutOfResources:
                continue
    best = min(times, key=times.get)
    ours = graph_time_us(lambda i: run(layouts[i], x, ws), COPIES)
    print(f"  sweep {name:<8} M={m:<3} default (BLOCK_N, split) {default[:2]} {ours:7.1f} us; best {best} "
          f"{times[best]:7.1f} us; " + " ".join(f"{c[0]}/{c[1]}:{t:.0f}" for c, t in sorted(times.items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 64, 1024])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}: W4A16 (group {GROUP}, zero points) vs bf16 torch.mm")
    ws = W4A16Workspace()
    ws.reserve(max(n for n, _ in SHAPES.values()), "cuda")
    rows, failures = [], []
    for name, (n, k) in SHAPES.items():
        layouts = [random_layout(n, k, seed) for seed in range(COPIES)]
        dense = [dequantize_layout(lay).to(torch.bfloat16) for lay in layouts]
        int4_bytes = sum(t.numel() * t.element_size() for t in (layouts[0].qweight, layouts[0].scales,
                                                                 layouts[0].zeros))
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = run(layouts[0], x, ws)
            w_ref = dequantize_layout(layouts[0])
            if m >= 512:  # dequantize-then-mm rounds the weight to bf16
                w_ref = w_ref.to(torch.bfloat16).float()
            ref = x.float() @ w_ref.t()
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            ok = err < 1e-2
            if not ok:
                failures.append(f"{name} M={m}: max error {err:.2e} of the largest output")
            w4_us = graph_time_us(lambda i: run(layouts[i], x, ws), COPIES)
            bf16_us = graph_time_us(lambda i: torch.mm(x, dense[i].t()), COPIES)
            row = {"shape": name, "m": m, "n": n, "k": k, "w4a16_us": w4_us, "bf16_us": bf16_us,
                   "speedup": bf16_us / w4_us, "int4_gb_s": int4_bytes / w4_us / 1e3, "max_rel_err": err}
            rows.append(row)
            print(f"{name:<8} M={m:<5} W4A16 {w4_us:8.1f} us  bf16 {bf16_us:8.1f} us  x{bf16_us / w4_us:5.2f}  "
                  f"int4 {row['int4_gb_s']:6.0f} GB/s  err {err:.1e} {'ok' if ok else 'FAIL'}")
        if args.sweep:
            sweep(name, layouts, 1, k, ws)
        layouts = dense = None  # free before the next shape
        torch.cuda.empty_cache()
    print("\nper decode step (32 layers, LM head excluded), ms:")
    for m in args.m:
        sel = [r for r in rows if r["m"] == m]
        w4, bf = sum(r["w4a16_us"] for r in sel) * 32 / 1e3, sum(r["bf16_us"] for r in sel) * 32 / 1e3
        print(f"  M={m:<5} W4A16 {w4:7.2f}  bf16 {bf:7.2f}  x{bf / w4:5.2f}")
    print("correctness: " + ("all shapes ok" if not failures else "; ".join(failures)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "failures": failures}, f, indent=1)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
