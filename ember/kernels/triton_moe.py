"""Fused MoE on the GPU: a Triton grouped GEMM over experts, tokens sorted by
expert (the design of vLLM's / SGLang's ``fused_moe``; Triton's grouped-GEMM
tutorial for the tiling).

1. ``moe_align``: the ``num_tokens * top_k`` (token, expert) pairs are sorted by
   expert and each expert's run is padded to a multiple of ``BLOCK_M``, so one
   program's row block belongs to one expert. Done with device ops only (no
   host sync), sized by a static upper bound, so it can be captured in a CUDA graph.
2. GEMM 1: rows ``hidden[pair // top_k]`` times ``w13[expert].T`` -> [pairs, 2I].
3. SiLU-and-mul -> [pairs, I].
4. GEMM 2: rows times ``w2[expert].T``, scaled by the pair's routing weight -> [pairs, H].
5. Sum the ``top_k`` rows of each token.

At decode sizes (at most :data:`GEMV_MAX_PAIRS` pairs) the sort and its dozen
small launches cost more than the GEMMs, so :func:`fused_experts_gemv` runs
instead: one program per (pair, column tile) reads its expert id straight
from ``topk_ids`` and streams that expert's rows (the skinny GEMM's scheme,
:mod:`ember.kernels.triton_gemm`), SiLU-and-mul in the first GEMM's epilogue
and the routing weight in the second's: two launches and the top-k sum. Pairs
that share an expert read its rows once each (at these sizes mostly from L2,
or not at all shared: 8 of 128-256 experts per token).

FP8 experts (:func:`fused_experts_fp8_triton`; at decode sizes with a row
block per pair instead of the sort, :func:`pair_blocks`) run the same steps with FP8
(``float8_e4m3fn``) weights and activations in the GEMMs (Hopper's FP8 tensor
cores; the weights are read at one byte per element): the GEMM inputs are
quantized first (the hidden states, and the SiLU-and-mul output in the same
kernel that computes it), per token in groups of the weight's block width
(DeepSeek-V3's 1 x 128 activation groups against 128 x 128 weight blocks;
DeepSeek-V3 technical report, section 3.3.2) or per token over the whole row
against per-output-channel weight scales, or with one static scale. The bf16
path is untouched: its launches are the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.triton_ops import silu_and_mul


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, expert) pairs by expert, each expert's run padded to ``block_m``.

    Args:
        topk_ids: [num_tokens, top_k] int expert ids.
    Returns:
        sorted_ids: [num_blocks * block_m] int32, pair index ``t * top_k + j``
            per row, padding rows hold ``num_tokens * top_k``.
        block_expert: [num_blocks] int32, the expert of each row block (-1: unused block).
    """
    flat = topk_ids.flatten().to(torch.int64)
    n = flat.numel()
    max_rows = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    order = torch.argsort(flat, stable=True)
    # NOTE: scatter_add, not bincount: bincount reads the max id on the host (a sync).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    start_unpadded = torch.cumsum(counts, 0) - counts
    expert_sorted = flat[order]
    rank = torch.arange(n, device=flat.device) - start_unpadded[expert_sorted]
    dest = (padded_end - padded)[expert_sorted] + rank
    sorted_ids = torch.full((max_rows,), n, dtype=torch.int32, device=flat.device)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, max_rows, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    block_expert = torch.where(block_expert < num_experts, block_expert, torch.full_like(block_expert, -1))
    return sorted_ids, block_expert


def pair_blocks(topk_ids: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moe_align`'s outputs without the sort, for decode sizes: one row
    block per (token, expert) pair, the pair in its first row and padding in
    the others (three small launches instead of a dozen).

    Args:
        topk_ids: [num_tokens, top_k] int expert ids.
    Returns:
        sorted_ids: [num_pairs * block_m] int32; block_expert: [num_pairs] int32.
    """
    flat = topk_ids.flatten()
    n = flat.numel()
    sorted_ids = torch.full((n, block_m), n, dtype=torch.int32, device=flat.device)
    sorted_ids[:, 0] = torch.arange(n, dtype=torch.int32, device=flat.device)
    return sorted_ids.view(-1), flat.to(torch.int32)


@triton.jit(do_not_specialize=["num_pairs"])  # varies per step (see triton_attention's NOTE)
def _moe_gemm_kernel(A, B, C, sorted_ids, block_expert, topk_weights, num_pairs, n_out, k_in,
                     stride_am, stride_be, stride_bn, stride_bk, stride_cm,
                     TOP_K: tl.constexpr, A_ROWS_ARE_TOKENS: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids + offs_m)
    mask_m = pairs < num_pairs
    a_rows = pairs // TOP_K if A_ROWS_ARE_TOKENS else pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_out
    b_base = B + expert.to(tl.int64) * stride_be
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_in
        a = tl.load(A + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if IEEE:  # float32 weights: true float32 products, as the reference
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if MUL_WEIGHT:
        w = tl.load(topk_weights + pairs, mask=mask_m, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    tl.store(C + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _moe_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_ids: torch.Tensor,
              block_expert: torch.Tensor, topk_weights: torch.Tensor, num_pairs: int, top_k: int,
              rows_are_tokens: bool, mul_weight: bool, block_m: int) -> None:
    n_out, k_in = w.shape[1], w.shape[2]
    block_n, block_k = 64, 64
    grid = (block_expert.shape[0], triton.cdiv(n_out, block_n))
    _moe_gemm_kernel[grid](a, w, out, sorted_ids, block_expert, topk_weights, num_pairs, n_out, k_in,
                           a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
                           TOP_K=top_k, A_ROWS_ARE_TOKENS=rows_are_tokens, MUL_WEIGHT=mul_weight,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=w.dtype == torch.float32,
                           num_warps=4, num_stages=3)


# (token, expert) pairs up to which :func:`fused_experts_triton` runs the
# per-pair GEMV form (8 decode tokens at top-8) instead of sorting by expert.
GEMV_MAX_PAIRS = 64


@triton.jit
def _moe_gemv_kernel(A, B, C, topk_ids, topk_weights, n_out, k_in,
                     stride_am, stride_be, stride_bn, stride_cm,
                     TOP_K: tl.constexpr, A_ROWS_ARE_TOKENS: tl.constexpr, GATED: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    # One pair's row (padded to a 16-row MMA tile, rows 1..15 zero) times its
    # expert's BLOCK_N rows of B ([E, n_out (x2 if GATED), k_in], K contiguous).
    # GATED: B holds gate rows then up rows; the result is silu(gate) * up,
    # rounded as the GEMM + silu_and_mul kernels round it.
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(topk_ids + pair).to(tl.int64)
    row = pair // TOP_K if A_ROWS_ARE_TOKENS else pair
    offs_m = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_out
    b_base = B + expert * stride_be
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_in
        a = tl.load(A + row.to(tl.int64) * stride_am + offs_m[:, None] * 0 + offs_k[None, :],
                    mask=(offs_m == 0)[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_base + offs_n[:, None] * stride_bn + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)
        if IEEE:
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        if GATED:
            b_up = tl.load(b_base + (n_out + offs_n[:, None]) * stride_bn + offs_k[None, :],
                           mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if IEEE:
                acc_up += tl.dot(a, tl.trans(b_up), input_precision="ieee")
            else:
                acc_up = tl.dot(a, tl.trans(b_up), acc_up)
    if GATED:
        gate = acc.to(C.dtype.element_ty).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(C.dtype.element_ty) * acc_up.to(C.dtype.element_ty)
    elif MUL_WEIGHT:
        y = (acc * tl.load(topk_weights + pair).to(tl.float32)).to(C.dtype.element_ty)
    else:
        y = acc.to(C.dtype.element_ty)
    y_row = tl.sum(tl.where((offs_m == 0)[:, None], y.to(tl.float32), 0.0), 0)
    tl.store(C + pair.to(tl.int64) * stride_cm + offs_n, y_row.to(C.dtype.element_ty), mask=mask_n)


# (BLOCK_N, BLOCK_K, num_stages, num_warps) of the GEMV form's two launches.
GEMV_TILES = {"w13": (32, 256, 4, 4), "w2": (32, 256, 4, 4)}


def _moe_gemv(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, n_out: int, top_k: int, rows_are_tokens: bool, gated: bool,
              mul_weight: bool) -> None:
    k_in = w.shape[2]
    num_pairs = topk_ids.numel()
    block_n, block_k, stages, warps = GEMV_TILES["w13" if gated else "w2"]
    if w.element_size() > 2:  # float32 weights: half the K tile, or the stages overflow shared memory
        block_k //= 2
    grid = (num_pairs, triton.cdiv(n_out, block_n))
    _moe_gemv_kernel[grid](a, w, out, topk_ids, topk_weights, n_out, k_in,
                           a.stride(0), w.stride(0), w.stride(1), out.stride(0),
                           TOP_K=top_k, A_ROWS_ARE_TOKENS=rows_are_tokens, GATED=gated, MUL_WEIGHT=mul_weight,
                           BLOCK_N=block_n, BLOCK_K=block_k, IEEE=w.dtype == torch.float32,
                           num_warps=warps, num_stages=stages)


def fused_experts_gemv(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts, one program per (token, expert) pair and column
    tile (the decode form, see the module doc); contract as
    :func:`fused_experts_triton`. Needs contiguous weights (K innermost)."""
    num_tokens, hidden = hidden_states.shape
    top_k = topk_ids.shape[1]
    inter = w13.shape[1] // 2
    num_pairs = num_tokens * top_k
    ids = topk_ids.flatten().contiguous()
    weights = topk_weights.flatten().contiguous()
    h = hidden_states.contiguous()
    act = torch.empty(num_pairs, inter, dtype=h.dtype, device=h.device)
    _moe_gemv(h, w13, act, ids, weights, inter, top_k, True, True, False)
    down = torch.empty(num_pairs, hidden, dtype=h.dtype, device=h.device)
    _moe_gemv(act, w2, down, ids, weights, hidden, top_k, False, False, True)
    return down.view(num_tokens, top_k, hidden).sum(dim=1)


def fused_experts_triton(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts (same contract as ``fused_experts_torch``): the
    per-pair GEMV form up to :data:`GEMV_MAX_PAIRS` (token, expert) pairs,
    else the grouped GEMM over pairs sorted by expert.

    Args:
        hidden_states: [num_tokens, hidden]. w13: [E, 2I, hidden] (gate rows then
            up rows). w2: [E, hidden, I]. topk_weights / topk_ids: [num_tokens, top_k].
    Returns:
        [num_tokens, hidden], in hidden_states' dtype.
    """
    if topk_ids.numel() <= GEMV_MAX_PAIRS and w13.stride(2) == 1 and w2.stride(2) == 1:
        return fused_experts_gemv(hidden_states, w13, w2, topk_weights, topk_ids)
    return fused_experts_grouped(hidden_states, w13, w2, topk_weights, topk_ids)


def fused_experts_grouped(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                          topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts by the grouped GEMM over pairs sorted by expert
    (steps 1-5 of the module doc); contract as :func:`fused_experts_triton`."""
    num_tokens, hidden = hidden_states.shape
    top_k = topk_ids.shape[1]
    num_experts, two_inter, _ = w13.shape
    num_pairs = num_tokens * top_k
    block_m = 16 if num_pairs <= 64 * num_experts else 64
    sorted_ids, block_expert = moe_align(topk_ids, num_experts, block_m)
    weights = topk_weights.flatten().contiguous()
    h = hidden_states.contiguous()
    up = torch.empty(num_pairs, two_inter, dtype=h.dtype, device=h.device)
    _moe_gemm(h, w13, up, sorted_ids, block_expert, weights, num_pairs, top_k, True, False, block_m)
    act = silu_and_mul(up)
    down = torch.empty(num_pairs, hidden, dtype=h.dtype, device=h.device)
    _moe_gemm(act, w2, down, sorted_ids, block_expert, weights, num_pairs, top_k, False, True, block_m)
    return down.view(num_tokens, top_k, hidden).sum(dim=1)


# Largest finite float8_e4m3fn value.
FP8_E4M3_MAX = 448.0
# Smallest activation scale (an all-zero group quantizes to zeros, not NaN).
_MIN_SCALE = 1e-10


@triton.jit
def _quant_fp8_kernel(X, Q, S, static_scale, n_cols, stride_xm, stride_qm, stride_sm,
                      GROUP: tl.constexpr, BLOCK: tl.constexpr, SILU_MUL: tl.constexpr, STATIC: tl.constexpr,
                      FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    # One program per (row, group of GROUP columns).
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, BLOCK)
    mask = (offs < n_cols) & (tl.arange(0, BLOCK) < GROUP)
    x = tl.load(X + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    if SILU_MUL:  # row = [gate | up], each n_cols wide
        up = tl.load(X + row * stride_xm + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        x = x / (1.0 + tl.exp(-x)) * up
    if STATIC:
        scale = tl.load(static_scale)
    else:
        scale = tl.maximum(tl.max(tl.abs(x)), MIN_SCALE) / FP8_MAX
    q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
    tl.store(Q + row * stride_qm + offs, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + row * stride_sm + g, scale)


def quant_fp8(x: torch.Tensor, group: int | None, silu_mul: bool = False,
              static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to ``float8_e4m3fn``, per token in groups.

    Args:
        x: [num_rows, K] (``silu_mul``: [num_rows, 2K], gate columns then up
            columns, quantizing ``silu(gate) * up``), any float dtype, last dim contiguous.
        group: columns per scale (e.g. 128); None: one scale per row.
        static_scale: a float32 scale of one element (the checkpoint's
            ``input_scale``) used for every row instead of the rows' absmax.
    Returns:
        q: [num_rows, K] ``float8_e4m3fn``, ``clamp(x / scale, -448, 448)``.
        scale: [num_rows, ceil(K / group)] float32 (dynamic: the group's
            absmax / 448, at least 1e-10; static: ``static_scale`` repeated).
    """
    rows, cols = x.shape[0], x.shape[1] // 2 if silu_mul else x.shape[1]
    group = group or cols
    num_groups = triton.cdiv(cols, group)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, num_groups, dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(group)
        _quant_fp8_kernel[(rows, num_groups)](
            x, q, scale, static_scale if static_scale is not None else scale, cols, x.stride(0), q.stride(0),
            scale.stride(0), GROUP=group, BLOCK=block, SILU_MUL=silu_mul, STATIC=static_scale is not None,
            FP8_MAX=FP8_E4M3_MAX, MIN_SCALE=_MIN_SCALE, num_warps=1 if block <= 256 else (4 if block <= 2048 else 8))
    return q, scale


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_gemm_fp8_kernel(A, A_scale, B, B_scale, C, sorted_ids, block_expert, topk_weights, num_pairs, n_out, k_in,
                         stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bk,
                         stride_bse, stride_bsn, stride_bsk, stride_cm,
                         TOP_K: tl.constexpr, A_ROWS_ARE_TOKENS: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                         GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # GROUP_K > 0: block scales, B_scale[e, n // GROUP_N, k // GROUP_K] and
    # A_scale[row, k // GROUP_K], applied per K step (BLOCK_K == GROUP_K).
    # GROUP_K == 0: B_scale[e, n] per output channel and A_scale[row, 0] per
    # row, applied once to the accumulated product.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids + offs_m)
    mask_m = pairs < num_pairs
    a_rows = (pairs // TOP_K if A_ROWS_ARE_TOKENS else pairs).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_out
    b_base = B + expert.to(tl.int64) * stride_be
    bs_base = B_scale + expert.to(tl.int64) * stride_bse
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_in
        a = tl.load(A + a_rows[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if GROUP_K > 0:
            a_s = tl.load(A_scale + a_rows * stride_asm + (k0 // GROUP_K) * stride_ask, mask=mask_m, other=0.0)
            b_s = tl.load(bs_base + (offs_n // GROUP_N) * stride_bsn + (k0 // GROUP_K) * stride_bsk,
                          mask=mask_n, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        else:
            acc += tl.dot(a, b)
    if GROUP_K == 0:
        a_s = tl.load(A_scale + a_rows * stride_asm, mask=mask_m, other=0.0)
        b_s = tl.load(bs_base + offs_n * stride_bsn, mask=mask_n, other=0.0)
        acc = acc * a_s[:, None] * b_s[None, :]
    if MUL_WEIGHT:
        w = tl.load(topk_weights + pairs, mask=mask_m, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    tl.store(C + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _moe_gemm_fp8(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  out: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
                  topk_weights: torch.Tensor, num_pairs: int, top_k: int, rows_are_tokens: bool, mul_weight: bool,
                  block_m: int, block_shape: tuple[int, int] | None) -> None:
    n_out, k_in = w.shape[1], w.shape[2]
    if block_shape is not None:
        group_n, group_k = block_shape
        block_k = group_k
        bs_strides = w_scale.stride()
    else:  # per-channel scales [E, N]
        group_n, group_k, block_k = 1, 0, 128
        bs_strides = (w_scale.stride(0), w_scale.stride(1), 0)
    block_n = 64 if block_m <= 16 else 128
    grid = (block_expert.shape[0], triton.cdiv(n_out, block_n))
    _moe_gemm_fp8_kernel[grid](a, a_scale, w, w_scale, out, sorted_ids, block_expert, topk_weights, num_pairs,
                               n_out, k_in, a.stride(0), a_scale.stride(0), a_scale.stride(1),
                               w.stride(0), w.stride(1), w.stride(2), *bs_strides, out.stride(0),
                               TOP_K=top_k, A_ROWS_ARE_TOKENS=rows_are_tokens, MUL_WEIGHT=mul_weight,
                               GROUP_N=group_n, GROUP_K=group_k, BLOCK_M=block_m, BLOCK_N=block_n,
                               BLOCK_K=block_k, num_warps=4, num_stages=3)


def fused_experts_fp8_triton(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                             w13_scale: torch.Tensor, w2_scale: torch.Tensor, topk_weights: torch.Tensor,
                             topk_ids: torch.Tensor, block_shape: tuple[int, int] | None = None,
                             a13_scale: torch.Tensor | None = None, a2_scale: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """Routed SwiGLU experts with FP8 weights (same contract as
    ``fused_experts_fp8_torch``).

    Args:
        hidden_states: [num_tokens, hidden] (bf16, fp16 or float32).
        w13: [E, 2I, hidden] ``float8_e4m3fn`` (gate rows then up rows).
        w2: [E, hidden, I] ``float8_e4m3fn``.
        w13_scale, w2_scale: with ``block_shape`` ``(bn, bk)``, block scales
            [E, 2I / bn, ceil(hidden / bk)] and [E, ceil(hidden / bn), I / bk]
            (``I`` a multiple of ``bn`` and ``bk``); without, one scale per
            output row: [E, 2I] and [E, hidden]. float32, ``W = w * scale``.
        topk_weights / topk_ids: [num_tokens, top_k].
        a13_scale, a2_scale: static activation scales (one float32 element
            each) of the two GEMMs' inputs; None: dynamic, per token (in
            groups of ``bk`` with ``block_shape``).
    Returns:
        [num_tokens, hidden], in hidden_states' dtype.
    """
    num_tokens, hidden = hidden_states.shape
    top_k = topk_ids.shape[1]
    num_experts, two_inter, _ = w13.shape
    num_pairs = num_tokens * top_k
    group_k = block_shape[1] if block_shape is not None else None
    block_m = 16 if num_pairs <= 64 * num_experts else 64
    if num_pairs <= GEMV_MAX_PAIRS:  # decode sizes: a row block per pair, no sort
        sorted_ids, block_expert = pair_blocks(topk_ids, block_m)
    else:
        sorted_ids, block_expert = moe_align(topk_ids, num_experts, block_m)
    weights = topk_weights.flatten().contiguous()
    h = hidden_states.contiguous()
    h_q, h_s = quant_fp8(h, group_k, static_scale=a13_scale)
    up = torch.empty(num_pairs, two_inter, dtype=h.dtype, device=h.device)
    _moe_gemm_fp8(h_q, h_s, w13, w13_scale, up, sorted_ids, block_expert, weights, num_pairs, top_k, True, False,
                  block_m, block_shape)
    act_q, act_s = quant_fp8(up, group_k, silu_mul=True, static_scale=a2_scale)
    down = torch.empty(num_pairs, hidden, dtype=h.dtype, device=h.device)
    _moe_gemm_fp8(act_q, act_s, w2, w2_scale, down, sorted_ids, block_expert, weights, num_pairs, top_k, False,
                  True, block_m, block_shape)
    return down.view(num_tokens, top_k, hidden).sum(dim=1)
