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


# ----------------------------------------------------------- stored bytes
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

from ember.entrypoints.bench.roofline import expected_distinct_experts  # noqa: E402


def _build(model_cls, hf_config, quantization: str | None = None, dtype=torch.bfloat16):
    """An Ember model built on CPU in ``dtype`` and processed as after loading,
    and the model config fields :func:`model_cost` reads."""
    from ember.layers.attention.torch_backend import TorchAttentionBackend
    from ember.layers.quantization import get_quant_config

    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        model = model_cls(hf_config, TorchAttentionBackend, quant_config=get_quant_config(quantization, hf_config))
    finally:
        torch.set_default_dtype(saved)
    for module in model.modules():
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    mc = SimpleNamespace(hf_config=hf_config, dtype=dtype, num_layers=hf_config.num_hidden_layers,
                         num_kv_heads=hf_config.num_key_value_heads, head_dim=head_dim)
    return model, mc


def _llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, **kw)


def test_int8_weight_only_halves_the_linear_bytes_read():
    from ember.layers.linear import LinearBase
    from ember.models.llama import LlamaForCausalLM

    bf16, mc = _build(LlamaForCausalLM, _llama_config())
    int8, _ = _build(LlamaForCausalLM, _llama_config(), "int8_weight_only")
    linears = [m for m in bf16.modules() if isinstance(m, LinearBase)]
    linear_bf16 = sum(2 * m.in_features * m.out_features for m in linears)
    scales = sum(4 * m.out_features for m in linears)  # one float32 scale per output channel
    a, b = model_cost(bf16, mc), model_cost(int8, mc)
    assert b.dense_bytes_per_step == a.dense_bytes_per_step - linear_bf16 // 2 + scales
    assert b.weight_bytes == a.weight_bytes - linear_bf16 // 2 + scales
    assert b.flops_per_token == a.flops_per_token  # the same matmuls
    # Untied: the embedding table is stored, not read whole each step; the LM head is.
    embed = 2 * 96 * 64
    assert a.weight_bytes - a.dense_bytes_per_step == embed
    assert a.weight_bytes_read(1) == a.weight_bytes_read(512) == a.dense_bytes_per_step
    assert a.flops_per_token == 2 * (sum(m.in_features * m.out_features for m in linears) + 96 * 64)


def test_fp8_kv_cache_halves_the_kv_bytes():
    from ember.models.llama import LlamaForCausalLM

    model, mc = _build(LlamaForCausalLM, _llama_config())
    bf16 = model_cost(model, mc).kv_bytes_per_token
    assert bf16 == 2 * 2 * 2 * 16 * 2  # K and V, 2 layers, 2 KV heads of 16, 2 bytes
    assert model_cost(model, mc, torch.float8_e4m3fn).kv_bytes_per_token == bf16 // 2


def test_expected_distinct_experts():
    assert expected_distinct_experts(128, 8, 1) == pytest.approx(8)
    assert expected_distinct_experts(128, 8, 2) == pytest.approx(8 + 8 * (1 - 8 / 128))  # second token: new ones
    assert expected_distinct_experts(128, 8, 64) == pytest.approx(128 * (1 - (120 / 128) ** 64))
    assert expected_distinct_experts(128, 8, 10_000) == pytest.approx(128)
    assert expected_distinct_experts(8, 8, 1) == 8


def test_moe_counts_the_expected_distinct_experts_read():
    from transformers import Qwen3MoeConfig

    from ember.layers.moe.layer import FusedMoE
    from ember.models.qwen3_moe import Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=80, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1],
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         tie_word_embeddings=False)
    model, mc = _build(Qwen3MoeForCausalLM, cfg)
    cost = model_cost(model, mc)
    moe = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert len(moe) == 2 and (cost.num_experts, cost.top_k) == (8, 2)
    expert_bytes = sum(2 * 8 * 3 * 64 * 32 for _ in moe)  # gate, up, down of 8 experts, bf16
    assert cost.expert_bytes == expert_bytes
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cost.weight_bytes == params
    assert cost.dense_bytes_per_step == params - expert_bytes - 2 * 80 * 64  # less the embedding table
    for b in (1, 3, 64):
        touched = 8 * (1 - (1 - 2 / 8) ** b)
        assert cost.weight_bytes_read(b) == pytest.approx(cost.dense_bytes_per_step + expert_bytes * touched / 8)
    assert cost.weight_bytes_read(1) == pytest.approx(cost.dense_bytes_per_step + expert_bytes / 4)
    # FLOPs: the routed experts at top_k / num_experts (2 of 8), everything else in full.
    full = model_cost(model, mc)
    dense_elems = sum(p.numel() for n, p in model.named_parameters()
                      if p.dim() >= 2 and ".experts." not in n and "embed_tokens" not in n)
    assert full.flops_per_token == 2 * (dense_elems + len(moe) * 8 * 3 * 64 * 32 * 2 // 8)
