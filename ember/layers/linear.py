"""Linear layers, tensor-parallel (column / row split), with a ``quant_method``
hook that owns the weights' format and the matmul.

The split follows Megatron-LM (Shoeybi et al., 2019): column-parallel layers
split the output dimension, row-parallel layers split the input dimension and
sum their partial products over the ranks. With tp_size 1 every layer holds
the full weight and no collective runs.

Each layer takes ``quant_config`` and ``prefix`` (its checkpoint name, e.g.
``model.layers.0.self_attn.qkv_proj``); ``quant_config.get_quant_method(layer,
prefix)`` decides its :class:`~ember.layers.quantization.base.LinearMethodBase`
(None, or no config: :class:`UnquantizedLinearMethod`). ``forward`` is
``quant_method.apply(layer, x, bias)`` plus the layer's collective.

Loading: every parameter the method creates is sharded along its
``output_dim`` attribute (default 0) by column-parallel layers and along its
``input_dim`` attribute (default 1 for 2-D parameters, none for 1-D ones) by
row-parallel layers; a parameter with a ``weight_loader`` attribute of its own
is loaded by that instead (see :func:`ember.models.utils.load_hf_weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed.parallel_state import get_tp_group, get_tp_rank, get_tp_size
from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig, quant_method_for


class UnquantizedLinearMethod(LinearMethodBase):
    """Plain dense weights: ``weight`` [N, K] in the model dtype, ``y = x @ W.T + b``."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        weight = torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype)
        layer.weight = nn.Parameter(weight, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


def output_dim(param: nn.Parameter) -> int:
    """The dimension of ``param`` that runs over output features (its
    ``output_dim`` attribute, default 0)."""
    return getattr(param, "output_dim", 0)


def input_dim(param: nn.Parameter) -> int | None:
    """The dimension of ``param`` that runs over input features (its
    ``input_dim`` attribute; default 1 for a 2-D parameter, None for a 1-D one
    such as a bias or a per-channel scale)."""
    return getattr(param, "input_dim", 1 if param.dim() > 1 else None)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, layer: nn.Module) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{type(layer).__name__} {getattr(layer, 'prefix', '')}: weight shape {tuple(src.shape)} "
                         f"does not match {tuple(dst.shape)} (tp_size {getattr(layer, 'tp_size', 1)})")
    dst.copy_(src)


class LinearBase(nn.Module):
    """Base of all linear layers.

    Args:
        input_size_per_partition: this rank's input features (K).
        output_partition_sizes: this rank's output features of each stacked
            projection (their sum is N).
        input_size, output_size: the full (unsharded) sizes.
        bias: whether to hold a bias of this rank's ``[N]`` (row-parallel:
            the full ``[output_size]``).
        dtype: parameter dtype (default: torch's default dtype).
        quant_config: the model's quantization config, or None.
        prefix: the layer's checkpoint name.
    """

    def __init__(self, input_size_per_partition: int, output_partition_sizes: list[int], input_size: int,
                 output_size: int, bias: bool, dtype: torch.dtype | None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.params_dtype = dtype or torch.get_default_dtype()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size_per_partition
        self.output_partition_sizes = list(output_partition_sizes)
        self.in_features, self.out_features = input_size_per_partition, sum(output_partition_sizes)
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.prefix = prefix
        self.quant_method: LinearMethodBase = quant_method_for(quant_config, self, prefix, UnquantizedLinearMethod)
        self.quant_method.create_weights(self, input_size_per_partition, self.output_partition_sizes, input_size,
                                         output_size, self.params_dtype)
        self.bias = (nn.Parameter(torch.empty(self._bias_size(), dtype=self.params_dtype), requires_grad=False)
                     if bias else None)

    def _bias_size(self) -> int:
        return self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [num_tokens, in_features] -> [num_tokens, out_features]."""
        return self.quant_method.apply(self, x, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        """Copy the checkpoint tensor ``loaded`` (full size) into this rank's ``param``.

        Raises:
            ValueError: a shape that does not match.
        """
        _copy_checked(param.data, loaded, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tp_size={self.tp_size}")


class ReplicatedLinear(LinearBase):
    """Full weight on every rank: ``[num_tokens, in_features] -> [num_tokens, out_features]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(in_features, [out_features], in_features, out_features, bias, dtype, quant_config, prefix)


class ColumnParallelLinear(LinearBase):
    """Splits the output dimension across ranks: rank r holds output features
    ``[r * N / tp_size, (r + 1) * N / tp_size)``.

    Args:
        in_features, out_features: full sizes (``out_features`` divisible by tp_size).
        gather_output: all-gather the ranks' outputs into the full
            ``[num_tokens, out_features]``; else the output stays split.

    Raises:
        ValueError: an output size that tp_size does not divide.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 gather_output: bool = False, output_sizes: list[int] | None = None) -> None:
        tp = get_tp_size()
        sizes = output_sizes if output_sizes is not None else [out_features]
        for size in sizes:
            if size % tp:
                raise ValueError(f"{type(self).__name__} {prefix}: output size {size} is not divisible by "
                                 f"tp_size {tp}")
        self.gather_output = gather_output
        super().__init__(in_features, [s // tp for s in sizes], in_features, out_features, bias, dtype,
                         quant_config, prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [num_tokens, in_features] -> [num_tokens, out_features / tp_size]
        ([num_tokens, out_features] with ``gather_output``)."""
        y = self.quant_method.apply(self, x, self.bias)
        if self.gather_output and self.tp_size > 1:
            y = get_tp_group().all_gather(y, dim=-1)
        return y

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        dim = output_dim(param)
        shard = param.shape[dim]
        _copy_checked(param.data, loaded.narrow(dim, self.tp_rank * shard, shard), self)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stacked in one matmul (e.g. gate_up_proj,
    shard ids 0 and 1); each is split across ranks on its own.

    Args:
        output_sizes: full output size of each stacked projection.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype | None = None, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", gather_output: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, dtype, quant_config, prefix, gather_output,
                         output_sizes=self.output_sizes)

    def _shard(self, shard_id: str | int) -> tuple[int, int, int]:
        """``(offset in this rank's output, size, offset in the checkpoint tensor)`` of one stacked projection."""
        if not isinstance(shard_id, int):
            raise ValueError(f"{type(self).__name__} {self.prefix}: needs an integer shard_id, got {shard_id!r}")
        offset = sum(self.output_partition_sizes[:shard_id])
        size = self.output_partition_sizes[shard_id]
        return offset, size, self.tp_rank * size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if shard_id is None:  # the stacked projections already concatenated in the checkpoint
            for i, size in enumerate(self.output_sizes):
                start = sum(self.output_sizes[:i])
                self.weight_loader(param, loaded.narrow(output_dim(param), start, size), i)
            return
        dim = output_dim(param)
        offset, size, src_start = self._shard(shard_id)
        _copy_checked(param.data.narrow(dim, offset, size), loaded.narrow(dim, src_start, size), self)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Q, K and V projections in one matmul; shard ids ``"q"``, ``"k"``, ``"v"``.

    Query heads are split across ranks. Key/value heads are split too while
    tp_size divides them; with more ranks than KV heads each KV head is
    replicated on ``tp_size / num_kv_heads`` consecutive ranks (GQA), so every
    rank holds one.

    Args:
        hidden_size: input size.
        head_dim: size of one head.
        num_heads, num_kv_heads: total query and key/value heads.

    Raises:
        ValueError: tp_size does not divide the query heads, or neither
            divides the other for the KV heads.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 dtype: torch.dtype | None = None, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        tp = get_tp_size()
        if num_heads % tp or (num_kv_heads % tp and tp % num_kv_heads):
            raise ValueError(f"QKVParallelLinear {prefix}: {num_heads} query / {num_kv_heads} KV heads do not "
                             f"split over tp_size {tp}")
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.num_kv_head_replicas = max(1, tp // num_kv_heads)
        # Full sizes as the layer sees them: KV replicated to tp_size heads when needed.
        kv = self.num_kv_heads * tp * head_dim
        super().__init__(hidden_size, [num_heads * head_dim, kv, kv], bias, dtype, quant_config, prefix)
        self.output_size = (num_heads + 2 * num_kv_heads) * head_dim

    def _shard(self, shard_id: str | int) -> tuple[int, int, int]:
        index = {"q": 0, "k": 1, "v": 2}.get(shard_id) if isinstance(shard_id, str) else None
        if index is None:
            raise ValueError(f"QKVParallelLinear {self.prefix}: shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        offset = sum(self.output_partition_sizes[:index])
        size = self.output_partition_sizes[index]
        head_shard = self.tp_rank if index == 0 else self.tp_rank // self.num_kv_head_replicas
        return offset, size, head_shard * size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if shard_id is None:  # q, k and v concatenated in the checkpoint
            q, kv = self.total_num_heads * self.head_dim, self.total_num_kv_heads * self.head_dim
            dim = output_dim(param)
            for sid, start, size in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
                self.weight_loader(param, loaded.narrow(dim, start, size), sid)
            return
        super().weight_loader(param, loaded, shard_id)


class RowParallelLinear(LinearBase):
    """Splits the input dimension across ranks (rank r holds input features
    ``[r * K / tp_size, (r + 1) * K / tp_size)``, its input already split, e.g.
    the output of a column-parallel layer); the partial products are summed
    over the ranks.

    Args:
        in_features, out_features: full sizes (``in_features`` divisible by tp_size).
        reduce_results: all-reduce the partial products (through
            ``get_tp_group().all_reduce``) and add the bias once; else each
            rank returns its partial sum (the bias added on rank 0 only).
        input_is_parallel: the input is this rank's slice already; else the
            layer takes its slice of the full input.

    Raises:
        ValueError: an input size that tp_size does not divide.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 reduce_results: bool = True, input_is_parallel: bool = True) -> None:
        tp = get_tp_size()
        if in_features % tp:
            raise ValueError(f"RowParallelLinear {prefix}: input size {in_features} is not divisible by "
                             f"tp_size {tp}")
        self.reduce_results, self.input_is_parallel = reduce_results, input_is_parallel
        super().__init__(in_features // tp, [out_features], in_features, out_features, bias, dtype, quant_config,
                         prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [num_tokens, in_features / tp_size] ([num_tokens, in_features]
        without ``input_is_parallel``) -> [num_tokens, out_features]."""
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        if not self.input_is_parallel:
            k = self.input_size_per_partition
            x = x.narrow(-1, self.tp_rank * k, k)
        y = self.quant_method.apply(self, x, None)
        if self.reduce_results:
            y = get_tp_group().all_reduce(y)
        elif self.tp_rank > 0:
            return y
        return y if self.bias is None else y + self.bias

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        dim = input_dim(param)
        if dim is None:  # the bias (and per-output-channel tensors) are not split
            _copy_checked(param.data, loaded, self)
            return
        shard = param.shape[dim]
        _copy_checked(param.data, loaded.narrow(dim, self.tp_rank * shard, shard), self)
