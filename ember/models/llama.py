"""Llama (``LlamaForCausalLM``): Llama 2/3/3.x, SmolLM2, DeepSeek-R1-Distill-Llama.

Architecture as in HF transformers' ``modeling_llama``: pre-norm decoder layers
of GQA self-attention with RoPE and a SwiGLU MLP, RMSNorm, optional tied LM head.
"""

from __future__ import annotations

import torch

from ember.distributed.parallel_state import get_tp_size
from ember.layers.attention import (Attention, AttentionBackend, ForwardContext, KVCacheSpec, QKVAttention,
                                    standard_kv_cache_spec)
from ember.layers.linear import QKVParallelLinear, RowParallelLinear
from ember.layers.mlp import GatedMLP
from ember.layers.quantization.base import QuantizationConfig
from ember.layers.rotary import get_rope, rope_parameters
from ember.models.utils import CausalLM, DecoderStack, PreNormDecoderLayer


class LlamaAttention(QKVAttention):
    """GQA self-attention: ``o_proj(attention(rope(q), rope(k), v))`` of ``qkv_proj(h)``."""

    def __init__(self, config, layer_idx: int, attn_backend: type[AttentionBackend], qkv_bias: bool, o_bias: bool,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        tp = get_tp_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = getattr(config, "num_key_value_heads", None) or self.total_num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.total_num_heads
        self.num_heads = self.total_num_heads // tp
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.total_num_heads,
                                          self.total_num_kv_heads, bias=qkv_bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim, config.hidden_size, bias=o_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        rope_theta, rope_scaling = rope_parameters(config)
        self.rotary_emb = get_rope(self.head_dim, self.head_dim, config.max_position_embeddings,
                                   rope_theta, rope_scaling)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              layer_idx, attn_backend, rotary_emb=self.rotary_emb)

    def attend(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.attn(q, k, v, ctx)  # RoPE is applied in the attention layer


class LlamaDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config, layer_idx: int, attn_backend: type[AttentionBackend], qkv_bias: bool, o_bias: bool,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        attn = LlamaAttention(config, layer_idx, attn_backend, qkv_bias, o_bias, quant_config, f"{prefix}.self_attn")
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=getattr(config, "mlp_bias", False),
                       quant_config=quant_config, prefix=f"{prefix}.mlp")
        super().__init__(attn, mlp, config.hidden_size, config.rms_norm_eps)


class LlamaModel(DecoderStack):
    def __init__(self, config, attn_backend: type[AttentionBackend], qkv_bias: bool, o_bias: bool,
                 quant_config: QuantizationConfig | None = None, prefix: str = "model") -> None:
        super().__init__(config, lambda i, p: LlamaDecoderLayer(config, i, attn_backend, qkv_bias, o_bias,
                                                                quant_config, p), quant_config, prefix)


class LlamaForCausalLM(CausalLM):
    """Llama causal LM.

    Args:
        config: HF-style config (``LlamaConfig`` fields).
        attn_backend: attention backend class chosen at start-up.
        quant_config: the model's quantization config, or None.
    """

    qkv_bias = False
    # HF name of a checkpoint weight -> (Ember parameter, shard id) for stacked params.
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, config, attn_backend: type[AttentionBackend],
                 quant_config: QuantizationConfig | None = None) -> None:
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False)
        o_bias = getattr(config, "attention_bias", False)
        super().__init__(config, lambda p: LlamaModel(config, attn_backend, qkv_bias, o_bias, quant_config, p),
                         quant_config)

    @classmethod
    def kv_cache_spec(cls, config, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        """Per-layer K/V cache layout (see ``ember.layers.attention.backend``)."""
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return standard_kv_cache_spec(config.num_hidden_layers, block_size, max(1, num_kv_heads // get_tp_size()),
                                      head_dim, dtype)
