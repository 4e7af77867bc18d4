"""FP8 (``float8_e4m3fn``) linear-layer kernels: activation quantization, a
scaled W8A8 GEMM, and a weight-streaming W8A16 GEMV for decode.

- :func:`quant_fp8_per_token` / :func:`quant_fp8_per_token_group`: dynamic
  activation scales, ``scale = max(amax, MIN_AMAX) / 448`` per row (or per
  row and group of ``group`` columns), ``q = clamp(x / scale, -448, 448)``
  rounded to nearest even; with a static scale (a checkpoint's
  ``input_scale``) only the division and the clamp. 448 is e4m3's largest
  finite value (OCP 8-bit floating point specification, 2023).
- :func:`w8a8_scaled_mm`: ``y = (qa * sa) @ (qw * sw).T`` with ``sa`` per
  token or per 1 x ``group_k`` activation group and ``sw`` per output channel or
  per ``group_n`` x ``group_k`` weight block (DeepSeek-V3's 128 x 128), FP8
  tensor-core products accumulated in float32; per-K-step scaling when the
  scales vary along K (as DeepSeek-V3's ``inference/kernel.py`` ``fp8_gemm``
  does), else once in the epilogue.
- :func:`fp8_skinny_linear`: for decode row counts (M <= 16) the weight is
  the traffic, so the activations stay in 16-bit and each FP8 weight tile is
  widened to the activation dtype in registers and fed to the tensor cores
  (W8A16 math); the scales are applied per K step (block scales) or in the
  epilogue (per-channel). One pass over the weight, the structure of
  :mod:`ember.kernels.triton_gemm`'s skinny GEMM.

All of them run without a host synchronization (CUDA-graph capturable), and
on CPU tensors in Triton's interpreter for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import gdc_wait, launch_options, pdl_release, pdl_supported
from ember.kernels.triton_fp8_gemv import block_scaled_config, fp8_gemv, lookup_config
from ember.kernels.triton_gemm import INTERPRETED, SKINNY_MAX_M, _num_sms

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Rows (groups) whose absolute maximum is below this get the scale of this
# amax, so that an all-zero row quantizes to zeros instead of 0/0.
MIN_AMAX = 1e-10


@triton.jit
def _quant_fp8_kernel(X, Q, S, SIN, K, GROUP, stride_xm, stride_qm, stride_sm, fp8_max, min_amax,
                      STATIC: tl.constexpr, BLOCK: tl.constexpr):
    # One program per (row, group of GROUP columns); the group is read in
    # BLOCK-wide chunks, twice (absmax, then quantize) unless it fits one chunk.
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    start = g * GROUP
    end = tl.minimum(start + GROUP, K)
    if STATIC:
        scale = tl.load(SIN).to(tl.float32)
        tl.store(S + row * stride_sm + g, scale)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for k in range(start, end, BLOCK):
            offs = k + tl.arange(0, BLOCK)
            x = tl.load(X + row * stride_xm + offs, mask=offs < end, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, 0), min_amax) / fp8_max
        tl.store(S + row * stride_sm + g, scale)
    for k in range(start, end, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_xm + offs, mask=offs < end, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -fp8_max, fp8_max)
        tl.store(Q + row * stride_qm + offs, q.to(Q.dtype.element_ty), mask=offs < end)


def _launch_quant(x: torch.Tensor, group: int, static_scale: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"FP8 activation quantization needs a 2-D x with unit stride along K, got "
                         f"{tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    groups = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(group), 2048)
        _quant_fp8_kernel[(m, groups)](x, q, s, static_scale if static_scale is not None else s, k, group,
                                       x.stride(0), q.stride(0), s.stride(0), FP8_MAX, MIN_AMAX,
                                       STATIC=static_scale is not None, BLOCK=block,
                                       num_warps=4 if block <= 1024 else 8)
    return q, s


def quant_fp8_per_token(x: torch.Tensor, static_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 per-token quantization.

    Args:
        x: [M, K] float (16- or 32-bit), unit stride along K.
        static_scale: optional float32 scalar ([] or [1]) used for every row
            instead of the rows' dynamic scales.
    Returns:
        ``(q, scale)``: q [M, K] ``float8_e4m3fn`` and scale [M, 1] float32
        with ``x ~= q * scale`` (a static scale is written to every row).
    Raises:
        ValueError: x is not 2-D with unit stride along K.
    """
    return _launch_quant(x, max(x.shape[-1], 1), static_scale)


def quant_fp8_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization per token and group of ``group`` consecutive columns
    (DeepSeek-V3's 1 x 128 activation tiles); a last partial group has a
    scale of its own.

    Args:
        x: [M, K] float, unit stride along K.
        group: columns per group.
    Returns:
        ``(q, scale)``: q [M, K] ``float8_e4m3fn``, scale [M, ceil(K / group)]
        float32.
    Raises:
        ValueError: x is not 2-D with unit stride along K.
    """
    return _launch_quant(x, group, None)


@triton.jit
def _w8a8_mm_kernel(A, AS, B, BS, C, BIAS, M, N, K,
                    stride_am, stride_bn, stride_cm, stride_asm, stride_ask, stride_bsn, stride_bsk,
                    group_n, group_k,
                    HAS_BIAS: tl.constexpr, SCALE_PER_K: tl.constexpr, GROUP_M: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grouped program order (GROUP_M row tiles share their B tiles in L2).
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    offs_m64, offs_n64 = offs_m.to(tl.int64), offs_n.to(tl.int64)
    a_ptrs = A + offs_m64[:, None] * stride_am
    b_ptrs = B + offs_n64[:, None] * stride_bn
    as_ptrs = AS + offs_m64 * stride_asm
    bs_ptrs = BS + (offs_n // group_n).to(tl.int64) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptrs + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if SCALE_PER_K:
            # BLOCK_K divides group_k: one scale per row (column) in this step.
            kg = k // group_k
            sa = tl.load(as_ptrs + kg * stride_ask, mask=mask_m, other=0.0)
            sb = tl.load(bs_ptrs + kg * stride_bsk, mask=mask_n, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if not SCALE_PER_K:
        sa = tl.load(as_ptrs, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptrs, mask=mask_n, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(C + offs_m64[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _scale_strides(scale: torch.Tensor, rows: int) -> tuple[int, int]:
    """(stride along rows, stride along K groups) of a [rows] / [rows, 1] /
    [rows, G] scale; 0 along K for per-row scales."""
    if scale.dim() == 1:
        return scale.stride(0), 0
    return scale.stride(0), scale.stride(1) if scale.shape[1] > 1 else 0


def w8a8_scaled_mm(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                   group_n: int = 1, group_k: int | None = None, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.bfloat16, block_m: int | None = None,
                   block_n: int = 128, block_k: int = 128) -> torch.Tensor:
    """``(qa * sa) @ (qw * sw).T + bias`` with FP8 operands.

    Args:
        qa: [M, K] ``float8_e4m3fn``, unit stride along K.
        sa: float32 activation scales: [M, 1] (per token) or
            [M, ceil(K / group_k)] (per 1 x ``group_k`` group).
        qw: [N, K] ``float8_e4m3fn``, unit stride along K.
        sw: float32 weight scales: [N] / [N, 1] (per channel, ``group_n`` 1)
            or [ceil(N / group_n), ceil(K / group_k)] (per block).
        group_n, group_k: the scales' block sizes (``group_k`` None: the
            scales do not vary along K).
        bias: optional [N].
        out_dtype: result dtype.
        block_m, block_n, block_k: tiles (``block_m`` None: 64 for M <= 64, else 128).
    Returns:
        [M, N] ``out_dtype`` (float32 accumulation).
    Raises:
        ValueError: shapes that disagree, or ``block_k`` not dividing
            ``group_k`` when the scales vary along K.
    """
    m, k = qa.shape
    n = qw.shape[0]
    if qw.shape[1] != k or qa.stride(1) != 1 or qw.stride(1) != 1:
        raise ValueError(f"FP8 GEMM: x {tuple(qa.shape)} and weight {tuple(qw.shape)} do not match "
                         f"(or are not unit stride along K)")
    sam, sak = _scale_strides(sa, m)
    sbn, sbk = _scale_strides(sw, n)
    per_k = bool(sak or sbk)
    if per_k:
        block_k = min(block_k, group_k or block_k)
        if group_k is None or group_k % block_k:
            raise ValueError(f"FP8 GEMM: K tile {block_k} does not divide the scale group {group_k}")
    out = torch.empty(m, n, dtype=out_dtype, device=qa.device)
    if m == 0:
        return out
    block_m = block_m or (64 if m <= 64 else 128)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _w8a8_mm_kernel[grid](qa, sa, qw, sw, out, bias if bias is not None else out, m, n, k,
                          qa.stride(0), qw.stride(0), out.stride(0), sam, sak, sbn, sbk,
                          group_n, group_k or k, HAS_BIAS=bias is not None, SCALE_PER_K=per_k, GROUP_M=8,
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4 if block_m <= 64 else 8,
                          num_stages=3)
    return out


@triton.jit
def _fp8_weight_step(acc, x, W, WS, offs_n, offs_k, mask_n, k, K, stride_wn, stride_wsn, stride_wsk, group_n,
                     group_k, EVEN_K: tl.constexpr, SCALE_PER_K: tl.constexpr):
    # One K step of rows offs_n: load the FP8 tile, widen it to x's dtype
    # (exact: e4m3 values fit bfloat16 and float16), multiply on the tensor cores.
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    if EVEN_K:
        w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
    w = w.to(x.dtype)
    if SCALE_PER_K:
        ws = tl.load(WS + (offs_n // group_n).to(tl.int64) * stride_wsn + (k // group_k) * stride_wsk,
                     mask=mask_n, other=0.0)
        return acc + tl.dot(x, tl.trans(w)) * ws[None, :]
    return tl.dot(x, tl.trans(w), acc)


@triton.jit(do_not_specialize=["M"])
def _fp8_skinny_kernel(X, W, WS, B, Y, M, N, K, stride_xm, stride_wn, stride_ym, stride_wsn, stride_wsk,
                       group_n, group_k,
                       HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SCALE_PER_K: tl.constexpr,
                       GATED: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       USE_PDL: tl.constexpr):
    # GATED: W is [2N, K] (gate rows, then up rows, each with their scales);
    # the program also streams the up rows of its columns and writes
    # silu(gate) * up, rounded as the unfused GEMM + silu_and_mul round them.
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
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
        acc = _fp8_weight_step(acc, x, W, WS, offs_n, offs_k, mask_n, k, K, stride_wn, stride_wsn, stride_wsk,
                               group_n, group_k, EVEN_K, SCALE_PER_K)
        if GATED:
            acc_up = _fp8_weight_step(acc_up, x, W, WS, N + offs_n, offs_k, mask_n, k, K, stride_wn, stride_wsn,
                                      stride_wsk, group_n, group_k, EVEN_K, SCALE_PER_K)
    # The weight is read: a dependent GEMV may launch and stage meanwhile.
    pdl_release(USE_PDL)
    if not SCALE_PER_K:
        acc = acc * tl.load(WS + (offs_n // group_n).to(tl.int64) * stride_wsn, mask=mask_n, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * tl.load(WS + ((N + offs_n) // group_n).to(tl.int64) * stride_wsn, mask=mask_n,
                                      other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(B + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATED:
        gate = acc.to(X.dtype.element_ty).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty) * acc_up.to(X.dtype.element_ty)
    else:
        y = acc.to(X.dtype.element_ty)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=mask_m[:, None] & mask_n[None, :])


def fp8_skinny_tiles(n: int, num_sms: int, group_k: int | None) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_stages)`` for the FP8 skinny GEMV, after the
    bf16 skinny GEMM's choice (:func:`ember.kernels.triton_gemm.skinny_tiles`):
    32-column programs while they make at most one wave, else 64-column ones
    with a K tile twice as long as bf16's (the same weight bytes per step);
    with block scales the K tile is capped at the scale group.
    ``benchmarks/quant_fp8.py`` sweeps the alternatives."""
    programs = triton.cdiv(n, 32)
    block_n, block_k, stages = (32, 512, 4) if programs <= num_sms else (64, 512, 3)
    if group_k is not None:
        block_k = min(block_k, group_k)
    return block_n, block_k, stages


# Tiles tried, in order, when a launch runs out of shared memory or registers
# on a device smaller than the one the defaults were chosen on.
_FALLBACK_TILES = ((32, 256, 3), (16, 128, 2))
# (device, N, K, block scales, default tiles) -> the tiles that launched.
_WORKING_TILES: dict[tuple, tuple[int, int, int]] = {}


def use_fp8_skinny(x: torch.Tensor) -> bool:
    """Whether :func:`fp8_skinny_linear` applies to ``x``: 2-D, 1 to
    :data:`~ember.kernels.triton_gemm.SKINNY_MAX_M` rows, bfloat16 or
    float16, unit stride along K."""
    return (x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_M and x.dtype in (torch.bfloat16, torch.float16)
            and x.stride(1) == 1)


def fp8_skinny_linear(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, group_n: int = 1,
                      group_k: int | None = None, bias: torch.Tensor | None = None,
                      tiles: tuple[int, int, int] | None = None, gated: bool = False,
                      use_pdl: bool = False) -> torch.Tensor:
    """``x @ (qw * sw).T + bias`` for decode row counts, reading the FP8
    weight once (W8A16: x is not quantized).

    Args:
        x: [M, K] bfloat16 / float16, M <= 16, unit stride along K.
        qw: [N, K] ``float8_e4m3fn``, unit stride along K.
        sw: float32 weight scales, [N] / [N, 1] (per channel) or
            [ceil(N / group_n), ceil(K / group_k)] (blocks).
        group_n, group_k: as in :func:`w8a8_scaled_mm`.
        bias: optional [N].
        tiles: ``(BLOCK_N, BLOCK_K, num_stages)``; default :func:`fp8_skinny_tiles`
            (of the whole weight; a gated launch halves BLOCK_N), unless
            per-channel scales and a shape listed in
            :data:`ember.kernels.triton_fp8_gemv.FP8_GEMV_CONFIGS` select
            :func:`~ember.kernels.triton_fp8_gemv.fp8_gemv` with its configuration.
        gated: ``qw`` is a merged gate_up weight [2D, K] (gate rows, then up
            rows): return SwiGLU's ``silu(g) * u`` [M, D] without writing
            ``[g | u]``, rounded as this GEMM followed by
            :func:`ember.kernels.triton_ops.silu_and_mul`.
        use_pdl: launch with PDL where the device supports it (:mod:`ember.kernels.pdl`).
    Returns:
        [M, N] ([M, N / 2] gated) in x's dtype (float32 accumulation).
    Raises:
        ValueError: inputs outside :func:`use_fp8_skinny`, or shapes that
            disagree, or a K tile that does not divide ``group_k``, or an odd
            gated weight.
    """
    if not use_fp8_skinny(x) or qw.dim() != 2 or qw.shape[1] != x.shape[1] or qw.stride(1) != 1:
        raise ValueError(f"FP8 skinny GEMM: unsupported x {tuple(x.shape)} {x.dtype} / weight "
                         f"{tuple(qw.shape)} {qw.dtype}")
    m, k = x.shape
    n = qw.shape[0]
    if gated and n % 2:
        raise ValueError(f"FP8 skinny gated GEMM: weight {tuple(qw.shape)} has an odd number of rows")
    swn, swk = _scale_strides(sw, n)
    per_k = bool(swk)
    if tiles is None and not per_k and group_n == 1 and sw.numel() == n:
        # A per-channel shape that the GEMV sweep tuned (an empty table by default).
        config = lookup_config(n, k, m)
        if config is not None and (config.convert != "asm" or (x.is_cuda and not INTERPRETED)):
            return fp8_gemv(x, qw, sw, config, bias, gated=gated, use_pdl=use_pdl)
    if tiles is None and per_k and group_k is not None and x.is_cuda and not INTERPRETED:
        # Block scales: the configurable GEMV with the PTX widening, each K tile scaled by its group's scales.
        config = block_scaled_config(n, k, group_k, _num_sms(x.device), gated)
        if config is not None:
            return fp8_gemv(x, qw, sw, config, bias, gated=gated, use_pdl=use_pdl, group_n=group_n,
                            group_k=group_k)
    block_n, block_k, stages = tiles or fp8_skinny_tiles(n, _num_sms(x.device), group_k if per_k else None)
    if per_k and (group_k is None or group_k % block_k):
        raise ValueError(f"FP8 skinny GEMM: K tile {block_k} does not divide the scale group {group_k}")
    if gated:  # same weight bytes per program as the ungated tiles of the whole [2D, K] weight
        n, block_n = n // 2, max(16, block_n // 2)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    key = (x.device, n, k, per_k, gated, block_n, block_k, stages)
    pdl = use_pdl and pdl_supported(x.device)
    if key in _WORKING_TILES:
        candidates = [_WORKING_TILES[key]]
    else:
        candidates = [(block_n, block_k, stages)] + [
            (max(16, bn // 2) if gated else bn, bk, st) for bn, bk, st in _FALLBACK_TILES
            if tiles is None and (not per_k or group_k % bk == 0)]
    for i, (block_n, block_k, stages) in enumerate(candidates):
        try:
            _fp8_skinny_kernel[(triton.cdiv(n, block_n),)](
                x, qw, sw, bias if bias is not None else out, out, m, n, k, x.stride(0), qw.stride(0),
                out.stride(0), swn, swk, group_n, group_k or k, HAS_BIAS=bias is not None,
                EVEN_K=k % block_k == 0, SCALE_PER_K=per_k, GATED=gated, BLOCK_M=SKINNY_MAX_M, BLOCK_N=block_n,
                BLOCK_K=block_k, USE_PDL=pdl, num_warps=4, num_stages=stages, **launch_options(pdl))
        except triton.runtime.errors.OutOfResources:
            if i == len(candidates) - 1:
                raise
            continue
        _WORKING_TILES[key] = (block_n, block_k, stages)
        return out
    return out
