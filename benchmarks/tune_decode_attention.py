"""Decode-attention kernel: achieved bandwidth for tile/launch variants, and a
kernel-time profile of eager decode steps of the 8B preset.

    python benchmarks/tune_decode_attention.py                  # bf16 cache; batch-1 profile
    python benchmarks/tune_decode_attention.py --kv-cache-dtype fp8 --profile-batch 256 --profile-ctx 1024
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from ember.kernels.triton_attention import decode_attention, num_decode_splits


CACHE_DTYPES = {"auto": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def bench_decode(batch: int, ctx: int, num_kv_heads: int = 8, group: int = 4, head_dim: int = 128,
                 cache_dtype: torch.dtype = torch.bfloat16, split_counts: tuple[int, ...] = ()) -> None:
    """Sweep tile/launch settings at the default split count, then (``split_counts``)
    the split count at the default tiles; prints achieved KV bandwidth."""
    block = 16
    blocks_per_seq = -(-ctx // block)
    num_blocks = batch * blocks_per_seq
    kv = torch.randn(2, num_blocks, block, num_kv_heads, head_dim, device="cuda").to(cache_dtype)
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, num_kv_heads * group, head_dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * kv.element_size()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    base_splits = num_decode_splits(batch, num_kv_heads, sms)
    computes = (torch.bfloat16, torch.float16) if kv.element_size() == 1 else (torch.bfloat16,)
    rows = []
    for block_n, warps, stages, compute in itertools.product((32, 64, 128, 256), (4, 8), (2, 3, 4), computes):
        fn = lambda: decode_attention(q, kv, out, table, seq_lens, 0.088, base_splits, block_n=block_n,
                                      num_warps=warps, num_stages=stages, fp8_compute=compute)
        try:
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # e.g. out of shared memory
            rows.append((block_n, warps, stages, compute, float("nan"), str(e)[:40]))
            continue
        rows.append((block_n, warps, stages, compute, kv_bytes / ms / 1e6, ""))
    rows.sort(key=lambda r: -(r[4] if r[4] == r[4] else 0))
    print(f"decode attention batch={batch} ctx={ctx} cache {cache_dtype}: KV {kv_bytes / 1e9:.2f} GB; "
          f"splits {base_splits}")
    default = (128, 4, 3, torch.float16) if kv.element_size() == 1 else (64, 4, 3, torch.bfloat16)
    for r in rows[:6] + [r for r in rows if r[:4] == default]:
        print(f"  BLOCK_N={r[0]:<4} warps={r[1]} stages={r[2]} dots in {str(r[3])[6:]:<9} {r[4]:8.0f} GB/s {r[5]}")
    for splits in split_counts:
        us = 1e3 * triton.testing.do_bench(
            lambda: decode_attention(q, kv, out, table, seq_lens, 0.088, splits), warmup=25, rep=100,
            return_mode="median")
        print(f"  default tiles, {splits:>2} splits: {us:6.1f} us, {kv_bytes / us / 1e3:6.0f} GB/s")


def bench_extend(new: int, ctx: int, num_reqs: int = 2, num_kv_heads: int = 8, group: int = 4, head_dim: int = 128,
                 cache_dtype: torch.dtype = torch.bfloat16) -> None:
    """Prefill/extend attention: ``num_reqs`` requests of ``new`` tokens over ``ctx`` cached ones."""
    from ember.kernels.triton_attention import extend_attention

    block = 16
    per_seq = -(-(ctx + new) // block)
    kv = torch.randn(2, num_reqs * per_seq, block, num_kv_heads, head_dim, device="cuda").to(cache_dtype)
    table = torch.randperm(num_reqs * per_seq, device="cuda", dtype=torch.int32).view(num_reqs, per_seq)
    q = torch.randn(num_reqs * new, num_kv_heads * group, head_dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    starts = torch.arange(0, num_reqs * new + 1, new, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((num_reqs,), ctx + new, dtype=torch.int32, device="cuda")
    flops = 4 * num_reqs * new * (ctx + new / 2) * num_kv_heads * group * head_dim
    for compute in (torch.bfloat16, torch.float16) if kv.element_size() == 1 else (torch.bfloat16,):
        ms = triton.testing.do_bench(
            lambda: extend_attention(q, kv, out, table, starts, seq_lens, new, 0.088, fp8_compute=compute),
            warmup=25, rep=100, return_mode="median")
        print(f"extend attention {num_reqs} x {new} new over {ctx} cached, cache {cache_dtype}, dots in "
              f"{str(compute)[6:]}: {ms * 1e3:.0f} us, {flops / ms / 1e9:.0f} TFLOP/s")


def profile_decode_steps(batch: int, ctx: int, kv_cache_dtype: str, new_tokens: int = 40) -> None:
    """CUDA kernel times of eager steps: ``batch`` random prompts of ``ctx``
    tokens, then ``new_tokens`` decode steps (prefill included in the table)."""
    from ember import LLM, SamplingParams

    llm = LLM("Llama-3.1-8B", load_format="dummy", max_model_len=4096, enforce_eager=True,
              kv_cache_dtype=kv_cache_dtype, max_num_seqs=max(batch, 1))
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    prompts = lambda: [torch.randint(1000, 100000, (ctx,), generator=gen).tolist() for _ in range(batch)]
    llm.generate(prompts(), params, use_tqdm=False)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts(), params, use_tqdm=False)
    print(f"== eager profile: batch {batch}, prompt {ctx}, {new_tokens} new tokens, kv cache {kv_cache_dtype}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-cache-dtype", default="auto", choices=list(CACHE_DTYPES))
    ap.add_argument("--shapes", default="256x1536,64x4096,1x8192", help="batch x context of the kernel sweeps")
    ap.add_argument("--splits", default="", help="comma-separated split counts to time at the default tiles")
    ap.add_argument("--profile-batch", type=int, default=1)
    ap.add_argument("--profile-ctx", type=int, default=128)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    for shape in filter(None, args.shapes.split(",")):
        batch, ctx = map(int, shape.split("x"))
        bench_decode(batch, ctx, cache_dtype=CACHE_DTYPES[args.kv_cache_dtype],
                     split_counts=tuple(int(s) for s in args.splits.split(",") if s))
    for new, ctx in ((1024, 0), (1024, 1024)):
        bench_extend(new, ctx, cache_dtype=CACHE_DTYPES[args.kv_cache_dtype])
    if not args.no_profile:
        profile_decode_steps(args.profile_batch, args.profile_ctx, args.kv_cache_dtype)
