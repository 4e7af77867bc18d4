"""Qwen3 (per-head q/k RMSNorm, explicit head_dim, GQA, tied embeddings) vs
HF transformers on a tiny random sharded checkpoint."""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from tests.models.tiny import check_model_vs_hf, randomize_norms_, save_tiny


def test_qwen3_matches_hf(tmp_path):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24,  # head_dim != hidden_size / num_heads
        max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=True)
    hf = Qwen3ForCausalLM(config)
    randomize_norms_(hf)
    check_model_vs_hf(hf, save_tiny(hf, tmp_path, max_shard_size="100KB"))
