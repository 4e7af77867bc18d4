"""Probe: what bounds decode attention over an FP8 KV cache?

A stripped-down GQA decode kernel (no paging, no splits: each program reads one
request's whole context of one KV head) over four layouts, batch 256 x context
1536, 8 KV heads, 4 query heads per KV head, head_dim 128 (the 8B shape):

  bf16         K and V [B, ctx, H, D] in bf16 (the layout Ember's cache uses)
  fp8          the same layout in FP8 e4m3
  fp8_k_only   K in FP8, V in bf16: is the QK dot's K operand the problem?
  fp8_vt       K in FP8 as above, V in FP8 transposed, [B, H, D, ctx], so the
               PV dot's operand is contiguous along the context
  fp8_vt_p8    as fp8_vt, but the PV dot runs in FP8 (P rounded to e4m3, V
               not widened), as FlashAttention-3's FP8 path does
  fp8_fma      both products on CUDA cores (no tensor-core dot; 4 query heads
               exactly, 16-token tiles), K and V widened to float32

Prints achieved bandwidth (KV bytes / kernel time) per variant and the output's
relative error against a float32 PyTorch reference over the stored values.

    python benchmarks/fp8_v_layout_probe.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel(Q, K, V, Out, ctx, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_vd,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                  V_TRANSPOSED: tl.constexpr, MODE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_h = offs_h < GROUP
    heads = h * GROUP + offs_h
    q = tl.load(Q + (b * tl.num_programs(1) * GROUP + heads)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=mask_h[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for start in range(0, ctx, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_raw = tl.load(K + b * s_kb + offs_n[:, None] * s_kt + h * s_kh + offs_d[None, :])
        if MODE == 2:  # CUDA cores
            s = tl.sum(q.to(tl.float32)[:, None, :] * k_raw.to(tl.float32)[None, :, :], 2) * 0.1275
        else:
            s = tl.dot(q, tl.trans(k_raw.to(q.dtype))) * 0.1275
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_TRANSPOSED:  # [D, BLOCK_N] tile, contiguous along the context
            vt = tl.load(V + b * s_vb + h * s_vh + offs_d[:, None] * s_vd + offs_n[None, :] * s_vt)
            if MODE == 1:  # FP8 x FP8 tensor-core dot
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), tl.trans(vt))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), tl.trans(vt.to(q.dtype)))
        else:
            v = tl.load(V + b * s_vb + offs_n[:, None] * s_vt + h * s_vh + offs_d[None, :] * s_vd)
            if MODE == 2:
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + (b * tl.num_programs(1) * GROUP + heads)[:, None] * HEAD_DIM + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask_h[:, None])


def run(variant: str, batch: int = 256, ctx: int = 1536, kv_heads: int = 8, group: int = 4, d: int = 128,
        block_n: int = 64, stages: int = 3) -> tuple[float, float]:
    torch.manual_seed(0)
    fp8 = torch.float8_e4m3fn
    k32 = torch.randn(batch, ctx, kv_heads, d, device="cuda")
    v32 = torch.randn(batch, ctx, kv_heads, d, device="cuda")
    q = torch.randn(batch, kv_heads * group, d, device="cuda", dtype=torch.bfloat16)
    k = k32.to(torch.bfloat16 if variant == "bf16" else fp8)
    v = v32.to(torch.bfloat16 if variant in ("bf16", "fp8_k_only") else fp8)
    transposed = variant.startswith("fp8_vt")
    mode = {"fp8_vt_p8": 1, "fp8_fma": 2}.get(variant, 0)
    block_h = group if mode == 2 else 16
    if transposed:
        v = v.permute(0, 2, 3, 1).contiguous()  # [B, H, D, ctx]
        s_vb, s_vh, s_vd, s_vt = v.stride()
    else:
        s_vb, s_vt, s_vh, s_vd = v.stride()
    out = torch.empty_like(q)
    fn = lambda: _probe_kernel[(batch, kv_heads)](
        q, k, v, out, ctx, k.stride(0), k.stride(1), k.stride(2), s_vb, s_vt, s_vh, s_vd,
        GROUP=group, HEAD_DIM=d, BLOCK_H=block_h, BLOCK_N=block_n, V_TRANSPOSED=transposed, MODE=mode, num_warps=4,
        num_stages=stages)
    fn()
    # Reference on the values the kernel read (FP8-rounded where stored as FP8).
    kr = k.float()
    vr = (v.permute(0, 3, 1, 2) if transposed else v).float()
    kr, vr = kr.repeat_interleave(group, 2), vr.repeat_interleave(group, 2)
    att = torch.einsum("bhd,bthd->bht", q.float(), kr) * 0.1275 * 0.6931471805599453  # exp2 scale -> natural
    ref = torch.einsum("bht,bthd->bhd", att.softmax(-1), vr)
    rel = float((out.float() - ref).norm() / ref.norm())
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return (k.numel() * k.element_size() + v.numel() * v.element_size()) / ms / 1e6, rel


if __name__ == "__main__":
    for variant in ("bf16", "fp8", "fp8_k_only", "fp8_vt", "fp8_vt_p8", "fp8_fma"):
        tiles = ((16, 2), (16, 3), (32, 3)) if variant == "fp8_fma" else ((64, 3), (128, 3))
        for block_n, stages in tiles:
            try:
                gbs, rel = run(variant, block_n=block_n, stages=stages)
                print(f"{variant:<11} BLOCK_N={block_n:<4} stages={stages}: {gbs:6.0f} GB/s, relative error {rel:.1e}")
            except Exception as e:  # a variant Triton cannot compile
                print(f"{variant:<11} BLOCK_N={block_n:<4} stages={stages}: failed: {str(e).splitlines()[0][:120]}")
