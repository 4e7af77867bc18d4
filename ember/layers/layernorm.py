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

    Shapes: ``x``, ``residual``: [num_tokens, hidden]. ``normed``: the
    normalized input once materialized, else None.
    """

    x: torch.Tensor
    norm: RMSNorm
    residual: torch.Tensor | None = None
    normed: torch.Tensor | None = None
    _stream: torch.Tensor | None = None

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


def block_residual(x: torch.Tensor | PreNormInput) -> torch.Tensor | None:
    """The residual a block that takes ``x`` adds to its output: the stream of
    a :class:`PreNormInput`; None for a plain (already normalized) tensor."""
    return x.stream if isinstance(x, PreNormInput) else None
