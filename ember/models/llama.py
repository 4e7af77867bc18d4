"""Llama (``LlamaForCausalLM``): Llama 2/3/3.x, SmolLM2, DeepSeek-R1-Distill-Llama.

Architecture as in HF transformers' ``modeling_llama``: pre-norm decoder layers
of GQA self-attention with RoPE and a SwiGLU MLP, RMSNorm, optional tied LM head.
"""

from __future__ import annotations


import torch
from torch import nn

from ember.layers.attention import Attention, AttentionBackend, ForwardContext, KVCacheSpec, standard_kv_cache_spec
from ember.layers.layernorm import PreNormInput, block_residual
from ember.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ember.layers.rotary import get_rope, rope_parameters
from ember.distributed.parallel_state import get_tp_size
from ember.models.utils import CausalLM, DecoderStack, PreNormDecoderLayer


class LlamaMLP(nn.Module):
    takes_prenorm_input = True  # the gate_up projection folds the norm in (PreNormDecoderLayer)

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor | PreNormInput) -> torch.Tensor:
        """[n, hidden] -> [n, hidden]; given a PreNormInput, its stream is added (see PreNormDecoderLayer)."""
        return self.down_proj(self.gate_up_proj.forward_silu_and_mul(x), block_residual(x))


class LlamaAttention(nn.Module):
    takes_prenorm_input = True  # the qkv projection folds the norm in (PreNormDecoderLayer)

    def __init__(self, config, layer_idx: int, attn_backend: type[AttentionBackend],
                 qkv_bias: bool, o_bias: bool) -> None:
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
                                          self.total_num_kv_heads, bias=qkv_bias)
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        rope_theta, rope_scaling = rope_parameters(config)
        self.rotary_emb = get_rope(self.head_dim, self.head_dim, config.max_position_embeddings,
                                   rope_theta, rope_scaling)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              layer_idx, attn_backend, rotary_emb=self.rotary_emb)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor | PreNormInput,
                ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # RoPE is applied in the attention layer. Given a PreNormInput, its stream is added (PreNormDecoderLayer).
        return self.o_proj(self.attn(q, k, v, ctx), block_residual(hidden_states))


class LlamaDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config, layer_idx: int, attn_backend: type[AttentionBackend],
                 qkv_bias: bool, o_bias: bool) -> None:
        super().__init__(LlamaAttention(config, layer_idx, attn_backend, qkv_bias, o_bias),
                         LlamaMLP(config.hidden_size, config.intermediate_size, bias=getattr(config, "mlp_bias", False)),
                         config.hidden_size, config.rms_norm_eps)


class LlamaModel(DecoderStack):
    def __init__(self, config, attn_backend: type[AttentionBackend], qkv_bias: bool, o_bias: bool) -> None:
        super().__init__(config, lambda i: LlamaDecoderLayer(config, i, attn_backend, qkv_bias, o_bias))


class LlamaForCausalLM(CausalLM):
    """Llama causal LM.

    Args:
        config: HF-style config (``LlamaConfig`` fields).
        attn_backend: attention backend class chosen at start-up.
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

    def __init__(self, config, attn_backend: type[AttentionBackend]) -> None:
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False)
        o_bias = getattr(config, "attention_bias", False)
        super().__init__(config, lambda: LlamaModel(config, attn_backend, qkv_bias, o_bias))

    @classmethod
    def kv_cache_spec(cls, config, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        """Per-layer K/V cache layout (see ``ember.layers.attention.backend``)."""
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return standard_kv_cache_spec(config.num_hidden_layers, block_size, max(1, num_kv_heads // get_tp_size()),
                                      head_dim, dtype)
