"""Helpers shared by model files: the pre-norm decoder layer and stack every
supported family uses, and HF checkpoint names -> Ember parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ember.layers.attention import ForwardContext
from ember.layers.layernorm import RMSNorm
from ember.layers.quantization.base import QuantizationConfig
from ember.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding


class PreNormDecoderLayer(nn.Module):
    """``h = h + attn(norm(h)); h = h + mlp(norm(h))`` (Llama, Qwen2/3,
    DeepSeek-V3 blocks). Parameter names follow HF checkpoints: ``self_attn``,
    ``mlp``, ``input_layernorm``, ``post_attention_layernorm``.

    The residual stream travels as ``(hidden, residual)``, whose sum it is
    (``residual`` None: ``hidden`` is the whole stream); each add is done by
    the RMSNorm that follows it (``norm(hidden, residual)``).

    Args:
        self_attn: ``(positions, hidden [n, hidden], ctx) -> [n, hidden]``.
        mlp: ``[n, hidden] -> [n, hidden]`` (dense SwiGLU or an MoE block).
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states``, ``residual``: [num_tokens, hidden] -> the stream
        after the layer, as ``(hidden, residual)``."""
        if residual is None:
            hidden_states, residual = self.input_layernorm(hidden_states), hidden_states
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, ctx)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DecoderStack(nn.Module):
    """Token embedding, decoder layers, final norm (HF's ``model.`` submodule).

    Args:
        config: HF config (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``rms_norm_eps``).
        make_layer: ``(layer_idx, prefix) -> decoder layer`` (prefix: ``{prefix}.layers.{i}``).
        quant_config: the model's quantization config, or None.
        prefix: the stack's checkpoint name (``model``).
    """

    def __init__(self, config, make_layer: Callable[[int, str], nn.Module],
                 quant_config: QuantizationConfig | None = None, prefix: str = "model") -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(make_layer(i, f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``input_ids``, ``positions``: [num_tokens] int64 -> [num_tokens, hidden]."""
        hidden_states, residual = self.embed_tokens(input_ids), None
        ctx.positions = positions  # for the attention layers' RoPE
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, ctx)
        if residual is None:
            return self.norm(hidden_states)
        return self.norm(hidden_states, residual)[0]


class CausalLM(nn.Module):
    """A decoder stack and its LM head: ``forward`` returns final hidden states,
    ``compute_logits`` projects the rows that need sampling, ``load_weights``
    copies an HF checkpoint in. Subclasses add ``kv_cache_spec`` and set
    ``stacked_params_mapping``, ``expert_params_mapping`` and ``skip_weight``
    where their checkpoints need them.

    Args:
        config: HF config (``vocab_size``, ``hidden_size``, ``tie_word_embeddings``).
        build_model: ``prefix -> decoder stack`` (called with ``"model"`` after
            ``self.config`` is set).
        quant_config: the model's quantization config, or None.
    """

    # Checkpoint projections stacked into one parameter (see load_hf_weights).
    stacked_params_mapping: StackedMapping = ()

    def __init__(self, config, build_model: Callable[[str], DecoderStack],
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.model = build_model("model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                      prefix="lm_head")
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``input_ids``, ``positions``: [num_tokens] int64 -> [num_tokens, hidden]."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32."""
        return self.lm_head(hidden_states)

    def expert_params_mapping(self) -> ExpertMapping:
        """Checkpoint expert weights -> FusedMoE parameters (none for dense models)."""
        return ()

    def skip_weight(self, name: str) -> bool:
        """Checkpoint tensors that are not parameters: rotary buffers, and the
        LM head when it is tied to the embedding."""
        tied = getattr(self.config, "tie_word_embeddings", False)
        return "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into the parameters.

        Returns:
            Names of the parameters that were loaded.
        Raises:
            ValueError: an unexpected weight name or a shape mismatch.
        """
        return load_hf_weights(self, weights, self.stacked_params_mapping, self.expert_params_mapping(),
                               skip=self.skip_weight)


# (Ember param fragment, checkpoint fragment, shard id), e.g. ("qkv_proj", "q_proj", "q").
StackedMapping = Sequence[tuple[str, str, str | int]]
# (Ember param suffix, checkpoint suffix, expert id, shard id), see FusedMoE.make_expert_params_mapping.
ExpertMapping = Sequence[tuple[str, str, int | None, str]]


def _resolve(name: str, stacked: StackedMapping, experts: dict[str, tuple[str, int | None, str]]
             ) -> tuple[str, tuple[str | int | None, ...]]:
    """Target parameter name and extra weight_loader arguments of one checkpoint name."""
    parts = name.split(".")
    for i in range(1, len(parts)):  # expert suffixes by dict lookup: checkpoints hold ~10^5 expert tensors
        suffix = ".".join(parts[i:])
        if suffix in experts:
            param_suffix, expert_id, shard_id = experts[suffix]
            return ".".join(parts[:i] + [param_suffix]), (shard_id, expert_id)
    for param_name, weight_name, shard_id in stacked:
        if f".{weight_name}." in name:
            return name.replace(f".{weight_name}.", f".{param_name}."), (shard_id,)
    return name, ()


def load_hf_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    stacked_params_mapping: StackedMapping = (), expert_params_mapping: ExpertMapping = (),
                    skip: Callable[[str], bool] = lambda name: False) -> set[str]:
    """Copy HF-named checkpoint tensors into ``model``'s parameters.

    Each tensor goes through the parameter's own ``weight_loader`` attribute
    if it has one (set by a quantization method), else the ``weight_loader`` of
    the module owning it when that module has one (stacked / sharded / expert
    layouts), else it is copied as is.

    Args:
        stacked_params_mapping: checkpoint projections stacked into one parameter.
        expert_params_mapping: per-expert checkpoint weights stacked into FusedMoE's.
        skip: checkpoint names to ignore (e.g. rotary buffers, tied heads, MTP layers).
    Returns:
        Names of the parameters that were loaded.
    Raises:
        ValueError: an unexpected weight name or a shape mismatch.
    """
    params = dict(model.named_parameters())
    experts = {w: (p, e, s) for p, w, e, s in expert_params_mapping}
    loaded: set[str] = set()
    for name, tensor in weights:
        if skip(name):
            continue
        target, extra = _resolve(name, stacked_params_mapping, experts)
        if target not in params:
            raise ValueError(f"checkpoint weight {name!r} has no matching parameter in {type(model).__name__}")
        param = params[target]
        owner = model.get_submodule(target.rsplit(".", 1)[0])
        loader = getattr(param, "weight_loader", None) or getattr(owner, "weight_loader", None)
        if loader is not None:
            loader(param, tensor, *extra)
        else:
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match {tuple(param.shape)}")
            param.data.copy_(tensor)
        loaded.add(target)
    return loaded
