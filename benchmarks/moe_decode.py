"""Fused MoE at decode sizes on the GPU: the per-pair GEMV form against the
grouped GEMM over pairs sorted by expert (bf16), and for 128 x 128 block-FP8
experts a row block per pair against the sort, at the DeepSeek-V3 and
Qwen3-30B-A3B expert shapes, 1-8 tokens. Each call is timed as a CUDA-graph
replay (median); bf16 outputs are checked against the float32 experts loop,
FP8 forms against each other.

    python benchmarks/moe_decode.py
"""

from __future__ import annotations

import torch
from graph_timing import graph_time_us

from ember.kernels import triton_moe as tm
from ember.layers.moe.torch_moe import fused_experts_torch


def routing(m: int, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(num_experts, device="cuda")[:top_k] for _ in range(m)]).to(torch.int32)
    return torch.rand(m, top_k, device="cuda"), ids


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    for num_experts, hidden, inter, top_k in [(256, 7168, 2048, 8), (128, 2048, 768, 8)]:
        w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(num_experts, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in (1, 2, 4, 8):
            x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
            weights, ids = routing(m, num_experts, top_k)
            ref = fused_experts_torch(x.float(), w13.float(), w2.float(), weights, ids.long())
            cols = []
            for name, fn in [("grouped", tm.fused_experts_grouped), ("gemv", tm.fused_experts_gemv)]:
                rel = ((fn(x, w13, w2, weights, ids).float() - ref).norm() / ref.norm()).item()
                cols.append(f"{name} {graph_time_us(lambda _: fn(x, w13, w2, weights, ids), 1):.0f} us (rel {rel:.1e})")
            print(f"bf16 E={num_experts} H={hidden} I={inter} M={m} experts {len(torch.unique(ids))}: "
                  + ", ".join(cols), flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    num_experts, hidden, inter, top_k = 256, 7168, 2048, 8
    fp8 = torch.float8_e4m3fn
    w13 = torch.empty(num_experts, 2 * inter, hidden, device="cuda", dtype=fp8)
    w2 = torch.empty(num_experts, hidden, inter, device="cuda", dtype=fp8)
    for e in range(0, num_experts, 16):  # random FP8 values, a few experts at a time
        w13[e:e + 16] = (torch.randn(16, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.5).to(fp8)
        w2[e:e + 16] = (torch.randn(16, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.5).to(fp8)
    s13 = torch.rand(num_experts, 2 * inter // 128, hidden // 128, device="cuda") * 0.01
    s2 = torch.rand(num_experts, hidden // 128, inter // 128, device="cuda") * 0.01
    limit = tm.GEMV_MAX_PAIRS
    for m in (1, 2, 4, 8):
        x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
        weights, ids = routing(m, num_experts, top_k)
        res = {}
        for name, pairs in [("sorted", 0), ("pair", limit)]:
            tm.GEMV_MAX_PAIRS = pairs
            out = tm.fused_experts_fp8_triton(x, w13, w2, s13, s2, weights, ids, (128, 128))
            us = graph_time_us(lambda _: tm.fused_experts_fp8_triton(x, w13, w2, s13, s2, weights, ids, (128, 128)), 1)
            res[name] = (us, out.float())
        tm.GEMV_MAX_PAIRS = limit
        diff = ((res["pair"][1] - res["sorted"][1]).norm() / res["sorted"][1].norm()).item()
        print(f"FP8 block E={num_experts} M={m} experts {len(torch.unique(ids))}: sorted {res['sorted'][0]:.0f} us, "
              f"pair {res['pair'][0]:.0f} us (rel diff {diff:.1e})", flush=True)


if __name__ == "__main__":
    main()
