"""Fused elementwise Triton kernels for the CUDA path: RMSNorm (with the
residual add), SiLU-and-mul, rotary embedding, and the row argmax of greedy
sampling. Each replaces several
PyTorch kernels (casts, reductions, multiplies) with one pass over the data;
in a decode step, where every tensor is tiny, launch count is what costs.

Each matches the rounding of the plain-PyTorch layer (``forward_native``) it
replaces: the residual sum and the normalized value are rounded to the
activation dtype where HF transformers rounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import pdl_release, use_pdl


@triton.jit
def _rms_norm_kernel(X, R, W, Out, ResOut, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_release(USE_PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(ResOut.dtype.element_ty)
        tl.store(ResOut + row * stride_ro + offs, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    y = (x * tl.rsqrt(var + eps)).to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (y * w).to(Out.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x``: [n, hidden]. Without ``residual``: ``norm(x) * weight``. With it:
    ``s = x + residual`` (rounded to x's dtype), returns ``(norm(s) * weight, s)``."""
    n, hidden = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(hidden)
    warps = min(16, max(1, block // 512))
    pdl = use_pdl(x.device)
    if residual is None:
        _rms_norm_kernel[(n,)](x, x, weight, out, out, x.stride(0), 0, out.stride(0), 0, hidden, eps,
                               HAS_RESIDUAL=False, BLOCK=block, USE_PDL=pdl, num_warps=warps)
        return out
    new_residual = torch.empty_like(x)
    _rms_norm_kernel[(n,)](x, residual, weight, out, new_residual, x.stride(0), residual.stride(0), out.stride(0),
                           new_residual.stride(0), hidden, eps, HAS_RESIDUAL=True, BLOCK=block, USE_PDL=pdl,
                           num_warps=warps)
    return out, new_residual


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, d, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_release(USE_PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + d + offs, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty)
    tl.store(Out + row * stride_o + offs, act * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x``: [n, 2d] -> ``silu(x[:, :d]) * x[:, d:]``, [n, d]."""
    n, two_d = x.shape
    d = two_d // 2
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)
    block = 1024
    pdl = use_pdl(x.device)
    _silu_and_mul_kernel[(n, triton.cdiv(d, block))](x, out, x.stride(0), out.stride(0), d, BLOCK=block,
                                                      USE_PDL=pdl, num_warps=4)
    return out


@triton.jit
def _argmax_chunk_kernel(X, ChunkMax, ChunkIdx, n_cols, stride_x, num_chunks, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(X + row * stride_x + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
    top = tl.max(x, 0)
    tl.store(ChunkMax + row * num_chunks + chunk, top)
    tl.store(ChunkIdx + row * num_chunks + chunk, tl.min(tl.where(x == top, offs, n_cols), 0))


@triton.jit
def _argmax_merge_kernel(ChunkMax, ChunkIdx, Out, n_cols, num_chunks, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < num_chunks
    top = tl.load(ChunkMax + row * num_chunks + offs, mask=mask, other=float("-inf"))
    idx = tl.load(ChunkIdx + row * num_chunks + offs, mask=mask, other=n_cols)
    best = tl.min(tl.where(top == tl.max(top, 0), idx, n_cols), 0)
    tl.store(Out + row, tl.minimum(best, n_cols - 1).to(tl.int64))


# Columns per program of the argmax's first pass.
_ARGMAX_CHUNK = 4096


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for a CUDA [rows, n] float tensor (unit stride
    along n), as int64 [rows]: the first index of the largest value, as torch.

    Two small kernels: one program per 4096-column chunk of each row, then one
    per row over the chunks' maxima: a single program per row (or torch's
    reduction) runs a 128,256-column row of batch-1 greedy decoding on one SM,
    latency-bound. NaN is not treated as the
    largest value (torch returns its index); rows of only -inf give 0, as torch.
    """
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0 or n == 0:
        return out
    chunks = triton.cdiv(n, _ARGMAX_CHUNK)
    chunk_max = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
    chunk_idx = torch.empty(rows, chunks, dtype=torch.int32, device=x.device)
    _argmax_chunk_kernel[(rows, chunks)](x, chunk_max, chunk_idx, n, x.stride(0), chunks, CHUNK=_ARGMAX_CHUNK,
                                         num_warps=4)
    _argmax_merge_kernel[(rows,)](chunk_max, chunk_idx, out, n, chunks,
                                  BLOCK_C=max(2, triton.next_power_of_2(chunks)), num_warps=1)
    return out


@triton.jit
def rope_cos_sin(CosSin, Pos, t, stride_cs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos and sin [BLOCK_HALF] float32 at token ``t``'s position (0 past ``HALF``)."""
    pos = tl.load(Pos + t)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(CosSin + pos * stride_cs + offs_d, mask=mask_d, other=0.0)
    sin = tl.load(CosSin + pos * stride_cs + HALF + offs_d, mask=mask_d, other=0.0)
    return cos, sin


@triton.jit
def rope_rotate_heads(base, num_heads, cos, sin, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """GPT-NeoX "rotate half" of the ``num_heads`` heads at ``base`` (one
    token's row): returns the offsets [BLOCK_H, BLOCK_HALF] of the first halves
    (the second halves are ``HALF`` further), their mask, and the rotated
    first and second halves in float32."""
    offs_d = tl.arange(0, BLOCK_HALF)
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < num_heads) & (offs_d < HALF)[None, :]
    offs = offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotary_kernel(Q, K, CosSin, Pos, stride_q, stride_k, stride_cs,
                   NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0)
    cos, sin = rope_cos_sin(CosSin, Pos, t, stride_cs, HALF, BLOCK_HALF)
    for which in tl.static_range(2):
        if which == 0:
            base = Q + t * stride_q
            num_heads = NUM_Q_HEADS
        else:
            base = K + t * stride_k
            num_heads = NUM_K_HEADS
        offs, mask, r1, r2 = rope_rotate_heads(base, num_heads, cos, sin, HEAD_DIM, HALF, BLOCK_H, BLOCK_HALF)
        tl.store(base + offs, r1.to(base.dtype.element_ty), mask=mask)
        tl.store(base + offs + HALF, r2.to(base.dtype.element_ty), mask=mask)


def rotary_embedding_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
                      head_dim: int, rotary_dim: int) -> None:
    """Rotate ``query`` [n, num_heads * head_dim] and ``key`` [n, num_kv_heads *
    head_dim] in place (rows may be strided views, heads contiguous), GPT-NeoX
    "rotate half" layout over the first ``rotary_dim`` dims of each head.
    ``cos_sin_cache``: [max_position, rotary_dim] float32 (cos halves | sin halves)."""
    n = positions.shape[0]
    if n == 0:
        return
    num_q, num_k = query.shape[1] // head_dim, key.shape[1] // head_dim
    half = rotary_dim // 2
    _rotary_kernel[(n,)](query, key, cos_sin_cache, positions, query.stride(0), key.stride(0), cos_sin_cache.stride(0),
                         NUM_Q_HEADS=num_q, NUM_K_HEADS=num_k, HEAD_DIM=head_dim, HALF=half,
                         BLOCK_H=triton.next_power_of_2(max(num_q, num_k)), BLOCK_HALF=triton.next_power_of_2(half),
                         num_warps=4)
