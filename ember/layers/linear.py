"""Linear layers, tensor-parallel ready (column / row split), with a
``quant_method`` hook that owns the weights' format and the matmul.

With tp_size 1 (the only size today) every layer holds the full weight. The
split follows Megatron-LM (Shoeybi et al., 2019): column-parallel layers split
the output dimension, row-parallel layers split the input dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed.parallel_state import get_tp_rank, get_tp_size
from ember.layers.activation import silu_and_mul
from ember.layers.layernorm import PreNormInput


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None, residual: torch.Tensor | None = None,
                 with_sumsq: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """``x @ weight.T + bias``, as ``F.linear``, then ``.to(out_dtype)`` if given
    (None or torch.float32), or ``+ residual`` if given ([num_tokens, out], x's
    dtype: a pre-norm block's residual add). On CUDA, inputs of at most 16 rows
    (decode steps) take the skinny Triton GEMM (:mod:`ember.kernels.triton_gemm`),
    which writes ``out_dtype`` or adds the residual in its epilogue; everything
    else cuBLAS.

    With ``with_sumsq``, returns ``(y, sumsq)``: the skinny GEMM's partial sums
    of squares of y's rows ([P, 16] float32, see
    :func:`~ember.kernels.triton_gemm.skinny_linear`), None on the other paths.

    Raises:
        ValueError: both ``out_dtype`` and ``residual`` given.
    """
    if out_dtype is not None and residual is not None:
        raise ValueError("dense_linear: out_dtype and residual do not combine")
    if x.is_cuda:
        from ember.kernels.triton_gemm import skinny_linear, use_skinny_linear

        if use_skinny_linear(x, weight) and (residual is None or (residual.dtype == x.dtype
                                                                  and residual.stride(1) == 1)):
            return skinny_linear(x, weight, bias, out_dtype, residual, with_sumsq)
    if residual is not None:
        if x.is_cuda and bias is None:
            # cuBLAS adds it in the GEMM (beta = 1), with one rounding instead of two.
            y = torch.addmm(residual, x, weight.t())
        else:
            y = F.linear(x, weight, bias) + residual
    else:
        y = F.linear(x, weight, bias)
        y = y if out_dtype is None else y.to(out_dtype)
    return (y, None) if with_sumsq else y


def dense_silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(g) * u`` of ``[g | u] = x @ weight.T + bias`` (a merged gate_up
    weight [2D, K] -> [num_tokens, D]). On CUDA, inputs of at most 16 rows take
    one skinny GEMM kernel with the activation in its epilogue, bit-identical to
    the unfused pair; everything else :func:`dense_linear` then
    :func:`ember.layers.activation.silu_and_mul`."""
    if x.is_cuda:
        from ember.kernels.triton_gemm import skinny_silu_and_mul_linear, use_skinny_linear

        if use_skinny_linear(x, weight):
            return skinny_silu_and_mul_linear(x, weight, bias)
    return silu_and_mul(dense_linear(x, weight, bias))


def dense_prenorm_linear(inp: PreNormInput, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         gated: bool = False) -> torch.Tensor:
    """:func:`dense_linear` (``gated``: :func:`dense_silu_and_mul_linear`) of
    ``inp.materialize()``. On CUDA, inputs of at most 16 rows (decode steps) to a
    large enough projection (:func:`ember.kernels.triton_gemm.use_skinny_rms_norm_linear`)
    take one skinny GEMM kernel with the RMSNorm folded in, when the stream is
    one tensor (:func:`ember.kernels.triton_gemm.skinny_rms_norm_linear`, which
    agrees with the unfused pair to the dtype's precision, not bit for bit).

    When the norm's weight was folded into ``weight``
    (:func:`~ember.layers.layernorm.fold_norm_weight`) and the stream's sums of
    squares are given (``inp.sumsq``), any projection folds, since its K loop
    is the plain GEMM's. With the norm's weight still to multiply in the loop,
    the sums of squares computed there cost less than reading the given ones
    (H200, gate_up: 57.5 against 58.1 us), so those are not used."""
    if inp.x.is_cuda and inp.normed is None and inp.residual is None:
        from ember.kernels.triton_gemm import skinny_rms_norm_linear, use_skinny_rms_norm_linear

        g = None if inp.norm.weight_in_next else inp.norm.weight
        sumsq = inp.sumsq if g is None else None
        if use_skinny_rms_norm_linear(inp.x, weight, sumsq is not None) and inp.norm.weight.dtype == inp.x.dtype:
            return skinny_rms_norm_linear(inp.x, weight, g, inp.norm.eps, bias, gated=gated, sumsq=sumsq)
    x = inp.materialize()
    return dense_silu_and_mul_linear(x, weight, bias) if gated else dense_linear(x, weight, bias)


class UnquantizedLinearMethod:
    """Plain dense weights: ``y = x @ W.T + b`` (:func:`dense_linear`); an input
    still to be normalized (:class:`PreNormInput`) goes to :func:`dense_prenorm_linear`."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor | PreNormInput, bias: torch.Tensor | None,
              residual: torch.Tensor | PreNormInput | None = None) -> torch.Tensor:
        block = residual if isinstance(residual, PreNormInput) else None
        r = block.stream if block is not None else residual
        if isinstance(x, PreNormInput):
            y = dense_prenorm_linear(x, layer.weight, bias)
            return y if r is None else y + r
        if block is not None and block.want_out_sumsq:
            y, block.out_sumsq = dense_linear(x, layer.weight, bias, residual=r, with_sumsq=True)
            return y
        return dense_linear(x, layer.weight, bias, residual=r)

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor | PreNormInput,
                           bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, PreNormInput):
            return dense_prenorm_linear(x, layer.weight, bias, gated=True)
        return dense_silu_and_mul_linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """Base of all linear layers.

    Args:
        in_features, out_features: this rank's shard sizes.
        bias: whether to hold a bias of ``[out_features]``.
        dtype: parameter dtype (default: torch's default dtype).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None) -> None:
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features = in_features, out_features
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.quant_method = UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, out_features, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor | PreNormInput, residual: torch.Tensor | PreNormInput | None = None
                ) -> torch.Tensor:
        """``x``: [num_tokens, in_features] (or a :class:`PreNormInput` of that
        shape) -> [num_tokens, out_features], plus ``residual`` (same shape and
        dtype as the output) if given: a pre-norm block's residual add, which
        decode rows on CUDA do in the GEMM's epilogue. A :class:`PreNormInput`
        residual adds its stream, and if it has ``want_out_sumsq`` the GEMM
        records the result rows' sums of squares in its ``out_sumsq`` where it
        can (see :func:`dense_linear`)."""
        return self.quant_method.apply(self, x, self.bias, residual)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        _copy_checked(param.data, loaded, self)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, layer: nn.Module) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{type(layer).__name__}: weight shape {tuple(src.shape)} does not match {tuple(dst.shape)}")
    dst.copy_(src)


class ReplicatedLinear(LinearBase):
    """Full weight on every rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, dtype)


class ColumnParallelLinear(LinearBase):
    """Splits the output dimension across ranks; the output stays split."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        self.full_out_features = out_features
        super().__init__(in_features, out_features // get_tp_size(), bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        shard = param.shape[0]
        _copy_checked(param.data, loaded.narrow(0, self.tp_rank * shard, shard), self)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stacked in one matmul (e.g. gate_up_proj).

    Args:
        output_sizes: full output size of each stacked projection.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, dtype: torch.dtype | None = None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype)

    def _shard_offsets(self) -> list[tuple[int, int]]:
        offsets, start = [], 0
        for size in self.output_sizes:
            offsets.append((start // self.tp_size, size // self.tp_size))
            start += size
        return offsets

    def forward_silu_and_mul(self, x: torch.Tensor | PreNormInput) -> torch.Tensor:
        """SwiGLU's gate for a gate_up projection of two equal outputs:
        ``x`` [num_tokens, in_features] (or a :class:`PreNormInput`) -> ``silu(gate) * up`` [num_tokens,
        out_features / 2] (fused into the GEMM on the decode path, see
        :func:`dense_silu_and_mul_linear`)."""
        return self.quant_method.apply_silu_and_mul(self, x, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        assert isinstance(shard_id, int), "MergedColumnParallelLinear needs an integer shard_id"
        offset, size = self._shard_offsets()[shard_id]
        _copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp_rank * size, size), self)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Q, K and V projections in one matmul; shard ids ``"q"``, ``"k"``, ``"v"``.

    Args:
        hidden_size: input size.
        head_dim: size of one head.
        num_heads, num_kv_heads: total query and key/value heads (GQA when they differ).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype | None = None):
        self.head_dim = head_dim
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        super().weight_loader(param, loaded, {"q": 0, "k": 1, "v": 2}[shard_id])


class RowParallelLinear(LinearBase):
    """Splits the input dimension across ranks; outputs are summed over ranks
    (an all-reduce, a no-op with tp_size 1)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__(in_features // get_tp_size(), out_features, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if param.dim() == 1:  # the bias is not split
            _copy_checked(param.data, loaded, self)
            return
        shard = param.shape[1]
        _copy_checked(param.data, loaded.narrow(1, self.tp_rank * shard, shard), self)
