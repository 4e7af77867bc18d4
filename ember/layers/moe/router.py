"""MoE routers: router logits -> each token's top-k experts and their weights.

Two recipes:

- softmax top-k (Mixtral, Qwen2/3-MoE; Shazeer et al., 2017): softmax over
  all experts, keep the top ``k``, optionally renormalize them to sum to 1
  (``norm_topk_prob``);
- grouped top-k with sigmoid scores (DeepSeek-V3 technical report, 2024,
  section 2.1.2): experts are split into ``n_group`` groups, a group scores the
  sum of its two best ``sigmoid + e_score_correction_bias`` scores, only the
  best ``topk_group`` groups compete, the top ``k`` experts inside them are
  chosen by biased score but weighted by their unbiased sigmoid score,
  renormalized, and scaled by ``routed_scaling_factor``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing.

    Args:
        router_logits: [num_tokens, num_experts].
        top_k: experts per token.
        renormalize: divide the kept probabilities by their sum.
    Returns:
        ``(topk_weights [num_tokens, top_k] float32, topk_ids [num_tokens, top_k] int64)``.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool, num_expert_group: int,
                 topk_group: int, e_score_correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's group-limited sigmoid routing (see the module docstring),
    as HF ``DeepseekV3TopkRouter`` computes it.

    Args:
        router_logits: [num_tokens, num_experts].
        top_k: experts per token.
        renormalize: ``norm_topk_prob``.
        num_expert_group, topk_group: ``n_group`` groups, of which ``topk_group`` compete.
        e_score_correction_bias: [num_experts], added for selection only.
        routed_scaling_factor: multiplies the final weights.
    Returns:
        ``(topk_weights [num_tokens, top_k] float32, topk_ids [num_tokens, top_k] int64)``.
    """
    n, num_experts = router_logits.shape
    scores = router_logits.float().sigmoid()
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    per_group = choice.view(n, num_expert_group, num_experts // num_expert_group)
    group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1)[0].sum(dim=-1)  # [n, n_group]
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(per_group).reshape(n, num_experts)
    ids = choice.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


class SoftmaxTopKRouter(nn.Module):
    """Gate of a softmax-routed MoE block (HF ``mlp.gate.weight``: [num_experts, hidden]).

    Args:
        hidden_size, num_experts, top_k: sizes.
        renormalize: ``norm_topk_prob``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype or torch.get_default_dtype()),
                                   requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_tokens, hidden]`` -> ``(topk_weights, topk_ids)``, see :func:`softmax_topk`."""
        return softmax_topk(F.linear(hidden_states, self.weight), self.top_k, self.renormalize)


class GroupedTopKRouter(nn.Module):
    """Gate of a DeepSeek-V3 MoE block: HF ``mlp.gate.weight`` [num_experts,
    hidden] and ``mlp.gate.e_score_correction_bias`` [num_experts] (float32).

    The router logits are computed in float32, as in HF and DeepSeek's
    reference inference code.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool, num_expert_group: int,
                 topk_group: int, routed_scaling_factor: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.num_expert_group, self.topk_group = num_expert_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype or torch.get_default_dtype()),
                                   requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_tokens, hidden]`` -> ``(topk_weights, topk_ids)``, see :func:`grouped_topk`."""
        logits = F.linear(hidden_states.float(), self.weight.float())
        return grouped_topk(logits, self.top_k, self.renormalize, self.num_expert_group, self.topk_group,
                            self.e_score_correction_bias, self.routed_scaling_factor)
