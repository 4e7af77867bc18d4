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
