"""MoE routers vs HF transformers' routers; plain-PyTorch experts vs a
per-token loop; FusedMoE's weight loader for both HF expert layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from ember.layers.moe import FusedMoE, GroupedTopKRouter, SoftmaxTopKRouter
from ember.layers.moe.torch_moe import fused_experts_torch

HIDDEN, E, INTER, N = 32, 16, 24, 40


def _sorted(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k sets are unordered: compare them sorted by expert id."""
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_router_matches_hf(renormalize):
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=E, num_experts_per_tok=4, norm_topk_prob=renormalize)
    hf = Qwen3MoeTopKRouter(config)
    torch.nn.init.normal_(hf.weight)
    ours = SoftmaxTopKRouter(HIDDEN, E, 4, renormalize)
    ours.weight.data.copy_(hf.weight)
    x = torch.randn(N, HIDDEN)
    _, ref_w, ref_ids = hf(x)
    w, ids = ours(x)
    torch.testing.assert_close(_sorted(w, ids), _sorted(ref_w.float(), ref_ids))


@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_router_matches_hf(renormalize):
    torch.manual_seed(0)
    config = DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=E, num_experts_per_tok=4, n_group=4,
                              topk_group=2, norm_topk_prob=renormalize, routed_scaling_factor=2.5)
    hf = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(hf.weight)
    hf.e_score_correction_bias.normal_(0, 0.5)
    ours = GroupedTopKRouter(HIDDEN, E, 4, renormalize, num_expert_group=4, topk_group=2, routed_scaling_factor=2.5)
    ours.weight.data.copy_(hf.weight)
    ours.e_score_correction_bias.data.copy_(hf.e_score_correction_bias)
    x = torch.randn(N, HIDDEN)
    _, ref_w, ref_ids = hf(x)
    w, ids = ours(x)
    torch.testing.assert_close(_sorted(w, ids), _sorted(ref_w, ref_ids))
    # Only experts of the topk_group best groups are chosen: at most 2 distinct groups per token.
    assert max(len(set((row // 4).tolist())) for row in ids) <= 2


def test_torch_experts_match_per_token_loop():
    torch.manual_seed(0)
    w13, w2 = torch.randn(E, 2 * INTER, HIDDEN) / HIDDEN ** 0.5, torch.randn(E, HIDDEN, INTER) / INTER ** 0.5
    x = torch.randn(N, HIDDEN)
    weights, ids = torch.rand(N, 3), torch.stack([torch.randperm(E)[:3] for _ in range(N)])
    out = fused_experts_torch(x, w13, w2, weights, ids)
    for t in range(N):
        ref = sum(weights[t, k] * (F.silu(x[t] @ w13[e, :INTER].T) * (x[t] @ w13[e, INTER:].T)) @ w2[e].T
                  for k, e in enumerate(ids[t].tolist()))
        torch.testing.assert_close(out[t], ref, rtol=1e-5, atol=1e-6)


def test_weight_loader_per_expert_and_stacked_layouts():
    torch.manual_seed(0)
    gate, up, down = torch.randn(E, INTER, HIDDEN), torch.randn(E, INTER, HIDDEN), torch.randn(E, HIDDEN, INTER)
    per_expert, stacked = FusedMoE(E, HIDDEN, INTER), FusedMoE(E, HIDDEN, INTER)
    mapping = {w: (p, e, s) for p, w, e, s in FusedMoE.make_expert_params_mapping(E)}
    for e in range(E):
        for name, tensor in (("gate_proj", gate[e]), ("up_proj", up[e]), ("down_proj", down[e])):
            param_name, expert_id, shard_id = mapping[f"experts.{e}.{name}.weight"]
            param = getattr(per_expert, param_name.split(".")[1])
            per_expert.weight_loader(param, tensor, shard_id, expert_id)
    stacked.weight_loader(stacked.w13_weight, torch.cat([gate, up], dim=1), "w13")
    stacked.weight_loader(stacked.w2_weight, down, "w2")
    assert torch.equal(per_expert.w13_weight, torch.cat([gate, up], dim=1))
    assert torch.equal(per_expert.w2_weight, down)
    assert torch.equal(stacked.w13_weight, per_expert.w13_weight) and torch.equal(stacked.w2_weight, down)
    with pytest.raises(ValueError, match="w2 of expert 0"):
        per_expert.weight_loader(per_expert.w2_weight, torch.randn(HIDDEN + 1, INTER), "w2", 0)
