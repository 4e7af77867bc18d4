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
from ember.layers.attention import Attention, AttentionBackend, ForwardContext, KVCacheSpec
from ember.layers.layernorm import PreNormInput, RMSNorm, block_residual
from ember.layers.linear import QKVParallelLinear, RowParallelLinear
from ember.layers.rotary import get_rope, rope_parameters
from ember.models.llama import LlamaForCausalLM, LlamaMLP
from ember.models.utils import CausalLM, DecoderStack, PreNormDecoderLayer


class Qwen3Attention(nn.Module):
    takes_prenorm_input = True  # the qkv projection folds the norm in (PreNormDecoderLayer)

    def __init__(self, config, layer_idx: int, attn_backend: type[AttentionBackend]) -> None:
        super().__init__()
        tp = get_tp_size()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.num_heads, self.num_kv_heads = total_heads // tp, max(1, total_kv_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads, bias=bias)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        rope_theta, rope_scaling = rope_parameters(config)
        self.rotary_emb = get_rope(self.head_dim, self.head_dim, config.max_position_embeddings, rope_theta,
                                   rope_scaling)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              layer_idx, attn_backend, rotary_emb=self.rotary_emb)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor | PreNormInput,
                ctx: ForwardContext) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]; given a PreNormInput, its
        stream is added (see PreNormDecoderLayer)."""
        qkv = self.qkv_proj(hidden_states)
        n = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim))  # per-head norm, before RoPE
        k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim))
        # RoPE is applied in the attention layer.
        return self.o_proj(self.attn(q.reshape(n, -1), k.reshape(n, -1), v, ctx), block_residual(hidden_states))


class Qwen3DecoderLayer(PreNormDecoderLayer):
    """Pre-norm block with any MLP module (dense SwiGLU, or an MoE block for Qwen3-MoE)."""

    def __init__(self, config, layer_idx: int, attn_backend: type[AttentionBackend], mlp: nn.Module) -> None:
        super().__init__(Qwen3Attention(config, layer_idx, attn_backend), mlp, config.hidden_size, config.rms_norm_eps)


class Qwen3Model(DecoderStack):
    """Embedding, decoder layers, final norm.

    Args:
        make_mlp: ``layer_idx -> MLP module`` of that layer.
    """

    def __init__(self, config, attn_backend: type[AttentionBackend], make_mlp: Callable[[int], nn.Module]) -> None:
        super().__init__(config, lambda i: Qwen3DecoderLayer(config, i, attn_backend, make_mlp(i)))


class Qwen3ForCausalLM(CausalLM):
    """Qwen3 causal LM.

    Args:
        config: HF ``Qwen3Config``.
        attn_backend: attention backend class chosen at start-up.
    """

    stacked_params_mapping = LlamaForCausalLM.stacked_params_mapping

    def __init__(self, config, attn_backend: type[AttentionBackend]) -> None:
        super().__init__(config, lambda: Qwen3Model(config, attn_backend, self.make_mlp))

    def make_mlp(self, layer_idx: int) -> nn.Module:
        """The MLP of layer ``layer_idx`` (dense SwiGLU for Qwen3)."""
        return LlamaMLP(self.config.hidden_size, self.config.intermediate_size)

    @classmethod
    def kv_cache_spec(cls, config, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        """Standard per-layer K/V layout with the explicit ``head_dim``."""
        return LlamaForCausalLM.kv_cache_spec(config, block_size, dtype)
