"""Plain PyTorch experts (the CPU path): one gathered matmul pair per expert
that received tokens, as HF transformers' eager ``*Experts`` modules do."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_experts_torch(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """``sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x_t)`` with SwiGLU experts
    ``down(silu(gate(x)) * up(x))``.

    Args:
        hidden_states: [num_tokens, hidden].
        w13: [num_experts, 2 * intermediate, hidden], gate rows then up rows.
        w2: [num_experts, hidden, intermediate].
        topk_weights: [num_tokens, top_k] (float32).
        topk_ids: [num_tokens, top_k] int64.
    Returns:
        [num_tokens, hidden], dtype of ``hidden_states``.
    """
    out = torch.zeros_like(hidden_states)
    inter = w2.shape[-1]
    for expert in topk_ids.unique().tolist():
        token_idx, slot = torch.where(topk_ids == expert)
        gate_up = F.linear(hidden_states[token_idx], w13[expert])
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(h, w2[expert]) * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
_MIN_SCALE = 1e-10  # smallest dynamic activation scale (an all-zero group stays zero, not NaN)


def quantize_fp8_torch(x: torch.Tensor, group: int | None, static_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations to ``float8_e4m3fn`` per token in groups of ``group``
    columns (None: the whole row), or with one static scale; as the Triton
    ``quant_fp8`` does.

    Args:
        x: [num_rows, K], any float dtype.
        static_scale: one float32 element, or None (dynamic: absmax / 448 per group).
    Returns:
        q: [num_rows, K] ``float8_e4m3fn`` (``clamp(x / scale, -448, 448)``);
        scale: [num_rows, ceil(K / group)] float32.
    """
    rows, cols = x.shape
    group = group or cols
    num_groups = -(-cols // group)
    xf = F.pad(x.float(), (0, num_groups * group - cols)).view(rows, num_groups, group)
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1).expand(rows, num_groups)
    else:
        scale = xf.abs().amax(dim=-1).clamp(min=_MIN_SCALE) / FP8_E4M3_MAX
    q = (xf / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(rows, num_groups * group)[:, :cols], scale.contiguous()


def dequantize_fp8_torch(q: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int] | None) -> torch.Tensor:
    """``q * scale`` in float32: ``q`` [rows, cols] FP8 with block scales
    [ceil(rows / bm), ceil(cols / bn)] (``block_shape`` ``(bm, bn)``), or with
    one scale per row ([rows] or [rows, 1]; ``block_shape`` None)."""
    if block_shape is None:
        return q.float() * scale.float().reshape(-1, 1)
    bm, bn = block_shape
    expanded = scale.float().repeat_interleave(bm, 0)[: q.shape[0]].repeat_interleave(bn, 1)[:, : q.shape[1]]
    return q.float() * expanded


def fused_experts_fp8_torch(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                            w13_scale: torch.Tensor, w2_scale: torch.Tensor, topk_weights: torch.Tensor,
                            topk_ids: torch.Tensor, block_shape: tuple[int, int] | None = None,
                            a13_scale: torch.Tensor | None = None, a2_scale: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """FP8 experts in plain PyTorch (the CPU path): activations quantized as
    the GPU kernel quantizes them (per token, in groups of the block width, or
    with the static scales), each used expert's weights dequantized to float32,
    products in float32.

    Args: as :func:`ember.kernels.triton_moe.fused_experts_fp8_triton`
        (``w13`` [E, 2I, hidden] and ``w2`` [E, hidden, I] ``float8_e4m3fn``;
        block scales [E, 2I / bm, ceil(hidden / bn)] / [E, ceil(hidden / bm), I / bn],
        or per-row scales [E, 2I] / [E, hidden]).
    Returns:
        [num_tokens, hidden], dtype of ``hidden_states``.
    """
    group = block_shape[1] if block_shape is not None else None
    q, s = quantize_fp8_torch(hidden_states, group, a13_scale)
    x = dequantize_fp8_torch(q, s, (1, group) if group else None)
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    inter = w2.shape[-1]
    for expert in topk_ids.unique().tolist():
        token_idx, slot = torch.where(topk_ids == expert)
        gate_up = F.linear(x[token_idx], dequantize_fp8_torch(w13[expert], w13_scale[expert], block_shape))
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        hq, hs = quantize_fp8_torch(h, group, a2_scale)
        h = dequantize_fp8_torch(hq, hs, (1, group) if group else None)
        y = F.linear(h, dequantize_fp8_torch(w2[expert], w2_scale[expert], block_shape))
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot, None].float())
    return out.to(hidden_states.dtype)
