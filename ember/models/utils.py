"""Helpers shared by model files: the pre-norm decoder layer and stack every
supported family uses, and HF checkpoint names -> Ember parameters.

Pipeline parallelism: a stack built on pipeline stage s of n holds only the
decoder layers :func:`get_pp_layer_range` gives it; the others, the token
embedding off the first stage, and the final norm and LM head off the last
stage are :class:`PPMissingLayer` placeholders (no parameters; their
checkpoint tensors are skipped at load). A stage other than the last returns
:class:`IntermediateTensors` (the residual stream) for the next stage; the
model runner moves them between stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ember.distributed.parallel_state import get_pp_group
from ember.layers.attention import ForwardContext
from ember.layers.attention.kv_scales import attention_layers_by_block, load_kv_scale, match_kv_scale
from ember.layers.layernorm import RMSNorm
from ember.layers.quantization.base import QuantizationConfig
from ember.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from ember.layers.quantization.checkpoint_errors import unexpected_weight_message


def get_pp_layer_range(num_layers: int, pp_rank: int | None = None, pp_size: int | None = None
                       ) -> tuple[int, int]:
    """``(start_layer, end_layer)``: the decoder layers of pipeline stage
    ``pp_rank`` of ``pp_size`` (default: this process's stage), as equal as
    possible, the earlier stages taking one more when ``pp_size`` does not
    divide ``num_layers``.

    Raises:
        ValueError: more stages than layers.
    """
    pp = get_pp_group()
    pp_rank = pp.rank if pp_rank is None else pp_rank
    pp_size = pp.world_size if pp_size is None else pp_size
    if pp_size > num_layers:
        raise ValueError(f"{num_layers} decoder layers cannot fill {pp_size} pipeline stages")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (pp_rank < extra)


class PPMissingLayer(nn.Identity):
    """Stands for a layer that lives on another pipeline stage: no
    parameters, never called on this stage."""


@dataclass(slots=True)
class IntermediateTensors:
    """The residual stream between pipeline stages, as ``(hidden, residual)``
    (see :class:`PreNormDecoderLayer`): both [num_tokens, hidden] in the model
    dtype."""

    hidden_states: torch.Tensor
    residual: torch.Tensor


class AuxHiddenStates:
    """Where a forward pass also writes the residual stream at chosen depths,
    for a speculative proposer conditioned on the target's hidden states
    (EAGLE-3 reads three depths of the target, Li et al. 2025,
    arXiv:2503.01840).

    Depth ``d`` is the stream entering decoder layer ``d`` (``hidden +
    residual``, before its input norm); ``d == num_hidden_layers`` is the
    stream after the last layer, before the final norm. The buffer has a
    fixed address, so CUDA graphs (decode and piecewise) write into it too.

    Args:
        layers: the depths, in the order their rows are laid out.
        max_tokens: rows of the buffer (the most tokens one step runs).
        hidden_size: the model's hidden size.
        dtype, device: the model's.

    Attributes:
        buffer: [max_tokens, len(layers) * hidden_size]; after a forward of
            ``n`` tokens, rows ``:n`` hold the depths side by side.
    """

    def __init__(self, layers: Sequence[int], max_tokens: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.layers = tuple(int(i) for i in layers)
        self.hidden_size = hidden_size
        self.buffer = torch.zeros(max_tokens, len(self.layers) * hidden_size, dtype=dtype, device=device)
        self._slots: dict[int, list[int]] = {}
        for j, d in enumerate(self.layers):
            self._slots.setdefault(d, []).append(j)

    def store(self, depth: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Write the stream ``hidden + residual`` ([n, hidden]; ``residual``
        None: ``hidden`` is the stream) at ``depth``, if it is a chosen one."""
        h = self.hidden_size
        for j in self._slots.get(depth, ()):
            out = self.buffer[: hidden.shape[0], j * h: (j + 1) * h]
            if residual is None:
                out.copy_(hidden)
            else:
                torch.add(hidden, residual, out=out)

    def rows(self, n: int) -> torch.Tensor:
        """The last forward's ``n`` token rows, [n, len(layers) * hidden]."""
        return self.buffer[:n]


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
        hidden_states, residual = self.attention_block(positions, hidden_states, residual, ctx)
        return self.mlp(hidden_states), residual

    def attention_block(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                        ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to its MLP: ``(hidden, residual)`` [num_tokens, hidden]
        -> ``(post_attention_layernorm(stream), stream)``, the MLP's input and
        the stream after attention."""
        if residual is None:
            hidden_states, residual = self.input_layernorm(hidden_states), hidden_states
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, ctx)
        return self.post_attention_layernorm(hidden_states, residual)


class DecoderStack(nn.Module):
    """Token embedding, decoder layers, final norm (HF's ``model.`` submodule);
    on a pipeline stage, only its part (see the module docstring:
    ``start_layer`` / ``end_layer``, placeholders elsewhere).

    Args:
        config: HF config (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``rms_norm_eps``).
        make_layer: ``(layer_idx, prefix) -> decoder layer`` (prefix: ``{prefix}.layers.{i}``).
        quant_config: the model's quantization config, or None.
        prefix: the stack's checkpoint name (``model``).
    """

    def __init__(self, config, make_layer: Callable[[int, str], nn.Module],
                 quant_config: QuantizationConfig | None = None, prefix: str = "model") -> None:
        super().__init__()
        pp = get_pp_group()
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        self.start_layer, self.end_layer = get_pp_layer_range(config.num_hidden_layers)
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                                    prefix=f"{prefix}.embed_tokens")
                             if self.is_first_stage else PPMissingLayer())
        self.layers = nn.ModuleList(make_layer(i, f"{prefix}.layers.{i}")
                                    if self.start_layer <= i < self.end_layer else PPMissingLayer()
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.is_last_stage else PPMissingLayer()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """``input_ids``, ``positions``: [num_tokens] int64 -> [num_tokens, hidden]
        (the final hidden states), or, on a pipeline stage before the last,
        the stream after its layers. A stage after the first starts from the
        previous stage's ``intermediate_tensors`` instead of ``input_ids``."""
        ctx.positions = positions  # for the attention layers' RoPE
        if intermediate_tensors is None:
            hidden_states, residual = self.embed_tokens(input_ids), None
        else:
            hidden_states, residual = intermediate_tensors.hidden_states, intermediate_tensors.residual
        # NOTE: the whole list when it is all here (one stage): no slice per step.
        layers = self.layers if self.is_first_stage and self.is_last_stage else \
            self.layers[self.start_layer: self.end_layer]
        aux = ctx.aux_hidden
        if aux is None:
            for layer in layers:
                hidden_states, residual = layer(positions, hidden_states, residual, ctx)
        else:
            for i, layer in enumerate(layers, self.start_layer):
                aux.store(i, hidden_states, residual)
                hidden_states, residual = layer(positions, hidden_states, residual, ctx)
            aux.store(self.end_layer, hidden_states, residual)
        if not self.is_last_stage:
            return IntermediateTensors(hidden_states, residual)
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
        pp = get_pp_group()
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                       prefix="lm_head") if pp.is_last_rank else PPMissingLayer())
        # NOTE: a last stage without the embedding loads the tied table into its head.
        self._embedding_into_head = (getattr(config, "tie_word_embeddings", False) and pp.is_last_rank
                                     and not pp.is_first_rank)
        if getattr(config, "tie_word_embeddings", False) and pp.world_size == 1:
            self.lm_head.tie_weights(self.model.embed_tokens)
        self._missing = tuple(f"{name}." for name, m in self.named_modules() if isinstance(m, PPMissingLayer))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """``input_ids``, ``positions``: [num_tokens] int64 -> [num_tokens, hidden]
        (see :meth:`DecoderStack.forward` for pipeline stages)."""
        return self.model(input_ids, positions, ctx, intermediate_tensors)

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

    def _on_another_stage(self, name: str) -> bool:
        return bool(self._missing) and name.startswith(self._missing)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into the parameters.

        Returns:
            Names of the parameters that were loaded.
        Raises:
            ValueError: an unexpected weight name or a shape mismatch.
        """
        if self._embedding_into_head:
            weights = (("lm_head.weight" if n == "model.embed_tokens.weight" else n, t) for n, t in weights)
        return load_hf_weights(self, weights, self.stacked_params_mapping, self.expert_params_mapping(),
                               skip=self._skip_at_load)

    def _skip_at_load(self, name: str) -> bool:
        if self._embedding_into_head and name == "lm_head.weight":
            return False
        return self.skip_weight(name) or self._on_another_stage(name)


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
    layouts), else it is copied as is. KV-cache scales (``self_attn.k_scale``
    and the other names of :mod:`ember.layers.attention.kv_scales`) go to the
    attention layer's ``k_scale`` / ``v_scale`` buffers.

    Args:
        stacked_params_mapping: checkpoint projections stacked into one parameter.
        expert_params_mapping: per-expert checkpoint weights stacked into FusedMoE's.
        skip: checkpoint names to ignore (e.g. rotary buffers, tied heads, MTP layers).
    Returns:
        Names of the parameters that were loaded.
    Raises:
        ValueError: an unexpected weight name or a shape mismatch, or a bad
            KV-cache scale (naming the tensor).
    """
    params = dict(model.named_parameters())
    experts = {w: (p, e, s) for p, w, e, s in expert_params_mapping}
    loaded: set[str] = set()
    attn_layers: dict[str, nn.Module] | None = None
    for name, tensor in weights:
        if skip(name):
            continue
        hit = match_kv_scale(name)
        if hit is not None:
            if attn_layers is None:
                attn_layers = attention_layers_by_block(model)
            load_kv_scale(attn_layers, name, tensor, hit)
            continue
        target, extra = _resolve(name, stacked_params_mapping, experts)
        if target not in params:
            raise ValueError(unexpected_weight_message(model, name, tensor))
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
