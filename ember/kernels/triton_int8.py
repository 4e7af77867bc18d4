"""INT8 W8A8 kernels: per-token int8 activation quantization, an int8 GEMM
with the dequantization scales in its epilogue, and the epilogue alone for the
int32 product of ``torch._int_mm``.

The scheme (SmoothQuant, Xiao et al., 2023, "W8A8" with per-token dynamic
activations): the weight is int8 ``w_q`` [N, K] with one float32 scale per
output channel ``w_s`` [N]; each row of the activations ``x`` [M, K] is
quantized on the fly with its own scale,

    x_s[m] = max_k |x[m, k]| / 127.5,   x_q[m, k] = round(clamp(x[m, k] / x_s[m], -128, 127))

(round half to even; the range and the 127.5 are compressed-tensors'
symmetric int8 ``calculate_qparams``: 0 is exact and ``-max`` maps to -128),
or with one static scale for every row (a calibrated checkpoint's
``input_scale``). Then

    y[m, n] = float(sum_k x_q[m, k] * w_q[n, k]) * x_s[m] * w_s[n] + bias[n]

with the sum in int32 (exact: ``K * 128 * 128`` stays below 2^31 for
K < 131072) and the epilogue in float32, rounded once to the output dtype.
Every path here computes exactly these float32 operations in this order
(the GEMM and epilogue kernels are compiled without FMA contraction, which
would round the bias add differently), so they agree bit for bit with each
other and with the plain-PyTorch path of
:mod:`ember.layers.quantization.w8a8_int8`.

- :func:`per_token_quant_int8`: one program per row (two passes over K).
- :func:`int8_gemm`: a tiled Triton GEMM (``tl.dot`` on int8, int32
  accumulators). At decode row counts (:data:`SKINNY_MAX_M`) it streams the
  int8 weight once, one program per ``BLOCK_N`` columns, like the skinny bf16
  GEMM of :mod:`ember.kernels.triton_gemm`, at half its weight bytes; given
  float activations (``quantize_x``) it quantizes them itself (each program
  computes the rows' scales in a first pass over K, which reads ``x`` from L2),
  so a decode linear layer is one kernel.
- :func:`int8_scaled_mm`: ``torch._int_mm`` (cuBLASLt's int8 GEMM) and
  :func:`scale_epilogue` for larger batches, where its constraints hold
  (:func:`int_mm_supported`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Rows up to which the GEMM runs with one 16-row tile (decode batch sizes).
SKINNY_MAX_M = 16
# Rows up to which int8_gemm quantizes float activations in the GEMM itself
# (each program re-reads the rows to find their scales). Off: on an H100 the
# fused form took 90 us at M = 1 on the 8B qkv projection against 4 us of
# quantization plus 15 us of GEMM (benchmarks/quant_int8.py).
FUSED_QUANT_MAX_M = 0
# Rows from which torch._int_mm (cuBLASLt) and the epilogue kernel replace the
# Triton GEMM where its constraints hold: the int32 product makes a round trip
# through memory, which the Triton GEMM's fused epilogue avoids, so the
# crossover is a measurement (benchmarks/quant_int8.py prints both at M = 256
# and 4096). On an H100 the Triton GEMM won at both (8B shapes, e.g. qkv at
# M = 4096: 184 us against 285 us), so _int_mm is not used.
INT_MM_MIN_M = 1 << 62
# Constants the kernels read (Triton globals must be constexpr).
INT8_QMIN, INT8_QMAX = tl.constexpr(-128.0), tl.constexpr(127.0)
# compressed-tensors' symmetric scale: max |x| / ((qmax - qmin) / 2).
INT8_SCALE_DIVISOR = tl.constexpr(127.5)
# 1.5 * 2^23: for |v| <= 2^22, (v + C) - C is v rounded to the nearest integer,
# ties to even (the float32 addition's rounding), as torch.round does.
_ROUND_MAGIC = tl.constexpr(12582912.0)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _quantize(x, scale):
    """float32 ``x`` / ``scale`` (IEEE division), clamped to [-128, 127] and
    rounded half to even -> int8."""
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), INT8_QMIN), INT8_QMAX)
    return ((v + _ROUND_MAGIC) - _ROUND_MAGIC).to(tl.int8)


@triton.jit
def _scale_of(amax):
    """The per-token scale of rows whose largest magnitude is ``amax`` (1 for an
    all-zero row, which quantizes to zeros with any scale)."""
    return tl.where(amax > 0, tl.math.div_rn(amax, INT8_SCALE_DIVISOR), 1.0)


@triton.jit
def _per_token_quant_kernel(X, XQ, XS, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr, STATIC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    if STATIC:
        scale = tl.load(XS)
    else:
        amax = tl.zeros([BLOCK_K], tl.float32)
        for k in range(0, K, BLOCK_K):
            offs = k + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = _scale_of(tl.max(amax, 0))
        tl.store(XS + row, scale)
    for k in range(0, K, BLOCK_K):
        offs = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(XQ + row * stride_qm + offs, _quantize(x, scale), mask=offs < K)


def per_token_quant_int8(x: torch.Tensor, static_scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` to int8 (see the module docstring).

    Args:
        x: [M, K] float16 / bfloat16 / float32, unit stride along K.
        static_scale: optional [1] float32: one scale for every row (a
            checkpoint's ``input_scale``) instead of each row's own.
    Returns:
        ``(x_q, x_s)``: x_q [M, K] int8; x_s [M] float32 (with
        ``static_scale``: that tensor itself).
    Raises:
        ValueError: ``x`` is not 2-D with unit stride along K.
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"per_token_quant_int8: x {tuple(x.shape)} must be 2-D with unit stride along K")
    m, k = x.shape
    x_q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    x_s = static_scale if static_scale is not None else torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block_k = min(triton.next_power_of_2(k), 2048)
        _per_token_quant_kernel[(m,)](x, x_q, x_s, k, x.stride(0), x_q.stride(0), BLOCK_K=block_k,
                                      STATIC=static_scale is not None, num_warps=4 if block_k >= 1024 else 1)
    return x_q, x_s


@triton.jit
def _epilogue(acc, a_scale, WS, B, Y, offs_m, offs_n, mask_m, mask_n, stride_ym, HAS_BIAS: tl.constexpr):
    """``float(acc) * a_scale[:, None] * w_s[None, :] (+ bias)`` in float32, stored in Y's dtype."""
    w_scale = tl.load(WS + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M"])
def _int8_gemm_kernel(A, W, AS, WS, B, Y, M, N, K, stride_am, stride_wn, stride_ym, stride_as,
                      HAS_BIAS: tl.constexpr, QUANT_A: tl.constexpr, STATIC_A: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # A: int8 [M, K] with scales AS (per row, stride_as; 0 for one static
    # scale), or with QUANT_A float [M, K] quantized here: per row from a
    # first pass over K (STATIC_A: with the one scale AS[0]).
    # Programs are ordered in groups of GROUP_M row tiles so that those sharing
    # weight columns run together (L2 reuse); with one row tile it is column order.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    a_rows = A + offs_m[:, None].to(tl.int64) * stride_am
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    if QUANT_A and not STATIC_A:
        amax = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for k in range(0, K, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            a = tl.load(a_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.abs(a.to(tl.float32)))
        a_scale = _scale_of(tl.max(amax, 1))
    else:
        a_scale = tl.load(AS + offs_m * stride_as, mask=mask_m, other=1.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(a_rows + offs_k[None, :], mask=mask_m[:, None], other=0)
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None], other=0)
        else:
            a = tl.load(a_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0)
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0)
        if QUANT_A:
            a = _quantize(a.to(tl.float32), a_scale[:, None])
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    _epilogue(acc, a_scale, WS, B, Y, offs_m, offs_n, mask_m, mask_n, stride_ym, HAS_BIAS)


def gemm_tiles(m: int, n: int) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)`` of :func:`int8_gemm`.

    Up to :data:`SKINNY_MAX_M` rows the kernel streams the weight like the
    bf16 skinny GEMM (:func:`ember.kernels.triton_gemm.skinny_tiles`): 32
    columns per program while they make at most one wave on 132 SMs, else 64;
    K tiles of 512 int8 values, so that the stages of a bf16 activation tile
    (fused quantization) and an int8 weight tile stay within Hopper's shared
    memory (4 x 32 KB, 3 x 48 KB). Larger row counts take square compute
    tiles. ``benchmarks/quant_int8.py`` sweeps the decode tiles.
    """
    if m <= SKINNY_MAX_M:
        return (16, 32, 512, 4, 4) if triton.cdiv(n, 32) <= 132 else (16, 64, 512, 3, 4)
    if m <= 64:
        return 64, 64, 256, 4, 4
    return 128, 128, 128, 3, 8


def int8_gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor | None, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
              quantize_x: bool = False, tiles: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """``y = a_q @ w.T`` dequantized (see the module docstring), in one Triton kernel.

    Args:
        a: [M, K] int8 (``a_scale`` [M] float32 per row, or [1] for every row),
            or with ``quantize_x`` the float activations (float16 / bfloat16 /
            float32), quantized in the kernel per row (``a_scale`` None) or
            with the static ``a_scale`` [1]. Unit stride along K.
        w: [N, K] int8, unit stride along K.
        w_scale: [N] float32.
        bias: optional [N] (any float dtype; added in float32).
        out_dtype: the result's dtype (default: ``a``'s with ``quantize_x``,
            else bfloat16).
        tiles: ``(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)``
            (default :func:`gemm_tiles`; the benchmark sweeps them).
    Returns:
        [M, N] in ``out_dtype``.
    Raises:
        ValueError: shapes, dtypes or strides other than these.
    """
    m, k = a.shape
    n = w.shape[0]
    if (w.dim() != 2 or w.shape[1] != k or w.dtype != torch.int8 or w.stride(1) != 1 or a.stride(1) != 1
            or (a.dtype == torch.int8) == quantize_x or w_scale.shape != (n,) or w_scale.dtype != torch.float32
            or (a_scale is None and not quantize_x)
            or (a_scale is not None and (a_scale.dtype != torch.float32 or a_scale.numel() not in (1, m)))):
        raise ValueError(f"int8_gemm: unsupported a {tuple(a.shape)} {a.dtype} (quantize_x={quantize_x}), "
                         f"w {tuple(w.shape)} {w.dtype}, w_scale {tuple(w_scale.shape)} {w_scale.dtype}, a_scale "
                         f"{None if a_scale is None else (tuple(a_scale.shape), a_scale.dtype)}")
    out = torch.empty(m, n, dtype=out_dtype or (a.dtype if quantize_x else torch.bfloat16), device=a.device)
    if m == 0:
        return out
    block_m, block_n, block_k, num_stages, num_warps = tiles or gemm_tiles(m, n)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _int8_gemm_kernel[grid](
        a, w, a_scale if a_scale is not None else w_scale, w_scale, bias if bias is not None else w_scale, out,
        m, n, k, a.stride(0), w.stride(0), out.stride(0), 1 if a_scale is None or a_scale.numel() == m else 0,
        HAS_BIAS=bias is not None, QUANT_A=quantize_x, STATIC_A=a_scale is not None, EVEN_K=k % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_stages=num_stages, num_warps=num_warps,
        enable_fp_fusion=False)
    return out


@triton.jit(do_not_specialize=["M"])
def _scale_epilogue_kernel(ACC, AS, WS, B, Y, M, N, stride_accm, stride_ym, stride_as, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.load(ACC + offs_m[:, None].to(tl.int64) * stride_accm + offs_n[None, :],
                  mask=mask_m[:, None] & mask_n[None, :], other=0)
    a_scale = tl.load(AS + offs_m * stride_as, mask=mask_m, other=1.0)
    _epilogue(acc, a_scale, WS, B, Y, offs_m, offs_n, mask_m, mask_n, stride_ym, HAS_BIAS)


def scale_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``float(acc) * a_scale[:, None] * w_scale[None, :] (+ bias)`` rounded to
    ``out_dtype``, in one pass.

    Args:
        acc: [M, N] int32 (unit stride along N).
        a_scale: [M] float32, or [1] for every row.
        w_scale: [N] float32.
        bias: optional [N].
    Returns:
        [M, N] in ``out_dtype``.
    """
    m, n = acc.shape
    out = torch.empty(m, n, dtype=out_dtype, device=acc.device)
    if m:
        block_m, block_n = 32, 128
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
        _scale_epilogue_kernel[grid](acc, a_scale, w_scale, bias if bias is not None else w_scale, out, m, n,
                                     acc.stride(0), out.stride(0), 1 if a_scale.numel() == m else 0,
                                     HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
                                     enable_fp_fusion=False)
    return out


def int_mm_supported(m: int, n: int, k: int) -> bool:
    """Whether ``torch._int_mm`` takes ``[m, k] @ [k, n]`` on CUDA: more than
    16 rows, K and N multiples of 8 (its checks in ATen's CUDA BLAS)."""
    return m > 16 and k % 8 == 0 and n % 8 == 0


def int8_scaled_mm(a_q: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``torch._int_mm(a_q, w.T)`` (int32, cuBLASLt) then :func:`scale_epilogue`.

    Args:
        a_q: [M, K] int8 with ``a_scale`` [M] (or [1]) float32;
        w: [N, K] int8 with ``w_scale`` [N] float32 (shapes meeting
            :func:`int_mm_supported` on CUDA).
    Returns:
        [M, N] in ``out_dtype``.
    """
    return scale_epilogue(torch._int_mm(a_q, w.t()), a_scale, w_scale, bias, out_dtype)


def w8a8_int8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, input_scale: torch.Tensor | None,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """A W8A8 INT8 linear layer on CUDA: ``x`` [M, K] (16/32-bit float) ->
    [M, N] in x's dtype, by row count: at most :data:`FUSED_QUANT_MAX_M` rows,
    one :func:`int8_gemm` that quantizes ``x`` itself; up to
    :data:`SKINNY_MAX_M`, :func:`per_token_quant_int8` then :func:`int8_gemm`;
    more, :func:`per_token_quant_int8` then ``torch._int_mm`` with
    :func:`scale_epilogue` where :func:`int_mm_supported` holds (from
    :data:`INT_MM_MIN_M` rows), else the Triton GEMM. ``input_scale`` [1] float32: a static activation scale;
    None: per token."""
    m, k = x.shape
    n = w.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if m <= FUSED_QUANT_MAX_M:
        return int8_gemm(x, w, input_scale, w_scale, bias, x.dtype, quantize_x=True)
    x_q, x_s = per_token_quant_int8(x, input_scale)
    if m >= INT_MM_MIN_M and int_mm_supported(m, n, k) and not INTERPRETED:
        return int8_scaled_mm(x_q, w, x_s, w_scale, bias, x.dtype)
    return int8_gemm(x_q, w, x_s, w_scale, bias, x.dtype)
