"""Qwen3 (``Qwen3ForCausalLM``): dense Qwen3 models.

As HF transformers' ``modeling_qwen3``: the Llama layer stack with an explicit
``head_dim`` (not ``hidden_size / num_heads``), no Q/K/V bias, and an RMSNorm
over each query and key head (``q_norm`` / ``k_norm``, weights ``[head_dim]``)
applied before RoPE (Qwen team, 2025, "Qwen3 Technical Report", section 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ember.distributed.parallel_state import get_tp_size
from ember.layers.attention import Attention, AttentionBackend, ForwardContext, KVCacheSpec, QKVAttention
from ember.layers.layernorm import RMSNorm
from ember.layers.linear import QKVParallelLinear, RowParallelLinear
from ember.layers.mlp import GatedMLP
from ember.layers.quantization.base import QuantizationConfig
from ember.layers.rotary import get_rope, rope_parameters
from ember.models.llama import LlamaForCausalLM
from ember.models.utils import CausalLM, DecoderStack, PreNormDecoderLayer


class Qwen3Attention(QKVAttention):
    """GQA self-attention with a per-head RMSNorm of q and k before RoPE."""

    def __init__(self, config, layer_idx: int, attn_backend: type[AttentionBackend],
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        tp = get_tp_size()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.num_heads, self.num_kv_heads = total_heads // tp, max(1, total_kv_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads, bias=bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        rope_theta, rope_scaling = rope_parameters(config)
        self.rotary_emb = get_rope(self.head_dim, self.head_dim, config.max_position_embeddings, rope_theta,
                                   rope_scaling)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              layer_idx, attn_backend, rotary_emb=self.rotary_emb)

    def attend(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        n = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim))  # per-head norm, before RoPE
        k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim))
        return self.attn(q.reshape(n, -1), k.reshape(n, -1), v, ctx)  # RoPE is applied in the attention layer


class Qwen3DecoderLayer(PreNormDecoderLayer):
    """Pre-norm block with any MLP module (dense SwiGLU, or an MoE block for Qwen3-MoE)."""

    def __init__(self, config, layer_idx: int, attn_backend: type[AttentionBackend], mlp: nn.Module,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(Qwen3Attention(config, layer_idx, attn_backend, quant_config, f"{prefix}.self_attn"), mlp,
                         config.hidden_size, config.rms_norm_eps)


class Qwen3Model(DecoderStack):
    """Embedding, decoder layers, final norm.

    Args:
        make_mlp: ``(layer_idx, prefix) -> MLP module`` of that layer.
    """

    def __init__(self, config, attn_backend: type[AttentionBackend], make_mlp: Callable[[int, str], nn.Module],
                 quant_config: QuantizationConfig | None = None, prefix: str = "model") -> None:
        super().__init__(config, lambda i, p: Qwen3DecoderLayer(config, i, attn_backend, make_mlp(i, f"{p}.mlp"),
                                                                quant_config, p), quant_config, prefix)


class Qwen3ForCausalLM(CausalLM):
    """Qwen3 causal LM.

    Args:
        config: HF ``Qwen3Config``.
        attn_backend: attention backend class chosen at start-up.
        quant_config: the model's quantization config, or None.
    """

    stacked_params_mapping = LlamaForCausalLM.stacked_params_mapping

    def __init__(self, config, attn_backend: type[AttentionBackend],
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__(config, lambda p: Qwen3Model(config, attn_backend, self.make_mlp, quant_config, p),
                         quant_config)

    def make_mlp(self, layer_idx: int, prefix: str) -> nn.Module:
        """The MLP of layer ``layer_idx`` (dense SwiGLU for Qwen3), checkpoint name ``prefix``."""
        return GatedMLP(self.config.hidden_size, self.config.intermediate_size, quant_config=self.quant_config,
                        prefix=prefix)

    @classmethod
    def kv_cache_spec(cls, config, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        """Standard per-layer K/V layout with the explicit ``head_dim``."""
        return LlamaForCausalLM.kv_cache_spec(config, block_size, dtype)
