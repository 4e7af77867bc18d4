"""DeepSeek-V3 / R1 multi-token prediction (MTP) module, the speculative
proposer of that family (``speculative_config`` method ``"mtp"``).

DeepSeek-AI, 2024, "DeepSeek-V3 Technical Report", section 2.2: at depth 1,
position ``i`` combines the target's final (normed) hidden state ``h_i`` with
the embedding of the next token ``t_{i+1}``::

    h'_i = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i)))      # [n, 2H] -> [n, H]
    o_i  = decoder_layer(h'_i)                                   # MLA + MoE, its own KV cache
    logits_i = shared_head.head(shared_head.norm(o_i))           # predicts t_{i+2}

Proposing k > 1 tokens applies the one layer again, with its own output
``o_i`` (the residual stream, before ``shared_head.norm``) in place of the
target's hidden state and the token it proposed as ``t_{i+1}``.

Weights come from the target checkpoint: the MTP layer is stored as decoder
layer ``num_hidden_layers`` (``model.layers.{N}.enorm``, ``.hnorm``,
``.eh_proj`` [H, 2H], ``.shared_head.norm``, ``.shared_head.head``,
``.embed_tokens`` and the usual ``self_attn`` / ``mlp`` / layer norms). A
checkpoint without the layer's own ``embed_tokens`` (or ``shared_head.head``)
shares the target's ``model.embed_tokens`` (``lm_head``), as the report's
module does. Only the first MTP layer is used (released checkpoints have one,
``num_nextn_predict_layers`` = 1).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ember.layers.attention import AttentionBackend, ForwardContext, KVCacheSpec
from ember.layers.attention.mla import mla_kv_cache_spec
from ember.layers.layernorm import RMSNorm
from ember.layers.linear import ReplicatedLinear
from ember.layers.moe import FusedMoE
from ember.layers.quantization.base import QuantizationConfig
from ember.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from ember.models.deepseek_v3 import DeepseekV3Attention, DeepseekV3ForCausalLM, deepseek_v3_mlp
from ember.models.utils import PreNormDecoderLayer, load_hf_weights


def num_mtp_layers(hf_config) -> int:
    """``num_nextn_predict_layers`` of a DeepSeek-V3 config (0 when absent)."""
    return int(getattr(hf_config, "num_nextn_predict_layers", 0) or 0)


class SharedHead(nn.Module):
    """``shared_head.norm`` then ``shared_head.head``: [n, hidden] -> [n, vocab] float32."""

    def __init__(self, config, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                   prefix=f"{prefix}.head")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden_states))


class DeepseekV3MTPLayer(PreNormDecoderLayer):
    """One MTP layer: the DeepSeek-V3 decoder block (MLA attention over its
    own cache, the MoE block past ``first_k_dense_replace``) plus the MTP
    inputs (``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj``) and output
    head (``shared_head``). Parameter names are the checkpoint's under
    ``model.layers.{N}``.

    Args:
        config: HF ``DeepseekV3Config``.
        layer_idx: the checkpoint's layer index (``num_hidden_layers`` for the first MTP layer).
        cache_idx: the index of its KV cache in the MTP's cache list.
        attn_backend: attention backend class (its MLA sibling runs).
        quant_config: the model's quantization config, or None.
        prefix: ``model.layers.{layer_idx}``.
    """

    def __init__(self, config, layer_idx: int, cache_idx: int, attn_backend: type[AttentionBackend],
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(DeepseekV3Attention(config, cache_idx, attn_backend, quant_config, f"{prefix}.self_attn"),
                         deepseek_v3_mlp(config, layer_idx, quant_config, f"{prefix}.mlp"), config.hidden_size,
                         config.rms_norm_eps)
        hidden = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, quant_config=quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        # NOTE: unquantized in the model dtype (DeepSeek's FP8 checkpoints store it in BF16).
        self.eh_proj = ReplicatedLinear(2 * hidden, hidden, bias=False, prefix=f"{prefix}.eh_proj")
        self.shared_head = SharedHead(config, quant_config, f"{prefix}.shared_head")

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, previous_hidden: torch.Tensor,
             ctx: ForwardContext) -> torch.Tensor:
        """``input_ids`` [n] int64 (``t_{i+1}``), ``positions`` [n] int64 (``i``),
        ``previous_hidden`` [n, hidden] (``h_i``) -> the layer's output
        residual stream [n, hidden] (before ``shared_head.norm``)."""
        fused = torch.cat([self.enorm(self.embed_tokens(input_ids)), self.hnorm(previous_hidden)], dim=-1)
        hidden, residual = super().forward(positions, self.eh_proj(fused), None, ctx)
        return hidden + residual


class DeepseekV3MTP(nn.Module):
    """The MTP module of a DeepSeek-V3 checkpoint (its first MTP layer).

    Args:
        config: HF ``DeepseekV3Config`` with ``num_nextn_predict_layers`` >= 1.
        attn_backend: attention backend class chosen at start-up.
        quant_config: the target's quantization config, or None.

    Raises:
        ValueError: the config has no MTP layer.
    """

    stacked_params_mapping = DeepseekV3ForCausalLM.stacked_params_mapping

    def __init__(self, config, attn_backend: type[AttentionBackend],
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        if num_mtp_layers(config) < 1:
            raise ValueError("the DeepSeek-V3 config has no MTP layer (num_nextn_predict_layers is 0)")
        self.config = config
        self.layer_idx = config.num_hidden_layers
        # Named as the checkpoint: model.layers.{N}.*
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(self.layer_idx): DeepseekV3MTPLayer(
            config, self.layer_idx, 0, attn_backend, quant_config, f"model.layers.{self.layer_idx}")})
        self._condition: torch.Tensor | None = None  # see allocate_condition
        self._shared: set[str] = set()  # parameters loaded from the target's tensors

    @property
    def layer(self) -> DeepseekV3MTPLayer:
        return self.model.layers[str(self.layer_idx)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                previous_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """One MTP step (see the module docstring): ``input_ids``, ``positions``
        [num_tokens] int64 and ``previous_hidden`` [num_tokens, hidden] (the
        target's final hidden states, or this module's own outputs; None:
        the rows :meth:`set_condition` wrote) -> [num_tokens, hidden], the
        input of :meth:`compute_logits` and of the next step."""
        if previous_hidden is None:
            previous_hidden = self._condition[: input_ids.shape[0]]
        ctx.positions = positions
        return self.layer.step(input_ids, positions, previous_hidden, ctx)

    # The protocol of heads conditioned on the target's hidden states
    # (ember.spec_decode.hidden_states).
    def target_layers(self, target_hf_config) -> None:
        """None: the MTP layer reads the target's final normed hidden states."""
        return None

    def allocate_condition(self, max_tokens: int) -> None:
        """The input buffer of :meth:`set_condition` ([max_tokens, hidden],
        fixed address: CUDA graphs of :meth:`forward` read it)."""
        p = self.layer.hnorm.weight
        self._condition = torch.zeros(max_tokens, self.config.hidden_size, dtype=p.dtype, device=p.device)

    def condition_target(self, features: torch.Tensor) -> torch.Tensor:
        """The target's final hidden states are the MTP's input as they are."""
        return features

    def set_condition(self, x: torch.Tensor) -> None:
        """Copy ``x`` [n, hidden] into the rows the next forward of n tokens reads."""
        self._condition[: x.shape[0]].copy_(x)

    def bind_target(self, target: nn.Module) -> None:
        """Share the target's token embedding and LM head where the
        checkpoint's MTP layer has no copy of its own (instead of holding a
        copy of the target's tensor)."""
        layer = self.layer
        if f"{self._prefix}embed_tokens.weight" in self._shared:
            layer.embed_tokens = target.model.embed_tokens
        if f"{self._prefix}shared_head.head.weight" in self._shared and not isinstance(target.lm_head, nn.Identity):
            layer.shared_head.head = target.lm_head

    @property
    def _prefix(self) -> str:
        return f"model.layers.{self.layer_idx}."

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32."""
        return self.layer.shared_head(hidden_states)

    @classmethod
    def kv_cache_spec(cls, config, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        """One MLA latent cache: ``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]``."""
        return mla_kv_cache_spec(1, block_size, config.kv_lora_rank, config.qk_rope_head_dim, dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy the MTP layer's tensors out of the target checkpoint's
        (``model.layers.{N}.*``; every other tensor is ignored, except the
        target's ``model.embed_tokens.weight`` and ``lm_head.weight``, used
        when the layer has no copy of its own).

        Returns:
            Names of the parameters that were loaded.
        Raises:
            ValueError: an unexpected weight name or a shape mismatch.
        """
        prefix = self._prefix
        own_embed, own_head = f"{prefix}embed_tokens.weight", f"{prefix}shared_head.head.weight"
        shared: dict[str, torch.Tensor] = {}

        def mtp_weights():
            for name, tensor in weights:
                if name.startswith(prefix):
                    if "rotary_emb.inv_freq" not in name:
                        yield name, tensor
                elif name == "model.embed_tokens.weight":
                    shared[own_embed] = tensor
                elif name == "lm_head.weight":
                    shared[own_head] = tensor

        loaded = load_hf_weights(self, mtp_weights(), self.stacked_params_mapping,
                                 FusedMoE.make_expert_params_mapping(self.config.n_routed_experts))
        fallback = [(n, t) for n, t in shared.items() if n not in loaded]
        self._shared = {n for n, _ in fallback}
        return loaded | load_hf_weights(self, fallback)
