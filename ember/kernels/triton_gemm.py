"""Skinny GEMM for decode: ``y = x @ W.T (+ b)`` with few rows in ``x``.

At decode batch sizes a linear layer is a stream over its weight: the work is
``M x N x K`` multiply-adds with M of 1-16, so the time is the weight's bytes
over the memory bandwidth. This kernel streams the weight once: one program per
``BLOCK_N`` output columns loops over K in ``BLOCK_K`` tiles (software-pipelined
loads), multiplies them on the tensor cores with the rows of ``x`` padded to 16,
and accumulates in float32. No split-K, so no partial sums to reduce in a
second kernel.

Measured against cuBLAS with ``benchmarks/skinny_gemm_probe.py`` (32 distinct
weights per projection, so that none is still in the L2 cache when it is read
again, as in a real decode step; figures in BENCHMARKS.md): on the H100 it is
3-12% faster on every Llama-3.1-8B projection and the LM head, and a whole
batch-4 decode step took 6.24 instead of 6.56 ms; on the H200, where cuBLAS is
closer to the copy bandwidth, a batch-1 step took 4.48 instead of 4.72 ms.
Launched with PDL on Hopper (:mod:`ember.kernels.pdl`).

:func:`skinny_silu_and_mul_linear` is the same kernel for a merged gate_up
projection with SwiGLU's ``silu(gate) * up`` in its epilogue (each program streams
the gate and the up rows of its columns), so the intermediate is never written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import gdc_wait, launch_options, pdl_release, use_pdl

# Rows of x up to which :func:`skinny_linear` applies (one 16-row MMA tile).
SKINNY_MAX_M = 16
# ``EMBER_SKINNY_GEMM=0`` sends every linear layer to cuBLAS (for A/B timing).
ENABLED = os.environ.get("EMBER_SKINNY_GEMM", "1") != "0"


@triton.jit
def _weight_tile(W, offs_n, offs_k, mask_n, K, stride_wn, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None], other=0.0)
    return tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :],
                   other=0.0)


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(X, W, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        USE_PDL: tl.constexpr):
    # GATED: W is [2N, K] (gate rows, then up rows); the program also streams the
    # up rows of its columns and writes silu(gate) * up, rounded as the unfused
    # GEMM + silu_and_mul would round them.
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if USE_PDL:
        gdc_wait()  # launched early (ember.kernels.pdl): the previous kernel wrote x
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        else:
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _weight_tile(W, offs_n, offs_k, mask_n, K, stride_wn, EVEN_K)
        acc = tl.dot(x, tl.trans(w), acc)
        if GATED:
            w_up = _weight_tile(W, N + offs_n, offs_k, mask_n, K, stride_wn, EVEN_K)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up)
    # The weight is read: a dependent GEMM (down after the fused gate) may now
    # launch and stage while this program finishes its epilogue.
    pdl_release(USE_PDL)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(B + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # Results are rounded to x's dtype (then widened if Y is float32, as
    # F.linear(...).float() would give them).
    if GATED:
        gate = acc.to(X.dtype.element_ty).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty) * acc_up.to(X.dtype.element_ty)
    else:
        y = acc.to(X.dtype.element_ty)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def skinny_tiles(n: int, num_sms: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_stages)`` for an output of ``n`` columns, from
    the H100 and H200 sweeps of ``benchmarks/skinny_gemm_probe.py``, by how many
    waves of 32-column programs ``n`` makes:

    - at most one wave (o_proj, down of the 8B shape): 32 x 512 tiles, 4 stages;
    - between one and two (qkv: 192 programs on 132 SMs): 64 x 256 tiles, 4
      stages, i.e. one full wave (7% faster on the H100);
    - more (gate_up, LM head): 64 x 256 tiles, 3 stages. 32 x 512 tiles with 4
      stages (192 KB of shared memory, one program per SM) were 1% faster on
      the H100 but 8% slower than cuBLAS on gate_up on the H200.
    """
    programs = triton.cdiv(n, 32)
    if programs <= num_sms:
        return 32, 512, 4
    return (64, 256, 4) if programs < 2 * num_sms else (64, 256, 3)


def use_skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`skinny_linear` applies (and is not turned off by
    ``EMBER_SKINNY_GEMM=0``): a CUDA 16-bit ``x`` of at most
    :data:`SKINNY_MAX_M` rows with unit stride along K, and a weight of the same
    dtype with unit stride along K."""
    return (ENABLED and x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_M and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and x.stride(1) == 1 and weight.stride(1) == 1)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for few rows, as ``F.linear`` (``.to(out_dtype)``).

    Args:
        x: [M, K], M <= :data:`SKINNY_MAX_M`, bfloat16 or float16, unit stride along K.
        weight: [N, K], same dtype, unit stride along K.
        bias: optional [N].
        out_dtype: None (x's dtype) or torch.float32: the results, rounded to
            x's dtype, written widened (the LM head's float32 logits without a
            separate cast kernel).
    Returns:
        [M, N] in ``out_dtype`` (float32 accumulation).
    Raises:
        ValueError: the inputs do not meet :func:`use_skinny_linear`.
    """
    _check(x, weight)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    launch_skinny_gemm(x, weight, bias, out, *skinny_tiles(weight.shape[0], _num_sms(x.device)))
    return out


def skinny_silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU's first half in one kernel: ``silu(g) * u`` where ``[g | u] = x @
    weight.T + bias`` (a merged gate_up projection), without writing ``[g | u]``.

    Each program streams the gate and the up rows of its output columns; the
    products are rounded to x's dtype before the activation, so the result is
    bit-identical to :func:`skinny_linear` followed by
    :func:`ember.kernels.triton_ops.silu_and_mul`.

    Args:
        x: [M, K], as in :func:`skinny_linear`.
        weight: [2D, K]: the D gate rows, then the D up rows.
        bias: optional [2D].
    Returns:
        [M, D] in x's dtype.
    Raises:
        ValueError: the inputs do not meet :func:`use_skinny_linear`, or the
            weight has an odd number of rows.
    """
    _check(x, weight)
    if weight.shape[0] % 2:
        raise ValueError(f"skinny_silu_and_mul_linear: weight {tuple(weight.shape)} has an odd number of rows")
    out = torch.empty(x.shape[0], weight.shape[0] // 2, dtype=x.dtype, device=x.device)
    # Same weight bytes per program as the ungated tiles of the whole [2D, K] weight.
    block_n, block_k, num_stages = skinny_tiles(weight.shape[0], _num_sms(x.device))
    launch_skinny_gemm(x, weight, bias, out, block_n // 2, block_k, num_stages, gated=True)
    return out


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not use_skinny_linear(x, weight) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"skinny GEMM: unsupported x {tuple(x.shape)} {x.dtype} / weight "
                         f"{tuple(weight.shape)} {weight.dtype}")


def launch_skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                       block_n: int, block_k: int, num_stages: int, num_warps: int = 4, gated: bool = False) -> None:
    """Launch the kernel of :func:`skinny_linear` (``gated``: of
    :func:`skinny_silu_and_mul_linear`) into ``out`` [M, N] with the given
    tiles (``benchmarks/skinny_gemm_probe.py`` sweeps them); no checks."""
    m, k = x.shape
    n = out.shape[1]
    pdl = use_pdl(x.device)
    _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, GATED=gated, BLOCK_M=16, BLOCK_N=block_n,
        BLOCK_K=block_k, USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages, **launch_options(pdl))
