"""Skinny GEMM for decode: ``y = x @ W.T (+ b)`` with few rows in ``x``.

At decode batch sizes a linear layer is a stream over its weight: the work is
``M x N x K`` multiply-adds with M of 1-16, so the time is the weight's bytes
over the memory bandwidth. This kernel streams the weight once: one program per
``BLOCK_N`` output columns loops over K in ``BLOCK_K`` tiles (software-pipelined
loads), multiplies them on the tensor cores with the rows of ``x`` padded to 16,
and accumulates in float32. No split-K, so no partial sums to reduce in a
second kernel.

It is faster than cuBLAS at these row counts on every Llama-3.1-8B
projection and the LM head (compare with ``--no-skinny-gemm``; BENCHMARKS.md).
Launched with PDL on Hopper when the caller asks (``use_pdl``, see
:mod:`ember.kernels.pdl`).

:func:`skinny_silu_and_mul_linear` is the same kernel for a merged gate_up
projection with SwiGLU's ``silu(gate) * up`` in its epilogue (each program streams
the gate and the up rows of its columns), so the intermediate is never written.
:func:`skinny_rms_norm_linear` folds a pre-norm block's RMSNorm into the GEMM
that consumes it, and ``skinny_linear(..., residual=)`` adds the block's
residual in the epilogue of the GEMM that ends it, so a Llama decode step has no
norm kernel of its own (the wiring is :mod:`ember.layers.fusion`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import gdc_wait, launch_options, pdl_release, pdl_supported

# Rows of x up to which :func:`skinny_linear` applies (one 16-row MMA tile).
SKINNY_MAX_M = 16
# Triton's interpreter (``TRITON_INTERPRET=1``, read by Triton when a kernel is
# defined) runs the kernel on CPU tensors; the tests use it without CUDA.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# SMs assumed for the tile choice of CPU tensors in the interpreter (an H100's).
_INTERPRETER_SMS = 132


@triton.jit
def _weight_tile(W, offs_n, offs_k, mask_n, K, stride_wn, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None], other=0.0)
    return tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :],
                   other=0.0)


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(X, W, B, Y, G, R, SS, M, N, K, stride_xm, stride_wn, stride_ym, stride_rm, num_ss, eps,
                        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr,
                        NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr, NORM_SUMSQ: tl.constexpr,
                        ADD_RESIDUAL: tl.constexpr, SUMSQ_OUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        USE_PDL: tl.constexpr):
    # GATED: W is [2N, K] (gate rows, then up rows); the program also streams the
    # up rows of its columns and writes silu(gate) * up, rounded as the unfused
    # GEMM + silu_and_mul would round them.
    # NORM: the rows of x are RMS-normalized first (weight G, eps), factored:
    # the K loop accumulates sum_k (x[k] * G[k]) * W[n, k] and, as the diagonal
    # of x @ x.T on the tensor cores, the rows' sums of squares; the epilogue
    # multiplies by rsqrt(mean(x^2) + eps). The weight streams at once, and no
    # float32 copy of the x tile is kept (it made the compiler spill registers).
    # Without NORM_WEIGHT, G is already multiplied into W's columns (at load
    # time), and the x tile goes to the tensor cores as loaded. NORM_SUMSQ: the
    # sums of squares come as num_ss partial sums per row (SS [num_ss, BLOCK_M]
    # float32, written by the GEMM that produced x, see SUMSQ_OUT) instead of the
    # Gram diagonal; with neither, the K loop is the plain GEMM's.
    # ADD_RESIDUAL: the result, rounded to x's dtype, plus R (a pre-norm block's
    # residual add), rounded again. SUMSQ_OUT: each program also writes the sum
    # of squares of its columns of each result row (as rounded) to SS[pid, :],
    # for a consumer with NORM_SUMSQ.
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if USE_PDL:
        gdc_wait()  # launched early (ember.kernels.pdl): the previous kernel wrote x
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    gram = tl.zeros([BLOCK_M, BLOCK_M], tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        else:
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        if NORM and not NORM_SUMSQ:
            gram = tl.dot(x, tl.trans(x), gram)
        if NORM and NORM_WEIGHT:
            x = x * tl.load(G + offs_k, mask=offs_k < K, other=0.0)[None, :]
        w = _weight_tile(W, offs_n, offs_k, mask_n, K, stride_wn, EVEN_K)
        acc = tl.dot(x, tl.trans(w), acc)
        if GATED:
            w_up = _weight_tile(W, N + offs_n, offs_k, mask_n, K, stride_wn, EVEN_K)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up)
    # The weight is read: a dependent GEMM (down after the fused gate) may now
    # launch and stage while this program finishes its epilogue.
    pdl_release(USE_PDL)
    if NORM:
        if NORM_SUMSQ:
            sum_sq = tl.zeros([BLOCK_M], tl.float32)
            for p in range(0, num_ss, 64):
                offs_p = p + tl.arange(0, 64)
                part = tl.load(SS + offs_p[:, None] * BLOCK_M + offs_m[None, :], mask=(offs_p < num_ss)[:, None],
                               other=0.0)
                sum_sq += tl.sum(part, 0)
        else:
            sum_sq = tl.sum(tl.where(offs_m[:, None] == offs_m[None, :], gram, 0.0), 1)
        rstd = tl.rsqrt(sum_sq / K + eps)
        acc *= rstd[:, None]
        if GATED:
            acc_up *= rstd[:, None]
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(B + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # Results are rounded to x's dtype (then widened if Y is float32, as
    # F.linear(...).float() would give them).
    mask_y = mask_m[:, None] & mask_n[None, :]
    if GATED:
        gate = acc.to(X.dtype.element_ty).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty) * acc_up.to(X.dtype.element_ty)
    else:
        y = acc.to(X.dtype.element_ty)
    if ADD_RESIDUAL:
        r = tl.load(R + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask_y, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
    if SUMSQ_OUT:
        y32 = tl.where(mask_y, y.to(tl.float32), 0.0)
        tl.store(SS + pid * BLOCK_M + offs_m, tl.sum(y32 * y32, 1))
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask_y)


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def skinny_tiles(n: int, num_sms: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_stages)`` for an output of ``n`` columns, from
    tile sweeps on Hopper GPUs, by how many waves of 32-column programs ``n``
    makes:

    - at most one wave (o_proj, down of the 8B shape): 32 x 512 tiles, 4 stages;
    - between one and two (qkv: 192 programs on 132 SMs): 64 x 256 tiles, 4
      stages, i.e. one full wave;
    - more (gate_up, LM head): 64 x 256 tiles, 3 stages (32 x 512 tiles with 4
      stages, 192 KB of shared memory and one program per SM, lost to cuBLAS on
      gate_up on the H200).
    """
    programs = triton.cdiv(n, 32)
    if programs <= num_sms:
        return 32, 512, 4
    return (64, 256, 4) if programs < 2 * num_sms else (64, 256, 3)


def use_skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`skinny_linear` applies: a CUDA 16-bit ``x`` (or a CPU
    one in Triton's interpreter) of at most :data:`SKINNY_MAX_M` rows with unit
    stride along K, and a weight of the same dtype with unit stride along K."""
    return ((x.is_cuda or (INTERPRETED and x.device.type == "cpu")) and x.dim() == 2
            and 0 < x.shape[0] <= SKINNY_MAX_M and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and x.stride(1) == 1 and weight.stride(1) == 1)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, residual: torch.Tensor | None = None,
                  with_sumsq: bool = False, use_pdl: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x @ weight.T + bias``, as ``F.linear`` (``.to(out_dtype)``), for few rows;
    with ``residual``, that result rounded to x's dtype plus ``residual`` (a
    pre-norm block's residual add in the epilogue, rounded as the separate add).
    With ``with_sumsq``, also the result rows' sums of squares as partial sums
    (one per program), from which the next block's projection folds its RMSNorm
    (:func:`skinny_rms_norm_linear` ``sumsq``) without computing them.

    Args:
        x: [M, K], M <= :data:`SKINNY_MAX_M`, bfloat16 or float16, unit stride along K.
        weight: [N, K], same dtype, unit stride along K.
        bias: optional [N].
        out_dtype: None (x's dtype) or torch.float32: the results, rounded to
            x's dtype, written widened (the LM head's float32 logits without a
            separate cast kernel).
        residual: optional [M, N] in x's dtype, unit stride along N.
        with_sumsq: also return the partial sums of squares.
        use_pdl: launch with PDL where the device supports it (:mod:`ember.kernels.pdl`).
    Returns:
        [M, N] in ``out_dtype`` (float32 accumulation); with ``with_sumsq``
        also [P, SKINNY_MAX_M] float32 whose column m sums to the sum of the
        squares of row m of the result as written (rows >= M: zeros).
    Raises:
        ValueError: the inputs do not meet :func:`use_skinny_linear`, or a
            residual of another shape, dtype or layout.
    """
    _check(x, weight)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    if residual is not None and (residual.shape != out.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"skinny GEMM: residual {tuple(residual.shape)} {residual.dtype} does not match the "
                         f"output {tuple(out.shape)} {x.dtype}")
    block_n, block_k, num_stages = skinny_tiles(weight.shape[0], _num_sms(x.device))
    sumsq = (torch.empty(triton.cdiv(weight.shape[0], block_n), SKINNY_MAX_M, dtype=torch.float32, device=x.device)
             if with_sumsq else None)
    launch_skinny_gemm(x, weight, bias, out, block_n, block_k, num_stages, residual=residual, sumsq_out=sumsq,
                       use_pdl=use_pdl)
    return (out, sumsq) if with_sumsq else out


def skinny_silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                               use_pdl: bool = False) -> torch.Tensor:
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
        use_pdl: as in :func:`skinny_linear`.
    Returns:
        [M, D] in x's dtype.
    Raises:
        ValueError: the inputs do not meet :func:`use_skinny_linear`, or the
            weight has an odd number of rows.
    """
    return _launch_gated(x, weight, bias, use_pdl=use_pdl)


def skinny_rms_norm_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                           bias: torch.Tensor | None = None, gated: bool = False,
                           sumsq: torch.Tensor | None = None, use_pdl: bool = False) -> torch.Tensor:
    """A pre-norm block's RMSNorm (Zhang & Sennrich, 2019) folded into the
    projection that consumes it: ``rms_norm(x) * norm_weight @ weight.T + bias``,
    and with ``gated`` SwiGLU's ``silu(gate) * up`` as in
    :func:`skinny_silu_and_mul_linear`. One kernel instead of the norm kernel
    and the GEMM.

    Each program accumulates ``sum_k (x[k] * norm_weight[k]) * weight[n, k]`` and
    the rows' sums of squares in the same K loop, and scales by
    ``rsqrt(mean(x^2) + eps)`` in its epilogue, so its weight stream starts at
    once. That rounds differently from the unfused pair, which rounds the
    normalized row to x's dtype before the product: the results agree to the
    dtype's precision, not bit for bit. Given ``sumsq`` (the partial sums that
    the GEMM which wrote x returned, :func:`skinny_linear` ``with_sumsq``), the
    K loop skips the sums of squares; with the norm weight also in ``weight``
    (``norm_weight`` None) it is the plain GEMM's loop.

    Args:
        x: [M, K], as in :func:`skinny_linear` (the residual stream, its add done).
        weight: [N, K] ([2D, K] with ``gated``), same dtype.
        norm_weight: [K] in x's dtype, the RMSNorm's weight; None when it is
            already multiplied into ``weight``'s columns
            (at load, by :func:`ember.layers.fusion.apply_decode_fusions`): then the x tiles
            go to the tensor cores unscaled.
        eps: added to the mean square.
        bias: optional [N].
        sumsq: optional [P, SKINNY_MAX_M] float32, x's rows' partial sums of squares.
        use_pdl: as in :func:`skinny_linear`.
    Returns:
        [M, N] ([M, D] with ``gated``) in x's dtype.
    Raises:
        ValueError: the inputs do not meet :func:`use_skinny_linear`, a norm
            weight of another shape or dtype, ``sumsq`` of another shape or
            dtype, or (``gated``) a weight with an odd number of rows.
    """
    if sumsq is not None and (sumsq.dim() != 2 or sumsq.shape[1] != SKINNY_MAX_M or sumsq.dtype != torch.float32
                              or not sumsq.is_contiguous()):
        raise ValueError(f"skinny_rms_norm_linear: sumsq {tuple(sumsq.shape)} {sumsq.dtype} is not a contiguous "
                         f"[P, {SKINNY_MAX_M}] float32 tensor")
    if norm_weight is not None and (norm_weight.shape != (x.shape[1],) or norm_weight.dtype != x.dtype):
        raise ValueError(f"skinny_rms_norm_linear: norm weight {tuple(norm_weight.shape)} {norm_weight.dtype} "
                         f"does not match x {tuple(x.shape)} {x.dtype}")
    if gated:
        return _launch_gated(x, weight, bias, norm=(norm_weight, eps), sumsq=sumsq, use_pdl=use_pdl)
    _check(x, weight)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    # A plain K loop takes the plain GEMM's tiles.
    tiles = skinny_tiles(weight.shape[0], _num_sms(x.device)) if norm_weight is None and sumsq is not None \
        else (32, 256, 4)
    launch_skinny_gemm(x, weight, bias, out, *tiles, norm=(norm_weight, eps), sumsq=sumsq, use_pdl=use_pdl)
    return out


# K tile of the gated kernel with the norm folded in (32 columns per half): with
# 256-wide tiles the compiler spilled registers (ptxas -v, sm_90a). The ungated
# one takes 32 x 256 tiles. Both were the fastest of nine tilings swept on Hopper.
NORM_BLOCK_K = 128


def use_skinny_rms_norm_linear(x: torch.Tensor, weight: torch.Tensor, plain_loop: bool = False) -> bool:
    """Whether folding a norm into this projection pays: the skinny GEMM applies
    (:func:`use_skinny_linear`), and either
    the fold leaves the K loop plain (``plain_loop``: the sums of squares given
    and the norm weight in ``weight``, so only the epilogue differs) or the
    output makes at least two waves of 32-column programs: with fewer programs
    than two per SM (e.g. Llama-3.1-8B's qkv, 1.5 waves) the per-tile norm work
    is not hidden behind the other program's loads, and the norm kernel plus
    the plain GEMM is faster."""
    return (use_skinny_linear(x, weight)
            and (plain_loop or triton.cdiv(weight.shape[0], 32) >= 2 * _num_sms(x.device)))


def _launch_gated(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  norm: tuple[torch.Tensor | None, float] | None = None,
                  sumsq: torch.Tensor | None = None, use_pdl: bool = False) -> torch.Tensor:
    _check(x, weight)
    if weight.shape[0] % 2:
        raise ValueError(f"skinny gated GEMM: weight {tuple(weight.shape)} has an odd number of rows")
    out = torch.empty(x.shape[0], weight.shape[0] // 2, dtype=x.dtype, device=x.device)
    # Same weight bytes per program as the ungated tiles of the whole [2D, K] weight.
    block_n, block_k, num_stages = skinny_tiles(weight.shape[0], _num_sms(x.device))
    launch_skinny_gemm(x, weight, bias, out, block_n // 2, NORM_BLOCK_K if norm else block_k, num_stages,
                       gated=True, norm=norm, sumsq=sumsq, use_pdl=use_pdl)
    return out


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not use_skinny_linear(x, weight) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"skinny GEMM: unsupported x {tuple(x.shape)} {x.dtype} / weight "
                         f"{tuple(weight.shape)} {weight.dtype}")


def launch_skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                       block_n: int, block_k: int, num_stages: int, num_warps: int = 4, gated: bool = False,
                       norm: tuple[torch.Tensor | None, float] | None = None, residual: torch.Tensor | None = None,
                       sumsq: torch.Tensor | None = None, sumsq_out: torch.Tensor | None = None,
                       use_pdl: bool = False) -> None:
    """Launch the kernel of :func:`skinny_linear` into ``out`` [M, N] with the
    given tiles (``benchmarks/skinny_gemm_probe.py`` sweeps them); ``gated``:
    as :func:`skinny_silu_and_mul_linear`; ``norm`` = ``(norm_weight or None, eps)``
    and ``sumsq``: as :func:`skinny_rms_norm_linear`; ``residual``: added in
    the epilogue; ``sumsq_out`` [cdiv(N, block_n), 16] float32: the result rows'
    partial sums of squares (as :func:`skinny_linear` ``with_sumsq``); ``use_pdl``:
    launch with PDL where the device supports it. No checks."""
    m, k = x.shape
    n = out.shape[1]
    pdl = use_pdl and pdl_supported(x.device)
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    ss = sumsq if sumsq is not None else sumsq_out
    _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, norm_weight if norm_weight is not None else weight,
        residual if residual is not None else out, ss if ss is not None else out,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0,
        sumsq.shape[0] if sumsq is not None else 0, eps,
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, GATED=gated, NORM=norm is not None,
        NORM_WEIGHT=norm_weight is not None, NORM_SUMSQ=sumsq is not None,
        ADD_RESIDUAL=residual is not None, SUMSQ_OUT=sumsq_out is not None,
        BLOCK_M=SKINNY_MAX_M, BLOCK_N=block_n, BLOCK_K=block_k, USE_PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, **launch_options(pdl))
