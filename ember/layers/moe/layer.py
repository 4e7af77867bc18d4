"""``FusedMoE``: the routed experts of an MoE block, weights stacked per expert.

Weights: ``w13_weight`` [num_experts, 2 * intermediate, hidden] (gate rows,
then up rows) and ``w2_weight`` [num_experts, hidden, intermediate], the
layout fused-MoE kernels expect (vLLM's ``FusedMoE`` naming). With tensor
parallelism the intermediate dimension is split (column-parallel w13,
row-parallel w2); with expert parallelism (``--enable-expert-parallel``) each
rank of the tensor-parallel group holds whole experts instead, a contiguous
``num_experts / ep_size`` of them. Either way, by default every rank sees
every token (the router is replicated), computes its share, and the shares
are summed by one all-reduce over the group: the all-gather / reduce-scatter
form of expert-parallel dispatch and combine with the tokens already
replicated. With expert parallelism a step may instead take the all-to-all
form (GShard, Lepikhin et al., 2020): each rank routes a contiguous slice of
the step's tokens, sends every (token, expert) row to the expert's rank,
gets the expert outputs back, combines them, and the slices are all-gathered
(see :meth:`FusedMoE.forward` and ``expert_parallel_dispatch`` in
:class:`ember.config.ParallelConfig`).

The weights' format and the computation belong to the layer's ``quant_method``
(the quantization seam, as for linear layers). The unquantized method picks
its implementation once, when the layer is built, from the device it is built
on (the model runner builds models inside ``with device:``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ember.config import FP8_DTYPES
from ember.distributed.parallel_state import (get_ep_dispatch, get_ep_rank, get_ep_size, get_tp_group, get_tp_rank,
                                              get_tp_size)
from ember.layers.quantization.base import QuantizationConfig, quant_method_for
from ember.utils import resolve_lazy

# fused_experts(hidden_states, w13, w2, topk_weights, topk_ids) -> [num_tokens, hidden]
FusedExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_FUSED_MOE_IMPLS: dict[str, str] = {
    # name -> "module:function", imported lazily so the CPU path never imports GPU kernels.
    "torch": "ember.layers.moe.torch_moe:fused_experts_torch",
    "triton": "ember.kernels.triton_moe:fused_experts_triton",
}

# device type -> implementation name (a GPU kernel registers itself for "cuda").
_DEFAULT_IMPL: dict[str, str] = {"cpu": "torch", "cuda": "triton"}

# Checkpoint suffixes of per-expert quantization scales (see make_expert_params_mapping).
EXPERT_SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale")
_PROJ_OF_SHARD = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

# With expert parallelism and ``expert_parallel_dispatch="auto"``, steps of at
# least this many tokens take the all-to-all form, smaller ones the all-reduce
# form. A default, to be set by measurement on several GPUs
# (benchmarks/ep_alltoall.py): the all-to-all form runs each rank's experts on
# only the rows routed to them (about top_k * num_tokens / ep_size, against
# top_k * num_tokens in the all-reduce form, where the other ranks' choices are
# computed at weight zero), but it moves about 2 * top_k / ep_size rows per
# token and an all-gather instead of one all-reduce, and adds a host sync and
# three more collectives. It is above the largest decode batch
# captured in a CUDA graph (512, :func:`ember.worker.cuda_graph.capture_sizes`),
# so graph-captured decode steps keep the all-reduce form.
ALLTOALL_MIN_TOKENS = 1024


def get_fused_moe_impl(name: str) -> FusedExpertsFn:
    """The experts function registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    return resolve_lazy(_FUSED_MOE_IMPLS, name, "fused MoE implementation")


class UnquantizedFusedMoEMethod:
    """Plain stacked expert weights in the model dtype, run by the fused-experts
    implementation registered for the device the layer is built on
    (:data:`_DEFAULT_IMPL`).

    Args:
        impl: implementation name (default: the one for torch's default device).
    """

    def __init__(self, impl: str | None = None) -> None:
        self.impl_name = impl or _DEFAULT_IMPL.get(torch.get_default_device().type, "torch")
        self.impl = get_fused_moe_impl(self.impl_name)
        # NOTE: the torch experts loop reads the chosen expert ids on the host, which
        # a CUDA graph cannot capture (the runner then stays eager); the Triton
        # grouped GEMM needs no host sync.
        self.cuda_graph_safe = self.impl_name != "torch"

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        """Register ``w13_weight`` [num_experts, 2 * intermediate, hidden] and
        ``w2_weight`` [num_experts, hidden, intermediate] on ``layer``."""
        inter = intermediate_size_per_partition
        layer.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size, dtype=params_dtype),
                                        requires_grad=False)
        layer.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter, dtype=params_dtype),
                                       requires_grad=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Nothing to convert: the kernels read the loaded layout."""

    def apply(self, layer: nn.Module, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`FusedMoE.forward`."""
        return self.impl(hidden_states, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids)


class FusedMoE(nn.Module):
    """Routed SwiGLU experts; routing (top-k) is done by the caller's router.

    The experts' storage format and computation belong to ``quant_method``:
    ``quant_config.get_quant_method(self, prefix)`` if that gives one, else
    :class:`UnquantizedFusedMoEMethod`. A method implements
    ``create_weights(layer, num_experts, hidden_size,
    intermediate_size_per_partition, params_dtype)``,
    ``process_weights_after_loading(layer)`` and ``apply(layer, hidden_states,
    topk_weights, topk_ids)``, and has a ``cuda_graph_safe`` flag.

    Args:
        num_experts: routed experts.
        hidden_size: model width.
        intermediate_size: width of one expert (``moe_intermediate_size``).
        dtype: parameter dtype (default: torch's default dtype).
        quant_config: the model's quantization config, or None.
        prefix: the layer's checkpoint name (e.g. ``model.layers.3.mlp.experts``).

    With expert parallelism the dispatch form is the one given to
    :func:`ember.distributed.parallel_state.set_expert_parallel`:
    ``"allreduce"``, ``"alltoall"``, or ``"auto"`` (all-to-all for steps of at
    least :data:`ALLTOALL_MIN_TOKENS` tokens). The all-to-all form reads its
    split sizes on the host, so it never runs inside a CUDA graph: under
    ``"alltoall"`` the layer is not ``cuda_graph_safe`` (the runner stays
    eager), and any step met during a CUDA graph capture takes the all-reduce
    form.

    Raises:
        ValueError: expert parallelism over a number of ranks that does not
            divide ``num_experts``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype | None = None, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        self.ep_rank, self.ep_size = get_ep_rank(), get_ep_size()
        # NOTE: with expert parallelism the experts are whole on their rank.
        self.tp_rank, self.tp_size = (0, 1) if self.ep_size > 1 else (get_tp_rank(), get_tp_size())
        self.reduce_size = get_tp_size()  # ranks whose shares are summed
        if num_experts % self.ep_size:
            raise ValueError(f"FusedMoE {prefix}: {num_experts} experts do not split over {self.ep_size} "
                             f"expert-parallel ranks")
        self.num_experts, self.hidden_size, self.prefix = num_experts, hidden_size, prefix
        self.num_local_experts = num_experts // self.ep_size
        self.expert_start = self.ep_rank * self.num_local_experts
        self.intermediate_size = intermediate_size // self.tp_size
        self.quant_method = quant_method_for(quant_config, self, prefix, UnquantizedFusedMoEMethod)
        self.quant_method.create_weights(self, self.num_local_experts, hidden_size, self.intermediate_size, dtype)
        self.cuda_graph_safe = getattr(self.quant_method, "cuda_graph_safe", False)
        self.dispatch = get_ep_dispatch() if self.ep_size > 1 else "allreduce"
        if self.dispatch == "alltoall":
            self.cuda_graph_safe = False

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                ) -> torch.Tensor:
        """``hidden_states``: [num_tokens, hidden]; ``topk_weights`` / ``topk_ids``:
        [num_tokens, top_k] (global expert ids). Returns [num_tokens, hidden],
        summed over the tensor-parallel group."""
        if self.ep_size > 1:
            if self._all_to_all_step(hidden_states):
                return self._forward_all_to_all(hidden_states, topk_weights, topk_ids)
            topk_weights, topk_ids = self._local_routing(topk_weights, topk_ids)
        out = self.quant_method.apply(self, hidden_states, topk_weights, topk_ids)
        if self.reduce_size > 1:
            out = get_tp_group().all_reduce(out)
        return out

    def _all_to_all_step(self, hidden_states: torch.Tensor) -> bool:
        """Whether this step takes the all-to-all form (see the class docstring)."""
        if self.dispatch == "allreduce" or (hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()):
            return False
        return self.dispatch == "alltoall" or hidden_states.shape[0] >= ALLTOALL_MIN_TOKENS

    def _forward_all_to_all(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                            topk_ids: torch.Tensor) -> torch.Tensor:
        """The all-to-all form of :meth:`forward` (same arguments and result).

        Rank ``r`` owns tokens ``[r * c, (r + 1) * c)`` (``c = ceil(num_tokens /
        ep_size)``, the last slices shorter or empty). It sorts its (token,
        expert) choices by expert, hence by the experts' ranks, and the ranks
        exchange per-expert counts (one small all-to-all, read on the host),
        then the rows (an all-to-all of uneven splits). Each rank runs its
        local experts once on the rows it received, grouped by local expert,
        and sends the outputs back the same way; the owner sums its tokens'
        ``top_k`` outputs weighted by ``topk_weights`` in float32, and the
        slices are all-gathered (padded to ``c`` rows) so every rank holds
        every token's output.
        """
        comm = get_tp_group()
        world, rank, local = self.ep_size, self.ep_rank, self.num_local_experts
        num_tokens, top_k = topk_ids.shape
        chunk = -(-num_tokens // world)
        start, end = min(rank * chunk, num_tokens), min((rank + 1) * chunk, num_tokens)
        ids = topk_ids[start:end].reshape(-1)
        order = torch.argsort(ids, stable=True)  # this rank's choices, grouped by expert
        token_of = order // top_k  # row of this rank's slice that each sent row comes from
        send_rows = hidden_states[start:end].index_select(0, token_of)
        per_expert = torch.bincount(ids, minlength=self.num_experts)  # [num_experts]
        # recv_per_expert[j * local + e]: rows rank j sends to local expert e.
        recv_per_expert = comm.all_to_all(per_expert)
        send_splits, recv_splits = torch.stack([per_expert.view(world, local).sum(1),
                                                recv_per_expert.view(world, local).sum(1)]).tolist()
        recv_rows = comm.all_to_all(send_rows, recv_splits, send_splits)
        if recv_rows.shape[0]:
            local_ids = torch.arange(local, dtype=topk_ids.dtype, device=topk_ids.device).repeat(world)
            local_ids = local_ids.repeat_interleave(recv_per_expert, output_size=recv_rows.shape[0])
            ones = torch.ones(recv_rows.shape[0], 1, dtype=torch.float32, device=recv_rows.device)
            expert_out = self.quant_method.apply(self, recv_rows, ones, local_ids[:, None])
        else:
            expert_out = recv_rows  # [0, hidden]: no rows for this rank's experts
        returned = comm.all_to_all(expert_out, send_splits, recv_splits)
        weights = topk_weights[start:end].reshape(-1)[order].float()
        out = torch.zeros(chunk, self.hidden_size, dtype=torch.float32, device=hidden_states.device)
        out.index_add_(0, token_of, returned.float() * weights[:, None])
        return comm.all_gather(out.to(hidden_states.dtype), dim=0)[:num_tokens]

    def _local_routing(self, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing to this rank's experts: ids made local, choices of other
        ranks' experts kept with weight 0 (on local expert 0), so the shapes
        stay static (CUDA graphs) at the cost of computing them."""
        local = topk_ids - self.expert_start
        mine = (local >= 0) & (local < self.num_local_experts)
        return torch.where(mine, topk_weights, 0.0), torch.where(mine, local, 0)

    @staticmethod
    def make_expert_params_mapping(num_experts: int, gate_proj: str = "gate_proj", down_proj: str = "down_proj",
                                   up_proj: str = "up_proj") -> list[tuple[str, str, int | None, str]]:
        """``(param suffix, checkpoint suffix, expert_id, shard_id)`` for every
        expert weight of an HF checkpoint: per-expert ``experts.{e}.gate_proj.weight``
        (shard ``w1``), ``up_proj`` (``w3``) and ``down_proj`` (``w2``), and the
        stacked ``experts.gate_up_proj`` / ``experts.down_proj`` that
        transformers >= 5 uses in memory (``expert_id`` None)."""
        mapping: list[tuple[str, str, int | None, str]] = []
        for e in range(num_experts):
            mapping += [("experts.w13_weight", f"experts.{e}.{gate_proj}.weight", e, "w1"),
                        ("experts.w13_weight", f"experts.{e}.{up_proj}.weight", e, "w3"),
                        ("experts.w2_weight", f"experts.{e}.{down_proj}.weight", e, "w2")]
        mapping += [("experts.w13_weight", "experts.gate_up_proj", None, "w13"),
                    ("experts.w2_weight", "experts.down_proj", None, "w2")]
        # Quantized checkpoints' companions of each expert weight (FP8: block
        # ``weight_scale_inv``, per-tensor/channel ``weight_scale``, static
        # ``input_scale``), into the parameters a quant method registers as
        # ``w13_<suffix>`` / ``w2_<suffix>``.
        for suffix in EXPERT_SCALE_SUFFIXES:
            for e in range(num_experts):
                mapping += [(f"experts.w13_{suffix}", f"experts.{e}.{gate_proj}.{suffix}", e, "w1"),
                            (f"experts.w13_{suffix}", f"experts.{e}.{up_proj}.{suffix}", e, "w3"),
                            (f"experts.w2_{suffix}", f"experts.{e}.{down_proj}.{suffix}", e, "w2")]
        return mapping

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str,
                      expert_id: int | None = None) -> None:
        """Copy one checkpoint tensor into this rank's slice of ``param``.

        Args:
            loaded: ``[intermediate, hidden]`` for ``w1`` (gate) / ``w3`` (up),
                ``[hidden, intermediate]`` for ``w2`` (down); with ``expert_id``
                None, all experts stacked on a leading dim (``w13``: gate and up
                rows concatenated).

        A quant method's scale parameters say how they are laid out with
        attributes (see :mod:`ember.layers.quantization.fp8_moe`):
        ``intermediate_block`` (a block-scale grid shaped like the weight, one
        entry per ``intermediate_block`` rows / columns of the intermediate
        dimension), ``moe_scale = "channel"`` ([E, rows]: one scale per output
        row; a checkpoint's single per-tensor scale fills its projection's
        rows) or ``moe_scale = "tensor"`` ([E, 2] for w13: gate, up; [E, 1]
        for w2). ``checkpoint_suffix`` and ``quant_scheme`` name the tensor
        and the scheme in errors. A parameter in an FP8 dtype takes only
        tensors of that dtype.
        Raises:
            ValueError: a shape (or a dtype) that does not match.
        """
        if expert_id is None:
            for e in range(self.num_experts):
                if shard_id == "w13":
                    full = loaded.shape[1] // 2
                    self.weight_loader(param, loaded[e, :full], "w1", e)
                    self.weight_loader(param, loaded[e, full:], "w3", e)
                else:
                    self.weight_loader(param, loaded[e], shard_id, e)
            return
        expert_id -= self.expert_start
        if not 0 <= expert_id < self.num_local_experts:
            return  # another expert-parallel rank's expert
        if param.dtype in FP8_DTYPES and loaded.dtype != param.dtype:
            raise ValueError(self._shard_error(param, shard_id, expert_id, f"dtype {loaded.dtype} is not "
                                                                           f"{param.dtype}"))
        kind = getattr(param, "moe_scale", None)
        if kind is not None:
            self._load_scale(param, loaded, shard_id, expert_id, kind)
            return
        inter = self.intermediate_size // getattr(param, "intermediate_block", 1)
        dim = 1 if shard_id == "w2" else 0  # the intermediate dimension, split over tensor-parallel ranks
        if loaded.dim() != 2 or loaded.shape[dim] != inter * self.tp_size:
            raise ValueError(self._shard_error(param, shard_id, expert_id, f"shape {tuple(loaded.shape)} does not have "
                                               f"{inter * self.tp_size} {'columns' if dim else 'rows'}"))
        if shard_id == "w2":
            dst, src = param.data[expert_id], loaded.narrow(1, self.tp_rank * inter, inter)
        else:
            offset = 0 if shard_id == "w1" else inter
            dst, src = param.data[expert_id, offset: offset + inter], loaded.narrow(0, self.tp_rank * inter, inter)
        if dst.shape != src.shape:
            raise ValueError(self._shard_error(param, shard_id, expert_id, f"shape {tuple(loaded.shape)} does not "
                                                                           f"match {tuple(dst.shape)}"))
        dst.copy_(src)

    def _load_scale(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int,
                    kind: str) -> None:
        """A per-tensor or per-channel scale (see :meth:`weight_loader`) into local expert ``expert_id``."""
        if kind == "tensor":
            if loaded.numel() != 1:
                raise ValueError(self._shard_error(param, shard_id, expert_id, f"shape {tuple(loaded.shape)} is "
                                                                               f"not one per-tensor scale"))
            param.data[expert_id, 1 if shard_id == "w3" else 0] = loaded.reshape(())
            return
        inter = self.intermediate_size
        offset = 0 if shard_id == "w1" else inter
        rows = param.data[expert_id] if shard_id == "w2" else param.data[expert_id, offset: offset + inter]
        flat = loaded.reshape(-1)
        if flat.numel() == 1:
            rows.fill_(flat[0])  # a per-tensor scale for every row
            return
        full = rows.numel() if shard_id == "w2" else inter * self.tp_size
        if loaded.dim() > 2 or (loaded.dim() == 2 and loaded.shape[1] != 1) or flat.numel() != full:
            raise ValueError(self._shard_error(param, shard_id, expert_id, f"shape {tuple(loaded.shape)} is neither "
                                                                           f"one scale nor {full} (one per row)"))
        rows.copy_(flat if shard_id == "w2" else flat.narrow(0, self.tp_rank * inter, inter))

    def _shard_error(self, param: nn.Parameter, shard_id: str, expert_id: int, what: str) -> str:
        name = getattr(param, "checkpoint_suffix", "weight")
        scheme = getattr(param, "quant_scheme", None)
        tensor = f"{self.prefix}.{expert_id + self.expert_start}.{_PROJ_OF_SHARD.get(shard_id, shard_id)}.{name}"
        return (f"FusedMoE {shard_id} of expert {expert_id}: {name} {what} (tp_size {self.tp_size}"
                f"{', ' + scheme if scheme else ''}; checkpoint tensor {tensor})")

