"""Rotary position embedding (RoPE; Su et al., 2021, "RoFormer"), in the
"rotate half" (GPT-NeoX) layout that HF Llama/Qwen2 checkpoints use."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_parameters(config: Any) -> tuple[float, dict[str, Any]]:
    """``(rope_theta, scaling)`` of an HF config, whichever way it spells them
    (transformers >= 5 ``rope_parameters``; older ``rope_theta`` + ``rope_scaling``).
    ``scaling`` is empty for plain RoPE."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or legacy.get("rope_theta") or 10000.0)
    scaling = {**legacy, **params}
    scaling.pop("rope_theta", None)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), ({} if kind == "default" else {**scaling, "rope_type": kind})


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Apply a ``rope_scaling`` recipe to the inverse frequencies.

    ``linear``: positions divided by ``factor`` (Chen et al., 2023, position
    interpolation). ``llama3``: Meta's Llama 3.1 frequency-dependent scaling
    (reference code in meta-llama/llama-models, ``apply_scaling``).

    Raises:
        NotImplementedError: any other rope type.
    """
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - low) / (high - low)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(is_mid, mid, out)
    raise NotImplementedError(f"rope_scaling type {kind!r} is not supported yet")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to query and key.

    Args:
        head_dim: size of one head.
        rotary_dim: leading dims of each head that rotate (== head_dim for Llama/Qwen2).
        max_position: longest position the cos/sin cache covers.
        base: rope_theta.
        scaling: a ``rope_scaling`` dict (see :func:`scaled_inv_freq`), or None.
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, base: float,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        inv_freq = scaled_inv_freq(inv_freq, scaling or {})
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_position, rotary_dim / 2]
        # float32 cache: [max_position, rotary_dim] = cos halves | sin halves
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions``: [n] int64; ``query``: [n, num_heads * head_dim];
        ``key``: [n, num_kv_heads * head_dim]. Returns rotated copies, same shapes."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        return self._apply(query, cos, sin), self._apply(key, cos, sin)

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.view(n, -1, self.head_dim)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        x1, x2 = rot.float().chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        if rest.shape[-1]:
            out = torch.cat([out, rest], dim=-1)
        return out.reshape(n, -1)
