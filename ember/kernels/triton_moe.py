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


def fused_experts_triton(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts (same contract as ``fused_experts_torch``).

    Args:
        hidden_states: [num_tokens, hidden]. w13: [E, 2I, hidden] (gate rows then
            up rows). w2: [E, hidden, I]. topk_weights / topk_ids: [num_tokens, top_k].
    Returns:
        [num_tokens, hidden], in hidden_states' dtype.
    """
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
