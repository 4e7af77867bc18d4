"""Helpers shared by model files: the pre-norm decoder layer and stack every
supported family uses, and HF checkpoint names -> Ember parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ember.layers.attention import ForwardContext
from ember.layers.layernorm import PreNormInput, RMSNorm, fold_norm_weight
from ember.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

class PreNormDecoderLayer(nn.Module):
    """``h += attn(norm(h)); h += mlp(norm(h))`` (Llama, Qwen2/3, DeepSeek-V3
    blocks). Parameter names follow HF checkpoints: ``self_attn``, ``mlp``,
    ``input_layernorm``, ``post_attention_layernorm``.

    The residual stream travels as ``(hidden, residual)``, whose sum it is
    (``residual`` None: ``hidden`` is the whole stream). A sub-module whose
    class sets ``takes_prenorm_input = True`` receives a
    :class:`~ember.layers.layernorm.PreNormInput` of the stream and returns the
    stream after its block (on decode steps on CUDA the norm is folded into its
    first GEMM and the residual add into its last). The others receive the
    normalized stream, and the add is fused into the next RMSNorm.

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
        hidden_states, residual = _residual_block(
            self.self_attn, self.input_layernorm, hidden_states, residual, lambda x: self.self_attn(positions, x, ctx),
            ctx, sumsq_for_next=False)
        # The next layer's qkv takes the stream's sums of squares when its input
        # norm's weight is in its weight (fold_input_norm_weights folds every
        # layer's alike, so this layer's flag stands for the next one's).
        return _residual_block(self.mlp, self.post_attention_layernorm, hidden_states, residual, self.mlp,
                               ctx, sumsq_for_next=self.input_layernorm.weight_in_next)


def _residual_block(module: nn.Module, norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None,
                    call: Callable, ctx: ForwardContext, sumsq_for_next: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pre-norm block ``h += module(norm(h))`` on the stream ``hidden + residual``.
    The stream's sums of squares, when the previous block's last GEMM returned
    them (``ctx.stream_sumsq``), go with it; with ``sumsq_for_next`` this
    block's last GEMM returns those of the stream after it, for the next block."""
    known, ctx.stream_sumsq = ctx.stream_sumsq, None
    sumsq = known[1] if known is not None and known[0] is hidden and residual is None else None
    inp = PreNormInput(hidden, norm, residual, sumsq, want_out_sumsq=sumsq_for_next)
    if getattr(module, "takes_prenorm_input", False):
        out = call(inp)
        if inp.out_sumsq is not None:
            ctx.stream_sumsq = (out, inp.out_sumsq)
        return out, None
    return call(inp.materialize()), inp.stream


def fold_input_norm_weights(model: nn.Module) -> int:
    """Multiply each pre-norm layer's input RMSNorm weight into its attention's
    qkv projection (:func:`~ember.layers.layernorm.fold_norm_weight`), where
    that projection takes the norm folded in (``takes_prenorm_input``) and
    holds plain 16-bit weights. Decode steps on CUDA then fold the norm into
    the qkv GEMM with the sums of squares the previous layer's down projection
    returned, at the cost of the plain GEMM (H200, two hosts: 14.3 and 15.6 us
    against 16.4 and 16.6 for the norm kernel and the GEMM). Called once, after
    the weights are loaded.

    Returns:
        How many layers were folded.
    """
    from ember.layers.linear import UnquantizedLinearMethod

    folded = 0
    for layer in model.modules():
        if not isinstance(layer, PreNormDecoderLayer) or not getattr(layer.self_attn, "takes_prenorm_input", False):
            continue
        qkv = getattr(layer.self_attn, "qkv_proj", None)
        if (qkv is not None and isinstance(qkv.quant_method, UnquantizedLinearMethod)
                and qkv.weight.dtype in (torch.bfloat16, torch.float16)
                and layer.input_layernorm.weight.dtype == qkv.weight.dtype):
            fold_norm_weight(layer.input_layernorm, qkv.weight)
            folded += 1
    return folded


class DecoderStack(nn.Module):
    """Token embedding, decoder layers, final norm (HF's ``model.`` submodule).

    Args:
        config: HF config (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``rms_norm_eps``).
        make_layer: ``layer_idx -> decoder layer``.
    """

    def __init__(self, config, make_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``input_ids``, ``positions``: [num_tokens] int64 -> [num_tokens, hidden]."""
        hidden_states, residual = self.embed_tokens(input_ids), None
        ctx.positions = positions  # for the attention layers' RoPE
        ctx.stream_sumsq = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, ctx)
        return PreNormInput(hidden_states, self.norm, residual).materialize()


class CausalLM(nn.Module):
    """A decoder stack and its LM head: ``forward`` returns final hidden states,
    ``compute_logits`` projects the rows that need sampling, ``load_weights``
    copies an HF checkpoint in. Subclasses add ``kv_cache_spec`` and set
    ``stacked_params_mapping``, ``expert_params_mapping`` and ``skip_weight``
    where their checkpoints need them.

    Args:
        config: HF config (``vocab_size``, ``hidden_size``, ``tie_word_embeddings``).
        build_model: builds the decoder stack (called after ``self.config`` is set).
    """

    # Checkpoint projections stacked into one parameter (see load_hf_weights).
    stacked_params_mapping: StackedMapping = ()

    def __init__(self, config, build_model: Callable[[], DecoderStack]) -> None:
        super().__init__()
        self.config = config
        self.model = build_model()
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
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

    Each tensor goes through the ``weight_loader`` of the module owning its
    parameter when that module has one (stacked / sharded / expert layouts),
    else it is copied as is.

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
        loader = getattr(owner, "weight_loader", None)
        if loader is not None:
            loader(param, tensor, *extra)
        else:
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match {tuple(param.shape)}")
            param.data.copy_(tensor)
        loaded.add(target)
    return loaded
