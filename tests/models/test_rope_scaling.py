"""RoPE scaling recipes vs HF transformers' ``ROPE_INIT_FUNCTIONS``, and tiny
Llama (llama3 / linear / dynamic scaling) and Qwen2 (YaRN) models vs HF."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ember.layers.rotary import (RotaryEmbedding, rope_context_len, rope_inv_freq, rope_parameters,
                                 rope_softmax_scale_factor)
from tests.models.tiny import check_model_vs_hf, check_prefill_logits, ember_llm, make_prompts, randomize_norms_, save_tiny

_SMALL = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=128)
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
QWEN_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32)

CONFIGS = {
    "llama3": LlamaConfig(**_SMALL, rope_parameters=dict(LLAMA3)),
    "linear": LlamaConfig(**_SMALL, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    "dynamic": LlamaConfig(**_SMALL, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    "yarn": Qwen2Config(**_SMALL, rope_parameters=dict(QWEN_YARN)),
    "yarn-legacy-rope_scaling": Qwen2Config(**_SMALL, rope_scaling=dict(type="yarn", factor=4.0,
                                                                         original_max_position_embeddings=32)),
    "yarn-deepseek-mscale": DeepseekV3Config(**_SMALL, qk_rope_head_dim=16, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=64, mscale=1.0,
        mscale_all_dim=0.7, beta_fast=32, beta_slow=1)),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_inv_freq_and_attention_factor_match_hf(name):
    config = CONFIGS[name]
    theta, scaling = rope_parameters(config)
    ref_inv_freq, ref_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq, factor = rope_inv_freq(theta, dim, scaling, config.max_position_embeddings)
    torch.testing.assert_close(inv_freq, ref_inv_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


def test_deepseek_softmax_scale_factor():
    """HF yarn_apply_mscale: scale * mscale(factor, mscale_all_dim) ** 2."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    config = CONFIGS["yarn-deepseek-mscale"]
    _, scaling = rope_parameters(config)
    assert rope_softmax_scale_factor(scaling) == pytest.approx(yarn_apply_mscale(config.rope_parameters, 1.0))
    assert rope_softmax_scale_factor({}) == 1.0


def test_interleaved_rotation_matches_hf():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    torch.manual_seed(0)
    rope = RotaryEmbedding(8, 8, 64, 10000.0, is_neox_style=False)
    pos = torch.arange(10)
    q, k = torch.randn(10, 3, 8), torch.randn(10, 1, 8)
    ours_q, ours_k = rope(pos, q, k)
    cos, sin = rope.cos_sin_cache[pos].chunk(2, dim=-1)
    ref_q, ref_k = apply_rotary_pos_emb_interleave(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1),
                                                   unsqueeze_dim=1)
    torch.testing.assert_close(ours_q, ref_q)
    torch.testing.assert_close(ours_k, ref_k)


def _tiny(cls, config_cls, rope: dict, max_position_embeddings: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    config = config_cls(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                        initializer_range=0.2, rope_parameters=dict(rope))
    model = cls(config)
    randomize_norms_(model, seed)
    return model


@pytest.mark.parametrize("family", ["llama3", "qwen2-yarn"])
def test_scaled_rope_models_match_hf(tmp_path, family):
    if family == "llama3":
        hf = _tiny(LlamaForCausalLM, LlamaConfig, LLAMA3)
    else:
        # As Qwen2.5's long-context recipe: max_position_embeddings == original (32
        # here), YaRN x4 serves 128 positions; prompts + 32 new tokens pass 32.
        hf = _tiny(Qwen2ForCausalLM, Qwen2Config, QWEN_YARN, max_position_embeddings=32)
    path = save_tiny(hf, tmp_path)
    check_model_vs_hf(hf, path)
    if family != "llama3":
        assert ember_llm(path).llm_engine.model_config.max_model_len == 128


def test_context_len():
    assert rope_context_len(Qwen2Config(max_position_embeddings=32768, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32768))) == 131072
    assert rope_context_len(CONFIGS["yarn-deepseek-mscale"]) == 64 * 40
    assert rope_context_len(CONFIGS["llama3"]) == 128 and rope_context_len(CONFIGS["dynamic"]) == 128


@pytest.mark.parametrize("rope", [dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
                                  dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)],
                         ids=["linear", "dynamic"])
def test_llama_linear_dynamic_prefill(tmp_path, rope):
    hf = _tiny(LlamaForCausalLM, LlamaConfig, rope)
    check_prefill_logits(ember_llm(save_tiny(hf, tmp_path)), hf, make_prompts())


def test_unsupported_rope_type_is_named():
    with pytest.raises(NotImplementedError, match="longrope"):
        rope_inv_freq(10000.0, 16, {"rope_type": "longrope"}, 128)
