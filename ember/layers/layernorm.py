"""RMSNorm (Zhang & Sennrich, 2019), optionally fused with the residual add,
and :class:`PreNormInput`, a pre-norm block's input whose norm the consuming
projection may fold into its GEMM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight``, computed in float32.

    Args:
        hidden_size: size of the last dimension.
        eps: added to the mean square.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype or torch.get_default_dtype()), requires_grad=False)
        self.eps = eps
        # True once :func:`fold_norm_weight` moved the weight into the consuming
        # projection (the weight is then all ones).
        self.weight_in_next = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x``: [num_tokens, hidden], or [num_tokens, num_heads, head_dim] for
        per-head norms (Qwen3's q/k norm; no ``residual`` then). With
        ``residual``, first ``x += residual`` and return ``(norm(x), x)`` so the
        sum becomes the next residual. On CUDA one fused Triton kernel does all
        of it."""
        if x.is_cuda and (x.dim() == 2 or residual is None):
            from ember.kernels.triton_ops import rms_norm

            if x.dim() == 2:
                return rms_norm(x, self.weight, self.eps, residual)
            # One row per head (reshape copies a strided view, e.g. q sliced from qkv).
            return rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


@dataclass(eq=False)
class PreNormInput:
    """A pre-norm block's input before its RMSNorm: stands for ``norm(s)``, where
    ``s = x + residual`` (``x`` when ``residual`` is None) is the residual
    stream, so that the projection consuming it can fold the norm into its GEMM
    (decode rows on CUDA, when the stream is a single tensor:
    :func:`ember.kernels.triton_gemm.skinny_rms_norm_linear`, one kernel less
    per norm) or else compute it (:meth:`materialize`, with the add fused into
    the norm kernel).

    Linear layers accept it in place of a tensor (``LinearBase.forward``,
    ``MergedColumnParallelLinear.forward_silu_and_mul``). A decoder layer hands
    it only to sub-modules that declare ``takes_prenorm_input = True``: their
    first use of the input is such a projection, and they return the block's
    output with the stream already added (:func:`block_residual`, by their last
    projection's epilogue).

    The GEMM that wrote ``x`` may also have returned its rows' sums of squares
    as partial sums (``sumsq``, decode rows on CUDA); the consuming projection
    then folds the norm without computing them. Likewise, with
    ``want_out_sumsq``, the block's last projection, adding the stream
    (:func:`block_residual`), records the partial sums of the stream it returns
    in ``out_sumsq`` for the next block.

    Shapes: ``x``, ``residual``: [num_tokens, hidden]. ``normed``: the
    normalized input once materialized, else None. ``sumsq``, ``out_sumsq``:
    [P, 16] float32 (see :func:`ember.kernels.triton_gemm.skinny_linear`) or None.
    """

    x: torch.Tensor
    norm: RMSNorm
    residual: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    normed: torch.Tensor | None = None
    _stream: torch.Tensor | None = None
    want_out_sumsq: bool = False
    out_sumsq: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        """The normalized input [num_tokens, hidden] (computed once, by the RMSNorm module)."""
        if self.normed is None:
            if self.residual is None:
                self.normed, self._stream = self.norm(self.x), self.x
            else:
                self.normed, self._stream = self.norm(self.x, self.residual)
        return self.normed

    @property
    def stream(self) -> torch.Tensor:
        """The residual stream ``x + residual`` [num_tokens, hidden] (computed by
        :meth:`materialize` when there is a residual)."""
        if self.residual is None:
            return self.x
        self.materialize()
        return self._stream


def block_residual(x: torch.Tensor | PreNormInput) -> PreNormInput | None:
    """What a block that takes ``x`` hands its last projection as the residual:
    a :class:`PreNormInput` itself (the projection adds its ``stream`` and, if
    it has ``want_out_sumsq``, records the result's sums of squares in its
    ``out_sumsq`` where it can); None for a plain (already normalized) tensor."""
    return x if isinstance(x, PreNormInput) else None


def fold_norm_weight(norm: RMSNorm, weight: torch.Tensor) -> None:
    """Multiply ``norm``'s weight into the columns of ``weight`` [N, K], the
    one projection that consumes the norm, and make the norm's weight ones:
    ``(norm(x) * g) @ W.T == norm(x) @ (W * g).T``, rounded once in the weight
    instead of in every normalized row. A fold of that norm into the GEMM
    (:func:`ember.kernels.triton_gemm.skinny_rms_norm_linear` with the sums of
    squares given) then runs the plain GEMM's K loop.

    Raises:
        ValueError: ``weight``'s columns do not match the norm, or the norm was
            folded already.
    """
    if norm.weight_in_next:
        raise ValueError("fold_norm_weight: this norm's weight was folded already")
    if weight.dim() != 2 or weight.shape[1] != norm.weight.shape[0]:
        raise ValueError(f"fold_norm_weight: weight {tuple(weight.shape)} does not take the norm's "
                         f"{norm.weight.shape[0]} features")
    weight.mul_(norm.weight.to(weight.dtype))
    norm.weight.fill_(1)
    norm.weight_in_next = True
