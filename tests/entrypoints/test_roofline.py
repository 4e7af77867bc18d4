"""The roofline's model cost (bytes and FLOPs) on the bundled SmolLM2, counted by hand."""

from __future__ import annotations

import torch

from ember import LLM
from ember.entrypoints.bench.roofline import model_cost


def test_model_cost_counts_weights_flops_and_kv_bytes_in_the_cache_dtype(smollm2_path):
    llm = LLM(smollm2_path, kv_cache_memory=16 << 20, max_model_len=256)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    mc = runner.model_config
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, hidden 576, vocab 49152, tied embeddings, float32 on CPU.
    assert (mc.num_layers, mc.num_kv_heads, mc.head_dim) == (30, 3, 64)
    cost = model_cost(runner.model, mc)
    assert cost.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4
    assert model_cost(runner.model, mc, torch.float8_e4m3fn).kv_bytes_per_token == 2 * 30 * 3 * 64
    params = sum(p.numel() for p in runner.model.parameters())
    assert cost.weight_bytes == 4 * params
    # Every matrix is a matmul of each token, the tied embedding too (as the LM head); norms are not.
    norms = sum(p.numel() for p in runner.model.parameters() if p.dim() == 1)
    assert cost.flops_per_token == 2 * (params - norms)
    assert cost.attn_flops_per_token_ctx == 4 * 30 * 9 * 64
