"""GGUF block formats decoded inside Triton kernels.

A GGUF weight ``[N, K]`` is N rows of ggml blocks (``[N, row_bytes]`` uint8;
layouts: ggml's ``ggml-common.h`` ``block_q*`` structs, the same ones
:func:`ember.layers.quantization.gguf.dequantize_gguf` decodes in PyTorch).
Two kernels share one tile decoder (:func:`_dequant_tile`, 256 input
features of ``BLOCK_N`` rows per step: eight 32-element blocks or one
256-element k-quant super-block):

- :func:`gguf_gemv`: ``y = x @ W.T (+ b)`` for a few rows of x (decode, at
  most 16): one program per ``BLOCK_N`` output features streams its rows'
  blocks once, decodes them in registers and multiplies them with the rows of
  x (padded to 16) on the tensor cores, accumulating in float32. The weight is
  read once, at its stored size.
- :func:`gguf_dequantize`: blocks -> a dense ``[rows, K]`` tensor (for many
  rows of x: dequantize, then one dense GEMM), optionally of the rows ``ids``
  only (the token embedding).

Both take any row stride for their output, so a merged layer whose
projections have different types writes each projection's slice of one
output. No host synchronization: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ember.layers.quantization.gguf_types import GGUF_BLOCK_SIZES, GT

# Row tile of x in the GEMV, and its output features per program: 16 up to
# 8192 features (so a 4096-feature layer still spreads over ~2 programs per SM
# of an H100, there being no split-K), else 32.
_GEMV_BLOCK_M = 16


def _gemv_block_n(n: int) -> int:
    return 16 if n <= 8192 else 32
_DEQUANT_BLOCK_N = 32
# Elements of K decoded per step: eight 32-element blocks or one super-block.
_TILE_K = 256

_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = int(GT.Q4_0), int(GT.Q4_1), int(GT.Q5_0), int(GT.Q5_1), int(GT.Q8_0)
_Q4_K, _Q5_K, _Q6_K = int(GT.Q4_K), int(GT.Q5_K), int(GT.Q6_K)


@triton.jit
def _f16_at(W, off, mask):
    """The float16 at byte offsets ``off`` (little-endian), as float32."""
    lo = tl.load(W + off, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(W + off + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _tile_q32(W, row_off, kb, nblocks, QTYPE: tl.constexpr, BS: tl.constexpr, QS: tl.constexpr,
              BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """32-element blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) ``kb .. kb + NB - 1``
    of the rows at byte offsets ``row_off`` [BLOCK_N] int64 -> [BLOCK_N, NB * 32]
    float32 (blocks past ``nblocks`` read as zeros). BS: bytes per block;
    QS: offset of the quants in a block."""
    blk = kb + tl.arange(0, NB)
    mask = (blk < nblocks)[None, :, None]
    base = row_off[:, None, None] + blk[None, :, None].to(tl.int64) * BS  # [BN, NB, 1]
    j = tl.arange(0, 32)[None, None, :]
    d = _f16_at(W, base, mask)
    if QTYPE == 8:  # Q8_0: d, qs[32] int8
        q8 = tl.load(W + base + QS + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        w = q8 * d
    else:
        byte = tl.load(W + base + QS + (j % 16), mask=mask, other=0)
        q = tl.where(j < 16, byte & 0x0F, byte >> 4).to(tl.int32)
        if QTYPE == 6 or QTYPE == 7:  # Q5: the fifth bit of element j is bit j of qh (the 4 bytes before qs)
            qh = tl.load(W + base + (QS - 4) + (j >> 3), mask=mask, other=0).to(tl.int32)
            q = q | (((qh >> (j & 7)) & 1) << 4)
        if QTYPE == 2:  # Q4_0
            w = d * (q - 8).to(tl.float32)
        elif QTYPE == 6:  # Q5_0
            w = d * (q - 16).to(tl.float32)
        else:  # Q4_1 / Q5_1: d * q + m
            w = d * q.to(tl.float32) + _f16_at(W, base + 2, mask)
    return tl.reshape(w, (BLOCK_N, NB * 32))


@triton.jit
def _tile_q45k(W, row_off, kb, QTYPE: tl.constexpr, BS: tl.constexpr, QS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Super-block ``kb`` of Q4_K / Q5_K rows (d, dmin, scales[12], (qh[32],)
    qs[128]) -> [BLOCK_N, 256] float32."""
    base = row_off[:, None, None] + kb * BS  # [BN, 1, 1]
    ok = base >= 0
    s = tl.arange(0, 8)[None, :, None]  # sub-block of 32 elements
    l = tl.arange(0, 32)[None, None, :]
    lo = tl.load(W + base + 4 + (s % 4)).to(tl.int32)  # scales[0..3]
    mid = tl.load(W + base + 8 + (s % 4)).to(tl.int32)  # scales[4..7]
    hi = tl.load(W + base + 12 + (s % 4)).to(tl.int32)  # scales[8..11]
    sc = tl.where(s < 4, lo & 63, (hi & 0x0F) | ((lo >> 6) << 4))
    mn = tl.where(s < 4, mid & 63, (hi >> 4) | ((mid >> 6) << 4))
    dsc = _f16_at(W, base, ok) * sc.to(tl.float32)
    dm = _f16_at(W, base + 2, ok) * mn.to(tl.float32)
    byte = tl.load(W + base + QS + 32 * (s // 2) + l)
    q = tl.where(s % 2 == 0, byte & 0x0F, byte >> 4).to(tl.int32)
    if QTYPE == 13:  # Q5_K: bit s of qh[l] is the fifth bit of sub-block s's element l
        qh = tl.load(W + base + 16 + l).to(tl.int32)
        q = q | (((qh >> s) & 1) << 4)
    w = dsc * q.to(tl.float32) - dm
    return tl.reshape(w, (BLOCK_N, 256))


@triton.jit
def _tile_q6k(W, row_off, kb, BLOCK_N: tl.constexpr):
    """Super-block ``kb`` of Q6_K rows (ql[128], qh[64], scales[16] int8, d)
    -> [BLOCK_N, 256] float32."""
    base = row_off[:, None, None] + kb * 210
    ok = base >= 0
    s = tl.arange(0, 16)[None, :, None]  # scale index = element // 16
    l = tl.arange(0, 16)[None, None, :]
    e = 16 * s + l  # element: half e // 128, quarter (e % 128) // 32, lane e % 32
    h = e // 128
    qq = (e % 128) // 32
    ll = e % 32
    byte = tl.load(W + base + 64 * h + ll + 32 * (qq % 2))
    q = tl.where(qq >= 2, byte >> 4, byte & 0x0F).to(tl.int32)
    qh = tl.load(W + base + 128 + 32 * h + ll).to(tl.int32)
    q = (q | (((qh >> (2 * qq)) & 3) << 4)) - 32
    sc = tl.load(W + base + 192 + s).to(tl.int8, bitcast=True).to(tl.float32)
    w = (_f16_at(W, base + 208, ok) * sc) * q.to(tl.float32)
    return tl.reshape(w, (BLOCK_N, 256))


@triton.jit
def _dequant_tile(W, row_off, kb, nblocks, QTYPE: tl.constexpr, BS: tl.constexpr, QS: tl.constexpr,
                  BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """Blocks ``kb .. kb + NB - 1`` (256 elements) of the rows at byte offsets
    ``row_off`` [BLOCK_N] int64 -> [BLOCK_N, 256] float32."""
    if QTYPE == 12 or QTYPE == 13:
        w = _tile_q45k(W, row_off, kb, QTYPE, BS, QS, BLOCK_N)
    elif QTYPE == 14:
        w = _tile_q6k(W, row_off, kb, BLOCK_N)
    else:
        w = _tile_q32(W, row_off, kb, nblocks, QTYPE, BS, QS, BLOCK_N, NB)
    return w


@triton.jit(do_not_specialize=["M"])
def _gguf_gemv_kernel(X, W, B, Y, M, N, K, nblocks, stride_xm, stride_wn, stride_ym,
                      QTYPE: tl.constexpr, BS: tl.constexpr, QS: tl.constexpr, QK: tl.constexpr, NB: tl.constexpr,
                      HAS_BIAS: tl.constexpr,
                      IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    # Rows past N read row N - 1 (in bounds); their columns are not stored.
    row_off = tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, nblocks, NB):
        w = _dequant_tile(W, row_off, kb, nblocks, QTYPE, BS, QS, BLOCK_N, NB)
        offs_k = kb * QK + tl.arange(0, NB * QK)
        x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gguf_dequant_kernel(W, IDS, Y, R, K, nblocks, stride_wn, stride_ym,
                         QTYPE: tl.constexpr, BS: tl.constexpr, QS: tl.constexpr, QK: tl.constexpr,
                         NB: tl.constexpr, HAS_IDS: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    pid_r = tl.program_id(0)
    kb = tl.program_id(1) * NB
    offs_r = pid_r * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < R
    if HAS_IDS:
        rows = tl.load(IDS + offs_r, mask=mask_r, other=0).to(tl.int64)
    else:
        rows = tl.minimum(offs_r, R - 1).to(tl.int64)
    w = _dequant_tile(W, rows * stride_wn, kb, nblocks, QTYPE, BS, QS, BLOCK_N, NB)
    offs_k = kb * QK + tl.arange(0, NB * QK)
    tl.store(Y + offs_r[:, None].to(tl.int64) * stride_ym + offs_k[None, :], w.to(Y.dtype.element_ty),
             mask=mask_r[:, None] & (offs_k < K)[None, :])


# Offset of the quants (qs) in a block of each type: after d (and m, and qh).
_QS_OFFSET = {_Q4_0: 2, _Q4_1: 4, _Q5_0: 6, _Q5_1: 8, _Q8_0: 2, _Q4_K: 16, _Q5_K: 48, _Q6_K: 0}


def _type_args(qtype: int) -> dict[str, int]:
    return {"QTYPE": int(qtype), "BS": GGUF_BLOCK_SIZES[qtype][1], "QS": _QS_OFFSET[qtype]}


def _geometry(w: torch.Tensor, qtype: int) -> tuple[int, int, int]:
    """``(K, nblocks per row, blocks per step)`` of blocks ``w`` [rows, row_bytes]."""
    if qtype not in GGUF_BLOCK_SIZES:
        raise ValueError(f"no GGUF kernel for ggml type {qtype}")
    elems, nbytes = GGUF_BLOCK_SIZES[qtype]
    if w.dtype != torch.uint8 or w.dim() != 2 or w.shape[1] % nbytes or w.stride(1) != 1:
        raise ValueError(f"GGUF blocks must be [rows, row_bytes] uint8 with unit column stride and whole "
                         f"{nbytes}-byte blocks, got {w.dtype} {tuple(w.shape)}")
    nblocks = w.shape[1] // nbytes
    return nblocks * elems, nblocks, _TILE_K // elems


def gguf_gemv(x: torch.Tensor, w: torch.Tensor, qtype: int, out: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, block_n: int | None = None) -> torch.Tensor:
    """``x @ dequant(w).T (+ bias)`` with the blocks decoded in registers.

    Args:
        x: [M, K] float16/bfloat16/float32, unit column stride (M: any, best
            at most 16; each 16 rows re-read the weight).
        w: [N, row_bytes] uint8 GGUF blocks of ``qtype`` (whole blocks per row).
        qtype: a ggml type of :data:`~ember.layers.quantization.gguf.GGUF_KERNEL_TYPES`.
        out: [M, N] to write (any row stride, unit column stride); default a
            new tensor of x's dtype.
        bias: [N] or None.
        block_n: output features per program (16, 32, 64; default by N).
    Returns:
        ``out``: [M, N], accumulated in float32 and rounded once.
    Raises:
        ValueError: a type without a kernel, or shapes that disagree.
    """
    K, nblocks, nb = _geometry(w, qtype)
    M, N = x.shape[0], w.shape[0]
    if x.dim() != 2 or x.shape[1] != K or x.stride(1) != 1:
        raise ValueError(f"x must be [M, {K}] with unit column stride, got {tuple(x.shape)}")
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (M, N) or out.stride(1) != 1:
        raise ValueError(f"out must be [{M}, {N}] with unit column stride, got {tuple(out.shape)}")
    block_n = block_n or _gemv_block_n(N)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, _GEMV_BLOCK_M))
    _gguf_gemv_kernel[grid](x, w, bias if bias is not None else x, out, M, N, K, nblocks, x.stride(0), w.stride(0),
                            out.stride(0), QK=GGUF_BLOCK_SIZES[qtype][0], NB=nb, **_type_args(qtype),
                            HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                            BLOCK_M=_GEMV_BLOCK_M, BLOCK_N=block_n, num_warps=4)
    return out


def gguf_dequantize(w: torch.Tensor, qtype: int, dtype: torch.dtype, rows: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense rows of GGUF blocks.

    Args:
        w: [N, row_bytes] uint8 GGUF blocks of ``qtype``.
        dtype: the output dtype (float16/bfloat16/float32).
        rows: [R] integer row ids (e.g. token ids) to gather, or None for all N rows.
        out: [R, K] (or [N, K]) of ``dtype`` to write, any row stride; default new.
    Returns:
        [R, K] (or [N, K]) ``dtype``: the float32 values of the blocks, rounded once.
    Raises:
        ValueError: a type without a kernel, or shapes that disagree.
    """
    K, nblocks, nb = _geometry(w, qtype)
    R = w.shape[0] if rows is None else rows.shape[0]
    if out is None:
        out = torch.empty(R, K, dtype=dtype, device=w.device)
    if tuple(out.shape) != (R, K) or out.stride(1) != 1:
        raise ValueError(f"out must be [{R}, {K}] with unit column stride, got {tuple(out.shape)}")
    if R == 0:
        return out
    grid = (triton.cdiv(R, _DEQUANT_BLOCK_N), triton.cdiv(nblocks, nb))
    _gguf_dequant_kernel[grid](w, rows if rows is not None else w, out, R, K, nblocks, w.stride(0), out.stride(0),
                               QK=GGUF_BLOCK_SIZES[qtype][0], NB=nb, **_type_args(qtype), HAS_IDS=rows is not None,
                               BLOCK_N=_DEQUANT_BLOCK_N, num_warps=4)
    return out
