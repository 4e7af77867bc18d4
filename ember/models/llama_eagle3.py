"""EAGLE-3 draft head for Llama targets (Li et al. 2025, "EAGLE-3: Scaling up
Inference Acceleration of Large Language Models via Training-Time Test",
arXiv:2503.01840), in the checkpoint layout of the published heads (e.g. the
head for Llama-3.1-8B-Instruct; config ``architectures``
``LlamaForCausalLMEagle3``).

Checkpoint (``H`` = ``hidden_size``, equal to the target's; ``V'`` =
``draft_vocab_size``, default the target's vocabulary):

- ``fc.weight`` [H, 3H]: fuses the target's residual stream at three depths
  (low, middle, high: entering layers 2, N // 2 and N - 3 of an N-layer
  target, or ``eagle_config.eagle_aux_hidden_state_layer_ids``);
- ``midlayer.*``: one Llama decoder layer whose q/k/v projections take 2H
  inputs, ``cat(input_layernorm(embed(token)), hidden_norm(h))``, with
  ``midlayer.hidden_norm.weight`` [H]; the residual is ``h``;
- ``norm.weight`` [H], ``lm_head.weight`` [V', H];
- ``d2t`` [V'] int64: draft id ``d`` is target id ``d + d2t[d]``; ``t2d``
  [V_target] bool (which target ids the draft vocabulary covers; unused);
- ``embed_tokens.weight`` [V_target, H] optional: without it the head uses
  the target's embedding.

One head position ``j`` reads token ``j + 1`` and a conditioning vector
``h``: ``fc(cat(low, mid, high))`` of the target at position ``j`` for
catch-up positions, the head's own output at ``j - 1`` for later proposals.
Its output is the residual stream after the layer (before ``norm``), which is
what the next proposal is conditioned on; ``compute_logits`` applies ``norm``
and the LM head, and spreads the ``V'`` draft logits over the target's
vocabulary (``-inf`` elsewhere).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ember.config import ConfigError
from ember.distributed.parallel_state import get_tp_size
from ember.layers.attention import (Attention, AttentionBackend, ForwardContext, KVCacheSpec, QKVAttention,
                                    standard_kv_cache_spec)
from ember.layers.layernorm import RMSNorm
from ember.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from ember.layers.mlp import GatedMLP
from ember.layers.quantization.base import QuantizationConfig
from ember.layers.rotary import get_rope, rope_parameters
from ember.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from ember.models.llama import LlamaAttention, LlamaForCausalLM
from ember.models.utils import load_hf_weights


def eagle3_target_layers(num_target_layers: int) -> tuple[int, int, int]:
    """The depths of an N-layer target's residual stream an EAGLE-3 head
    reads by default: entering layers 2, N // 2 and N - 3 (clamped to
    [0, N] for shallow targets)."""
    n = num_target_layers
    return tuple(min(max(d, 0), n) for d in (2, n // 2, n - 3))


def _draft_vocab_size(config) -> int:
    return getattr(config, "draft_vocab_size", None) or config.vocab_size


class Eagle3Attention(LlamaAttention):
    """Llama GQA attention whose q/k/v projections read ``2 * hidden_size``
    inputs (the normed embedding and the normed conditioning vector side by side)."""

    def __init__(self, config, attn_backend: type[AttentionBackend], quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        QKVAttention.__init__(self)
        tp = get_tp_size()
        h = config.hidden_size
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = getattr(config, "num_key_value_heads", None) or self.total_num_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.total_num_heads
        self.num_heads = self.total_num_heads // tp
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(2 * h, self.head_dim, self.total_num_heads, self.total_num_kv_heads,
                                          bias=False, quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim, h, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        rope_theta, rope_scaling = rope_parameters(config)
        self.rotary_emb = get_rope(self.head_dim, self.head_dim, config.max_position_embeddings,
                                   rope_theta, rope_scaling)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads, 0,
                              attn_backend, rotary_emb=self.rotary_emb)


class Eagle3MidLayer(nn.Module):
    """The head's decoder layer (checkpoint prefix ``midlayer``)."""

    def __init__(self, config, attn_backend: type[AttentionBackend], quant_config: QuantizationConfig | None,
                 prefix: str = "midlayer") -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.hidden_norm = RMSNorm(h, eps)
        self.self_attn = Eagle3Attention(config, attn_backend, quant_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = GatedMLP(h, config.intermediate_size, bias=getattr(config, "mlp_bias", False),
                            quant_config=quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """``embeds``, ``hidden``: [n, H] -> the stream after the layer, [n, H]."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        x = self.self_attn(positions, x, ctx)
        x, residual = self.post_attention_layernorm(x, hidden)
        return self.mlp(x) + residual


class Eagle3LlamaForCausalLM(nn.Module):
    """An EAGLE-3 head for a Llama target (see the module doc), as a draft
    model of :class:`~ember.spec_decode.hidden_states.HiddenStateProposer`.

    Args:
        config: the head's HF config (Llama fields, ``num_hidden_layers`` 1,
            ``draft_vocab_size``, optional ``target_hidden_size`` and
            ``eagle_config.eagle_aux_hidden_state_layer_ids``).
        attn_backend: attention backend class chosen at start-up.
        quant_config: a quantization config, or None.
    """

    stacked_params_mapping = LlamaForCausalLM.stacked_params_mapping  # the head's checkpoint uses Llama names

    def __init__(self, config, attn_backend: type[AttentionBackend],
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        target_h = getattr(config, "target_hidden_size", None) or h
        self.fc = ReplicatedLinear(3 * target_h, h, bias=False, quant_config=quant_config, prefix="fc")
        self.midlayer = Eagle3MidLayer(config, attn_backend, quant_config)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.draft_vocab_size = _draft_vocab_size(config)
        self.lm_head = ParallelLMHead(self.draft_vocab_size, h, quant_config=quant_config, prefix="lm_head")
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.int64), persistent=False)
        # The checkpoint's own embedding, if it has one (else the target's, see bind_target).
        self.embed_tokens: VocabParallelEmbedding | None = None
        self._target_embed: list[nn.Module] = []  # the target's, unregistered (not the head's parameter)
        self._target_ids: torch.Tensor | None = None  # [V'] int64, None when draft ids are target ids
        self.target_vocab_size = config.vocab_size
        self.hidden_in: torch.Tensor | None = None

    @classmethod
    def kv_cache_spec(cls, config, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        """One layer's K/V layout (see ``ember.layers.attention.backend``)."""
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return standard_kv_cache_spec(1, block_size, max(1, num_kv_heads // get_tp_size()), head_dim, dtype)

    # ------------------------------------------------------ proposer protocol
    def target_layers(self, target_config) -> tuple[int, ...]:
        """The target depths the head reads (the config's
        ``eagle_config.eagle_aux_hidden_state_layer_ids`` if given)."""
        eagle = getattr(self.config, "eagle_config", None) or {}
        ids = eagle.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle, dict) else None
        if ids:
            return tuple(int(i) for i in ids)
        return eagle3_target_layers(target_config.num_hidden_layers)

    def bind_target(self, target: nn.Module) -> None:
        """Take the target's token embedding when the checkpoint has none, and
        map draft ids to the target's vocabulary (``d2t``).

        Raises:
            ValueError: a ``d2t`` entry maps outside the target's vocabulary.
        """
        if self.embed_tokens is None:
            self._target_embed = [target.model.embed_tokens]
        self.target_vocab_size = target.config.vocab_size
        ids = torch.arange(self.draft_vocab_size, dtype=torch.int64, device=self.d2t.device) + self.d2t
        if self.draft_vocab_size == self.target_vocab_size and bool((self.d2t == 0).all()):
            self._target_ids = None
            return
        if bool(((ids < 0) | (ids >= self.target_vocab_size)).any()):
            raise ValueError(f"EAGLE-3 head d2t maps draft ids outside the target vocabulary "
                             f"({self.target_vocab_size} tokens)")
        self._target_ids = ids

    def allocate_condition(self, max_tokens: int) -> None:
        """The conditioning buffer [max_tokens, H] (fixed address, read by the
        head's CUDA graphs)."""
        w = self.fc.weight
        self.hidden_in = torch.zeros(max_tokens, self.config.hidden_size, dtype=w.dtype, device=w.device)

    def condition_target(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features of catch-up positions, [n, 3 * H] (low, mid,
        high side by side) -> the conditioning vectors, [n, H]."""
        return self.fc(features)

    def set_condition(self, x: torch.Tensor) -> None:
        """Conditioning vectors ([n, H]) of the next forward of ``n`` tokens."""
        self.hidden_in[: x.shape[0]].copy_(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = self.embed_tokens if self.embed_tokens is not None else self._target_embed[0]
        return embed(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``input_ids``, ``positions``: [n] int64, conditioned on the first n
        rows of the conditioning buffer -> the stream after the layer [n, H]
        (before ``norm``)."""
        ctx.positions = positions
        hidden = self.hidden_in[: input_ids.shape[0]]
        return self.midlayer(positions, self.embed(input_ids), hidden, ctx)

    def greedy_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, H] -> [n] int64: the target id of each row's most likely draft
        token (the argmax of :meth:`compute_logits`, without building the
        target-vocabulary rows)."""
        ids = self.lm_head(self.norm(hidden_states)).argmax(dim=-1)
        return ids if self._target_ids is None else self._target_ids[ids]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, H] -> [n, target vocab] float32 (``-inf`` at ids outside the draft vocabulary)."""
        logits = self.lm_head(self.norm(hidden_states)).float()
        if self._target_ids is None:
            return logits
        out = torch.full((logits.shape[0], self.target_vocab_size), float("-inf"), dtype=torch.float32,
                         device=logits.device)
        return out.index_copy_(1, self._target_ids, logits)

    # --------------------------------------------------------------- loading
    @staticmethod
    def _checkpoint_name(name: str) -> str:
        """Head checkpoint names without their optional ``model.`` prefix, the
        decoder layer as ``midlayer`` (some heads name it ``layers.0``)."""
        if name.startswith("model."):
            name = name[len("model."):]
        if name.startswith("layers.0."):
            name = "midlayer." + name[len("layers.0."):]
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy a head checkpoint in (see the module doc for the names).

        Returns:
            Names of the parameters that were loaded.
        Raises:
            ValueError: an unexpected weight name or a shape mismatch.
        """
        rest = []
        loaded: set[str] = set()
        for name, tensor in weights:
            name = self._checkpoint_name(name)
            if name == "d2t":
                if tensor.shape != self.d2t.shape:
                    raise ValueError(f"d2t: shape {tuple(tensor.shape)} does not match "
                                     f"draft_vocab_size {self.draft_vocab_size}")
                self.d2t.copy_(tensor.to(torch.int64))
            elif name == "t2d" or "rotary_emb.inv_freq" in name:
                continue
            elif name == "embed_tokens.weight":
                w = self.fc.weight
                if tensor.shape[1] != self.config.hidden_size:
                    raise ValueError(f"embed_tokens.weight: shape {tuple(tensor.shape)} does not match hidden_size "
                                     f"{self.config.hidden_size}")
                self.embed_tokens = VocabParallelEmbedding(tensor.shape[0], tensor.shape[1], dtype=w.dtype,
                                                           prefix="embed_tokens").to(w.device)
                self.embed_tokens.weight_loader(self.embed_tokens.weight, tensor)
                loaded.add("embed_tokens.weight")
            else:
                rest.append((name, tensor))
        return loaded | load_hf_weights(self, rest, self.stacked_params_mapping)


def eagle3_head_config(head: str, target: Any) -> Any:
    """The EAGLE-3 head's :class:`~ember.config.ModelConfig` for
    ``speculative_config.model``: the target's dtype, context length and
    seed, after checking the head fits the target.

    Raises:
        ConfigError: the head cannot be found or read, is not an EAGLE-3
            head, its hidden size (or ``target_hidden_size``) is not the
            target's, its vocabulary is larger than the target's, or its
            ``d2t`` maps outside the target's vocabulary (each naming
            ``speculative_config.model``).
    """
    from ember.config import ModelConfig
    from ember.loader import read_hf_config, resolve_model_source
    from ember.loader.base import ModelLoadError
    from ember.spec_decode.hidden_states import HEAD_ARCHITECTURES

    setting = f"speculative_config.model {head!r}"
    try:
        source = resolve_model_source(head)
        hf_config = read_hf_config(source)
    except (ModelLoadError, ValueError, OSError) as e:
        raise ConfigError(f"{setting}: {e}") from None
    archs = [a for a in (getattr(hf_config, "architectures", None) or []) if a in HEAD_ARCHITECTURES]
    if not archs:
        raise ConfigError(f"{setting}: not an EAGLE-3 head (architectures {getattr(hf_config, 'architectures', None)}"
                          f", expected one of {sorted(HEAD_ARCHITECTURES)})")
    t = target.hf_config
    for key, value in (("hidden_size", hf_config.hidden_size),
                       ("target_hidden_size", getattr(hf_config, "target_hidden_size", None))):
        if value is not None and value != t.hidden_size:
            raise ConfigError(f"{setting} has {key} {value}, the target {target.model!r} hidden_size "
                              f"{t.hidden_size}: an EAGLE-3 head must match the target's hidden size")
    hf_config = copy.copy(hf_config)
    hf_config.vocab_size = t.vocab_size  # the head's embedding (when it has one) and logits are the target's
    dv = _draft_vocab_size(hf_config)
    if dv > t.vocab_size:
        raise ConfigError(f"{setting} has draft_vocab_size {dv}, larger than the target's vocabulary "
                          f"({t.vocab_size})")
    d2t = _read_d2t(source)
    if d2t is not None:
        ids = torch.arange(d2t.numel(), dtype=torch.int64) + d2t.to(torch.int64)
        if d2t.numel() != dv or bool(((ids < 0) | (ids >= t.vocab_size)).any()):
            raise ConfigError(f"{setting}: its d2t ({d2t.numel()} entries for draft_vocab_size {dv}) maps draft ids "
                              f"outside the target's vocabulary ({t.vocab_size} tokens)")
    return ModelConfig(model=source.path, hf_config=hf_config, architecture=archs[0], dtype=target.dtype,
                       max_model_len=target.max_model_len, served_model_name=head, seed=target.seed,
                       enforce_eager=True, skip_tokenizer_init=True, attention_backend=target.attention_backend)


def _read_d2t(source: Any) -> torch.Tensor | None:
    """The head checkpoint's ``d2t`` tensor (safetensors files), or None."""
    from pathlib import Path

    path = Path(source.path)
    if not path.is_dir():
        return None
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in ("d2t", "model.d2t"):
                if name in st.keys():
                    return st.get_tensor(name)
    return None
