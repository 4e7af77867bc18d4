"""DeepSeek-V3 / R1 (``DeepseekV3ForCausalLM``).

As HF transformers' ``modeling_deepseek_v3`` (DeepSeek-AI, 2024, "DeepSeek-V3
Technical Report"):

- multi-head latent attention (MLA): queries through a low-rank
  ``q_a_proj -> q_a_layernorm -> q_b_proj`` (or a plain ``q_proj`` when
  ``q_lora_rank`` is None), keys/values compressed to a ``kv_lora_rank``
  latent plus a shared ``qk_rope_head_dim`` rotary key; only those are cached
  (see ``ember.layers.attention.mla``);
- RoPE on the rotary parts only, interleaved pairs when ``rope_interleave``,
  YaRN scaling whose ``mscale_all_dim`` also multiplies the softmax scale;
- MoE from layer ``first_k_dense_replace`` on: sigmoid group-limited top-k
  routing with ``e_score_correction_bias`` and ``routed_scaling_factor``, plus
  ``n_shared_experts`` always-on experts; earlier layers are dense.

With data-parallel attention (``--enable-dp-attention``, see
:mod:`ember.distributed.dp_attention`) the attention projections are
replicated, each rank attends only its own requests' rows with all heads,
and the MLP / MoE layers run tensor-parallel over the rows of every rank.

Multi-token-prediction layers (``model.layers.{num_hidden_layers}..``, the MTP
module) are skipped when loading the target; the speculative proposer of
method ``"mtp"`` loads them (:mod:`ember.models.deepseek_mtp`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ember.distributed.parallel_state import get_tp_size, is_dp_attention
from ember.layers.attention import AttentionBackend, ForwardContext, KVCacheSpec
from ember.layers.attention.mla import MLAAttention, mla_kv_cache_spec
from ember.layers.layernorm import RMSNorm
from ember.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from ember.layers.mlp import GatedMLP
from ember.layers.moe import FusedMoE, GroupedTopKRouter
from ember.layers.quantization.base import QuantizationConfig, dense_weight
from ember.layers.rotary import get_rope, rope_parameters, rope_softmax_scale_factor
from ember.models.utils import CausalLM, DecoderStack, ExpertMapping, IntermediateTensors, PreNormDecoderLayer

# NOTE: HF builds q_a_layernorm / kv_a_layernorm with RMSNorm's default eps,
# not config.rms_norm_eps (equal in released configs).
_LATENT_NORM_EPS = 1e-6
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekV3Attention(nn.Module):
    """MLA projections around :class:`MLAAttention`: heads split over the
    tensor-parallel ranks, or all heads on every rank (replicated weights)
    with data-parallel attention."""

    def __init__(self, config, layer_idx: int, attn_backend: type[AttentionBackend],
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        q = quant_config
        total_heads = config.num_attention_heads
        dp = is_dp_attention()
        self.num_heads = total_heads if dp else total_heads // get_tp_size()
        column = ReplicatedLinear if dp else ColumnParallelLinear
        row = ReplicatedLinear if dp else RowParallelLinear
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        qk_head_dim = self.nope_dim + self.rope_dim
        hidden, bias = config.hidden_size, getattr(config, "attention_bias", False)
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is not None:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=bias, quant_config=q,
                                             prefix=f"{prefix}.q_a_proj")
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = column(self.q_lora_rank, total_heads * qk_head_dim, quant_config=q,
                                                 prefix=f"{prefix}.q_b_proj")
        else:
            self.q_proj = column(hidden, total_heads * qk_head_dim, quant_config=q,
                                               prefix=f"{prefix}.q_proj")
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias,
                                                   quant_config=q, prefix=f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, _LATENT_NORM_EPS)
        # NOTE: its weight stays dense in the model dtype: the absorbed MLA decode
        # reads it directly (as W_UK / W_UV); a quantized checkpoint's is dequantized once at load.
        self.kv_b_proj = column(self.kv_lora_rank, total_heads * (self.nope_dim + config.v_head_dim),
                                              quant_config=dense_weight(q), prefix=f"{prefix}.kv_b_proj")
        self.o_proj = row(total_heads * config.v_head_dim, hidden, bias=bias, quant_config=q,
                                        prefix=f"{prefix}.o_proj")
        rope_theta, rope_scaling = rope_parameters(config)
        self.rotary_emb = get_rope(self.rope_dim, self.rope_dim, config.max_position_embeddings, rope_theta,
                                   rope_scaling, is_neox_style=not getattr(config, "rope_interleave", True))
        scale = qk_head_dim ** -0.5 * rope_softmax_scale_factor(rope_scaling)
        self.mla_attn = MLAAttention(self.num_heads, self.nope_dim, self.rope_dim, config.v_head_dim,
                                     self.kv_lora_rank, scale, layer_idx, attn_backend)

    def _query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, num_heads * (qk_nope_head_dim + qk_rope_head_dim)]."""
        if self.q_lora_rank is None:
            return self.q_proj(hidden_states)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        n = hidden_states.shape[0]
        q = self._query(hidden_states).view(n, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv_c, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_c = self.kv_a_layernorm(kv_c)
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe)
        out = self.mla_attn(q_nope, q_pe, kv_c, k_pe, self.kv_b_proj.weight, ctx)
        return self.o_proj(out)


class DeepseekV3MoE(nn.Module):
    """Router (HF ``mlp.gate``), routed experts (``mlp.experts.{e}.*``) and
    shared experts (``mlp.shared_experts``, one SwiGLU MLP of
    ``n_shared_experts * moe_intermediate_size``)."""

    def __init__(self, config, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.gate = GroupedTopKRouter(
            config.hidden_size, config.n_routed_experts, config.num_experts_per_tok,
            renormalize=config.norm_topk_prob, num_expert_group=config.n_group or 1,
            topk_group=config.topk_group or 1, routed_scaling_factor=config.routed_scaling_factor)
        self.experts = FusedMoE(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
                                quant_config=quant_config, prefix=f"{prefix}.experts")
        self.shared_experts = (GatedMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                        quant_config=quant_config, prefix=f"{prefix}.shared_experts")
                               if config.n_shared_experts else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        topk_weights, topk_ids = self.gate(hidden_states)
        out = self.experts(hidden_states, topk_weights, topk_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


def deepseek_v3_mlp(config, layer_idx: int, quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
    """The MLP of checkpoint layer ``layer_idx``: dense for the first ``first_k_dense_replace`` layers, MoE after.
    ``prefix``: ``model.layers.{layer_idx}.mlp``."""
    if layer_idx >= config.first_k_dense_replace:
        return DeepseekV3MoE(config, quant_config, prefix)
    return GatedMLP(config.hidden_size, config.intermediate_size, quant_config=quant_config, prefix=prefix)


class DeepseekV3DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config, layer_idx: int, attn_backend: type[AttentionBackend],
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(DeepseekV3Attention(config, layer_idx, attn_backend, quant_config, f"{prefix}.self_attn"),
                         deepseek_v3_mlp(config, layer_idx, quant_config, f"{prefix}.mlp"), config.hidden_size,
                         config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`PreNormDecoderLayer.forward`; with data-parallel attention
        (``ctx.dp_attention``) the rows are this rank's ([num_local, hidden])
        and the MLP runs on every rank's rows (gathered), keeping this rank's."""
        dp = ctx.dp_attention
        if dp is None:
            return super().forward(positions, hidden_states, residual, ctx)
        if not dp.num_local:  # no rows here: only the MLP's collectives
            return dp.local(self.mlp(dp.gather(hidden_states))), hidden_states if residual is None else residual
        hidden_states, residual = self.attention_block(positions, hidden_states, residual, ctx)
        return dp.local(self.mlp(dp.gather(hidden_states))), residual


class DeepseekV3Model(DecoderStack):
    def __init__(self, config, attn_backend: type[AttentionBackend],
                 quant_config: QuantizationConfig | None = None, prefix: str = "model") -> None:
        super().__init__(config, lambda i, p: DeepseekV3DecoderLayer(config, i, attn_backend, quant_config, p),
                         quant_config, prefix)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """As :meth:`DecoderStack.forward`; with data-parallel attention
        (``ctx.dp_attention``; one pipeline stage) every token is embedded,
        the layers run on this rank's rows and the final hidden states of
        every rank's rows are gathered: [num_tokens, hidden] on every rank."""
        dp = ctx.dp_attention
        if dp is None:
            return super().forward(input_ids, positions, ctx, intermediate_tensors)
        assert intermediate_tensors is None, "data-parallel attention runs one pipeline stage"
        ctx.positions = positions = dp.local(positions)
        # NOTE: the embedding's all-reduce needs the same rows on every rank.
        hidden_states, residual = dp.local(self.embed_tokens(input_ids)), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, ctx)
        if dp.num_local:
            hidden_states = self.norm(hidden_states, residual)[0]
        return dp.gather(hidden_states)


class DeepseekV3ForCausalLM(CausalLM):
    """DeepSeek-V3 / R1 causal LM.

    Args:
        config: HF ``DeepseekV3Config``.
        attn_backend: attention backend class chosen at start-up (its MLA sibling runs).
        quant_config: the model's quantization config, or None.
    """

    stacked_params_mapping = [("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]
    # Its model runs --enable-dp-attention (DeepseekV3Model.forward).
    supports_dp_attention = True

    def __init__(self, config, attn_backend: type[AttentionBackend],
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__(config, lambda p: DeepseekV3Model(config, attn_backend, quant_config, p), quant_config)

    @classmethod
    def kv_cache_spec(cls, config, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        """MLA's latent cache: ``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`` per layer."""
        return mla_kv_cache_spec(config.num_hidden_layers, block_size, config.kv_lora_rank,
                                 config.qk_rope_head_dim, dtype)

    def expert_params_mapping(self) -> ExpertMapping:
        return FusedMoE.make_expert_params_mapping(self.config.n_routed_experts)

    def skip_weight(self, name: str) -> bool:
        """Also the MTP layers past ``num_hidden_layers``."""
        layer = _LAYER_RE.match(name)
        if layer and int(layer.group(1)) >= self.config.num_hidden_layers:
            return True
        return super().skip_weight(name)

