"""Decode-attention kernel: achieved bandwidth for tile/launch variants, and a
kernel-time profile of one eager batch-1 decode step of the 8B preset.

    python benchmarks/tune_decode_attention.py
"""

from __future__ import annotations

import itertools

import torch
import triton

from ember.kernels.triton_attention import decode_attention, num_decode_splits


def bench_decode(batch: int, ctx: int, num_kv_heads: int = 8, group: int = 4, head_dim: int = 128) -> None:
    block = 16
    blocks_per_seq = -(-ctx // block)
    num_blocks = batch * blocks_per_seq
    kv = torch.randn(2, num_blocks, block, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, num_kv_heads * group, head_dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    base_splits = num_decode_splits(batch, num_kv_heads, sms)
    rows = []
    for block_n, warps, stages, split_mult in itertools.product((32, 64, 128), (4, 8), (2, 3), (1, 2)):
        splits = min(64, base_splits * split_mult)
        fn = lambda: decode_attention(q, kv, out, table, seq_lens, 0.088, splits, block_n=block_n,
                                      num_warps=warps, num_stages=stages)
        try:
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # e.g. out of shared memory
            rows.append((block_n, warps, stages, splits, float("nan"), str(e)[:40]))
            continue
        rows.append((block_n, warps, stages, splits, kv_bytes / ms / 1e6, ""))
    rows.sort(key=lambda r: -(r[4] if r[4] == r[4] else 0))
    print(f"decode attention batch={batch} ctx={ctx}: KV {kv_bytes / 1e9:.2f} GB; default splits {base_splits}")
    for r in rows[:6] + [r for r in rows if r[:4] == (64, 4, 2, base_splits)]:
        print(f"  BLOCK_N={r[0]:<4} warps={r[1]} stages={r[2]} splits={r[3]:<3} {r[4]:8.0f} GB/s {r[5]}")


def profile_batch1_step() -> None:
    from ember import LLM, SamplingParams

    llm = LLM("Llama-3.1-8B", load_format="dummy", max_model_len=4096, enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm.generate([[1000] * 128], params, use_tqdm=False)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate([[1000] * 128], params, use_tqdm=False)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))


if __name__ == "__main__":
    for batch, ctx in ((256, 1536), (64, 4096), (1, 8192)):
        bench_decode(batch, ctx)
    profile_batch1_step()
