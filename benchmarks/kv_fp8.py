"""Decode attention over a bf16 vs an FP8 KV cache: achieved bandwidth of the
cache bytes read (the Triton split-KV decode kernel, Llama-3.1-8B's head
layout: 8 KV heads of 128, 32 query heads), at batch x context points.

For each point it times ``decode_attention`` (the engine's default tiles and
split count) over a bf16 cache, an FP8 (e4m3) cache without scales, and one
with per-layer ``k_scale``/``v_scale`` (what ``--kv-cache-dtype fp8`` runs),
and prints microseconds per call and GB/s of cache bytes read (2 x batch x
context x KV heads x head_dim x element size). First it checks the scaled FP8
kernel against attention over the dequantized cache in float32 (one small
case; prints the relative error).

    python benchmarks/kv_fp8.py                            # 1/64/256 x 1k/4k/16k
    python benchmarks/kv_fp8.py --batch 1 64 --ctx 4096 --json results/kv_fp8.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from ember.kernels.triton_attention import decode_attention, num_decode_splits
from ember.layers.attention.backend import standard_layout

BLOCK = 16
FP8 = torch.float8_e4m3fn


def _cache(batch: int, ctx: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """A random cache of ``batch`` sequences of ``ctx`` tokens in shuffled
    blocks (filled in bf16 chunk by chunk: a float32 temporary of a 16k x
    256 cache would not fit), its block table and sequence lengths."""
    per_seq = -(-ctx // BLOCK)
    num_blocks = batch * per_seq
    kv = torch.empty(2, num_blocks, BLOCK, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    chunk = max(1, (256 << 20) // (BLOCK * num_kv_heads * head_dim))
    for i in range(0, num_blocks, chunk):
        part = torch.empty_like(kv[:, i:i + chunk], dtype=torch.bfloat16).normal_(generator=gen)
        kv[:, i:i + chunk] = part.to(dtype)
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32, generator=gen).view(batch, per_seq)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return kv, table, seq_lens


def check_scaled(num_kv_heads: int = 8, group: int = 4, head_dim: int = 128) -> float:
    """Relative error of scaled FP8 decode against float32 attention over the
    dequantized cache (batch 4 x 1000 tokens)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv, table, seq_lens = _cache(4, 1000, num_kv_heads, head_dim, FP8, gen)
    scales = (torch.tensor(0.37, device="cuda"), torch.tensor(2.5, device="cuda"))
    q = torch.randn(4, num_kv_heads * group, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    out = torch.empty_like(q)
    sm = head_dim ** -0.5
    decode_attention(q, kv, out, table, seq_lens, sm, 8, kv_scales=scales)
    errs = []
    std = standard_layout(kv)  # V token-major (an FP8 cache stores it transposed)
    for b in range(4):
        k, v = (std[i][table[b].long()].reshape(-1, num_kv_heads, head_dim)[:1000].float() * scales[i]
                for i in (0, 1))
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        p = (torch.einsum("hd,khd->hk", q[b].float(), k) * sm).softmax(-1)
        ref = torch.einsum("hk,khd->hd", p, v)
        errs.append(((out[b].float() - ref).norm() / ref.norm()).item())
    return max(errs)


def bench_point(batch: int, ctx: int, num_kv_heads: int, group: int, head_dim: int) -> dict:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = num_decode_splits(batch, num_kv_heads, sms)
    gen = torch.Generator(device="cuda").manual_seed(batch * 100003 + ctx)
    q = torch.randn(batch, num_kv_heads * group, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    out = torch.empty_like(q)
    scales = (torch.tensor(0.5, device="cuda"), torch.tensor(0.25, device="cuda"))
    row = {"batch": batch, "ctx": ctx, "splits": splits}
    for name, dtype, kv_scales in (("bf16", torch.bfloat16, None), ("fp8", FP8, None), ("fp8_scaled", FP8, scales)):
        kv, table, seq_lens = _cache(batch, ctx, num_kv_heads, head_dim, dtype, gen)
        nbytes = 2 * batch * ctx * num_kv_heads * head_dim * kv.element_size()
        fn = lambda: decode_attention(q, kv, out, table, seq_lens, head_dim ** -0.5, splits,  # noqa: E731
                                      kv_scales=kv_scales)
        us = 1e3 * triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
        row[f"{name}_us"], row[f"{name}_gb_s"] = us, nbytes / us / 1e3
        del kv, table, seq_lens
        torch.cuda.empty_cache()
    row["fp8_speedup"] = row["bf16_us"] / row["fp8_scaled_us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}: decode attention, {args.num_kv_heads} KV heads x {args.head_dim}, "
          f"group {args.group}")
    print(f"scaled FP8 decode vs float32 over the dequantized cache: relative error {check_scaled():.2e}")
    print(f"{'batch':>5} {'ctx':>6} {'splits':>6} | {'bf16 us':>9} {'GB/s':>6} | {'fp8 us':>9} {'GB/s':>6} | "
          f"{'fp8+scale us':>12} {'GB/s':>6} | fp8 speed-up")
    rows = []
    for batch in args.batch:
        for ctx in args.ctx:
            r = bench_point(batch, ctx, args.num_kv_heads, args.group, args.head_dim)
            rows.append(r)
            print(f"{batch:>5} {ctx:>6} {r['splits']:>6} | {r['bf16_us']:>9.1f} {r['bf16_gb_s']:>6.0f} | "
                  f"{r['fp8_us']:>9.1f} {r['fp8_gb_s']:>6.0f} | {r['fp8_scaled_us']:>12.1f} "
                  f"{r['fp8_scaled_gb_s']:>6.0f} | {r['fp8_speedup']:.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
