"""Qwen3-MoE (softmax top-k routing, norm_topk_prob, a dense layer from
mlp_only_layers) vs HF transformers on a tiny random sharded checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from tests.models.tiny import check_model_vs_hf, check_prefill_logits, ember_llm, make_prompts, randomize_norms_, save_tiny


def tiny_model(**overrides) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    fields = dict(
        vocab_size=80, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**(fields | overrides)))
    randomize_norms_(model)
    return model


def test_qwen3_moe_matches_hf(tmp_path):
    hf = tiny_model()
    check_model_vs_hf(hf, save_tiny(hf, tmp_path, max_shard_size="200KB"))


@pytest.mark.parametrize("overrides", [dict(norm_topk_prob=False, mlp_only_layers=[], decoder_sparse_step=2,
                                            num_experts_per_tok=3)], ids=["no-renorm-sparse-step-2"])
def test_qwen3_moe_variant_prefill(tmp_path, overrides):
    hf = tiny_model(**overrides)
    check_prefill_logits(ember_llm(save_tiny(hf, tmp_path)), hf, make_prompts())
