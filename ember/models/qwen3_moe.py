"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3-30B-A3B, Qwen3-235B-A22B.

As HF transformers' ``modeling_qwen3_moe``: Qwen3 attention (per-head q/k
RMSNorm) with sparse MoE blocks: a softmax router picks
``num_experts_per_tok`` of ``num_experts`` SwiGLU experts per token, their
probabilities renormalized when ``norm_topk_prob``; no shared expert. A layer
is sparse when it is not in ``mlp_only_layers`` and ``(layer_idx + 1) %
decoder_sparse_step == 0``, else a dense MLP of ``intermediate_size``.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.layers.mlp import GatedMLP
from ember.layers.moe import FusedMoE, SoftmaxTopKRouter
from ember.layers.quantization.base import QuantizationConfig
from ember.models.qwen3 import Qwen3ForCausalLM
from ember.models.utils import ExpertMapping


class Qwen3MoeSparseMoeBlock(nn.Module):
    """Router (HF ``mlp.gate``) + routed experts (HF ``mlp.experts.{e}.*``)."""

    def __init__(self, config, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.gate = SoftmaxTopKRouter(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                                      renormalize=config.norm_topk_prob)
        self.experts = FusedMoE(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                                quant_config=quant_config, prefix=f"{prefix}.experts")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        topk_weights, topk_ids = self.gate(hidden_states)
        return self.experts(hidden_states, topk_weights, topk_ids)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3 with sparse MoE MLPs (see the module docstring)."""

    def make_mlp(self, layer_idx: int, prefix: str) -> nn.Module:
        c, q = self.config, self.quant_config
        sparse = (layer_idx not in (getattr(c, "mlp_only_layers", None) or [])
                  and c.num_experts > 0 and (layer_idx + 1) % getattr(c, "decoder_sparse_step", 1) == 0)
        if sparse:
            return Qwen3MoeSparseMoeBlock(c, q, prefix)
        return GatedMLP(c.hidden_size, c.intermediate_size, quant_config=q, prefix=prefix)

    def expert_params_mapping(self) -> ExpertMapping:
        return FusedMoE.make_expert_params_mapping(self.config.num_experts)
