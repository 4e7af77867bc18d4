"""Activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate (Shazeer, 2020): ``[..., 2d] -> silu(x[..., :d]) * x[..., d:]``."""
    if x.is_cuda and x.dim() == 2:
        from ember.kernels.triton_ops import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(x)  # one fused kernel instead of three
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
