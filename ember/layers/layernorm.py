"""RMSNorm (Zhang & Sennrich, 2019), optionally fused with the residual add."""

from __future__ import annotations

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
