"""Launch settings of the small per-layer kernels of a decode step, timed the
way a step meets them: each variant is 64 launches captured in one CUDA graph
(on distinct buffers) and replayed; microseconds per launch.

- RMSNorm with the residual add (hidden 4096, M rows), ``num_warps`` 1..16;
- the split-KV merge (32 heads x 32 splits x 128), ``num_warps`` 1..8;
- RoPE + KV write (Llama-3.1-8B heads), ``num_warps`` 1..8.

Usage (GPU): python benchmarks/small_kernel_probe.py [--m 1 4]
"""

from __future__ import annotations

import argparse

import torch
import triton

from ember.kernels import triton_attention as ta
from ember.kernels import triton_ops as ops
from skinny_gemm_probe import time_graph

CALLS = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    dev, bf = "cuda", torch.bfloat16
    hidden = 4096
    for m in args.m:
        xs = [torch.randn(m, hidden, device=dev, dtype=bf) for _ in range(CALLS)]
        rs = [torch.randn(m, hidden, device=dev, dtype=bf) for _ in range(CALLS)]
        outs = [torch.empty_like(x) for x in xs]
        res_outs = [torch.empty_like(x) for x in xs]
        w = torch.rand(hidden, device=dev, dtype=bf)
        row = []
        for warps in (1, 2, 4, 8, 16):
            def norm(i, warps=warps):
                ops._rms_norm_kernel[(m,)](xs[i], rs[i], w, outs[i], res_outs[i], hidden, hidden, hidden, hidden,
                                           hidden, 1e-5, HAS_RESIDUAL=True, BLOCK=hidden, USE_PDL=False,
                                           num_warps=warps)
            row.append(f"w{warps} {time_graph([lambda i=i: norm(i) for i in range(CALLS)]) / CALLS * 1e6:.2f}")
        print(f"rms_norm+residual M={m}: " + ", ".join(row) + " us (current: w8)")
    heads, splits, dim = 32, 32, 128
    for m in args.m:
        mids = [torch.randn(m * heads * splits * dim, device=dev) for _ in range(CALLS)]
        lses = [torch.randn(m * heads * splits, device=dev) for _ in range(CALLS)]
        outs = [torch.empty(m, heads, dim, device=dev, dtype=bf) for _ in range(CALLS)]
        row = []
        for warps in (1, 2, 4, 8):
            def merge(i, warps=warps):
                ta._decode_merge_kernel[(m, heads)](mids[i], lses[i], outs[i], outs[i].stride(0), outs[i].stride(1),
                                                    heads, HEAD_DIM=dim, BLOCK_D=dim, NUM_SPLITS=splits,
                                                    BLOCK_S=splits, USE_PDL=False, num_warps=warps)
            row.append(f"w{warps} {time_graph([lambda i=i: merge(i) for i in range(CALLS)]) / CALLS * 1e6:.2f}")
        print(f"decode merge M={m}: " + ", ".join(row) + " us (current: w4)")
    nq, nkv, hd, blocks = 32, 8, 128, 64
    kv = torch.zeros(2, blocks, 16, nkv, hd, device=dev, dtype=bf)
    cos_sin = torch.randn(4096, hd, device=dev)
    for m in args.m:
        qkvs = [torch.randn(m, (nq + 2 * nkv) * hd, device=dev, dtype=bf) for _ in range(CALLS)]
        pos = torch.arange(m, device=dev) + 100
        slots = torch.arange(m, device=dev) + 7
        row = []
        for warps in (1, 2, 4, 8):
            def rope(i, warps=warps):
                q, k, v = qkvs[i].split([nq * hd, nkv * hd, nkv * hd], dim=-1)
                ta._rope_store_kv_kernel[(m,)](
                    q, k, v, kv, slots, pos, cos_sin, blocks * 16, q.stride(0), k.stride(0), v.stride(0),
                    cos_sin.stride(0), NUM_Q_HEADS=nq, NUM_KV_HEADS=nkv, HEAD_DIM=hd, HALF=hd // 2,
                    BLOCK_H=nq, BLOCK_HALF=hd // 2, BLOCK_ROW=triton.next_power_of_2(nkv * hd), FP8_MAX=0.0,
                    num_warps=warps)
            row.append(f"w{warps} {time_graph([lambda i=i: rope(i) for i in range(CALLS)]) / CALLS * 1e6:.2f}")
        print(f"rope + KV write M={m}: " + ", ".join(row) + " us (current: w4)")


if __name__ == "__main__":
    main()
