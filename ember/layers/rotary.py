"""Rotary position embedding (RoPE; Su et al., 2021, "RoFormer") and the
``rope_scaling`` recipes that stretch it to longer contexts.

Two layouts: "rotate half" (GPT-NeoX; HF Llama/Qwen checkpoints) rotates the
pair ``(x[i], x[i + d/2])``; interleaved (GPT-J; DeepSeek's ``rope_interleave``)
rotates ``(x[2i], x[2i + 1])``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
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


# A recipe maps (base, rotary_dim, scaling, max_position) to the inverse
# frequencies [rotary_dim // 2] float32 and the factor that multiplies cos/sin.
RopeRecipe = Callable[[float, int, dict[str, Any], int], tuple[torch.Tensor, float]]


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _default(base: float, dim: int, scaling: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(base, dim), 1.0


def _linear(base: float, dim: int, scaling: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al., 2023): positions divided by ``factor``."""
    return _base_inv_freq(base, dim) / float(scaling["factor"]), 1.0


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen) - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, mid, out)


def _llama3(base: float, dim: int, scaling: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """Meta's Llama 3.1 frequency-dependent scaling (meta-llama/llama-models,
    ``apply_scaling``): long wavelengths divided by ``factor``, short ones kept,
    a smooth blend in between."""
    return _llama3_scale(_base_inv_freq(base, dim), scaling), 1.0


def _dynamic(base: float, dim: int, scaling: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """Dynamic NTK scaling (bloc97/emozilla; HF ``_compute_dynamic_ntk_parameters``):
    the base grows with the sequence length ``L`` once it passes the trained
    length ``L0``: ``base * (factor * L / L0 - (factor - 1)) ** (dim / (dim - 2))``.

    NOTE: evaluated once at ``L = max_position`` (the longest position Ember
    serves, capped at ``L0 = max_position_embeddings``), which is HF's result for
    every sequence that fits the trained context: plain RoPE.
    """
    factor = float(scaling["factor"])
    trained = int(scaling.get("original_max_position_embeddings") or max_position)
    seq_len = max(max_position, trained)
    base = base * ((factor * seq_len / trained) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim), 1.0


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 when
    ``scale <= 1``); Peng et al., 2023, "YaRN", eq. 22, as DeepSeek-V2 spells it."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_range(scaling: dict[str, Any], dim: int, base: float) -> tuple[float, float]:
    """Dimensions below ``low`` keep their frequency, above ``high`` are fully
    interpolated (YaRN's "NTK-by-parts" ramp from ``beta_fast``/``beta_slow`` rotations)."""
    old_len = scaling["original_max_position_embeddings"]

    def dim_of(num_rotations: float) -> float:
        return (dim * math.log(old_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn(base: float, dim: int, scaling: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al., 2023), as HF ``_compute_yarn_parameters`` computes it:
    interpolated and extrapolated frequencies blended by a linear ramp over the
    dimensions, and cos/sin multiplied by ``attention_factor`` (default
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are
    given, as DeepSeek-V2/V3 configs do, else ``mscale(factor)``)."""
    old_len = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position / old_len
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    low, high = _yarn_correction_range(scaling, dim, base)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


_ROPE_RECIPES: dict[str, RopeRecipe] = {
    "default": _default,
    "linear": _linear,
    "llama3": _llama3,
    "dynamic": _dynamic,
    "yarn": _yarn,
}


def rope_inv_freq(base: float, rotary_dim: int, scaling: dict[str, Any] | None,
                  max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rotary_dim // 2]`` float32 and the cos/sin
    multiplier (``attention_factor``; 1 except for YaRN) of a ``rope_scaling``
    recipe (see the ``_ROPE_RECIPES`` registry: default, linear, llama3, dynamic, yarn).

    Raises:
        NotImplementedError: any other rope type (e.g. longrope).
    """
    scaling = scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind not in _ROPE_RECIPES:
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported yet; "
                                  f"supported: {sorted(_ROPE_RECIPES)}")
    return _ROPE_RECIPES[kind](base, rotary_dim, scaling, max_position)


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """The ``default`` / ``linear`` / ``llama3`` recipes applied to given
    inverse frequencies (the recipes that only rescale them).

    Raises:
        NotImplementedError: a recipe that also changes the base or cos/sin
            (dynamic, yarn: use :func:`rope_inv_freq`) or an unknown one.
    """
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise NotImplementedError(f"scaled_inv_freq cannot apply rope_scaling type {kind!r}; use rope_inv_freq")


def rope_softmax_scale_factor(scaling: dict[str, Any] | None) -> float:
    """Multiplier of the attention softmax scale that DeepSeek-V2/V3 apply with
    YaRN: ``mscale(factor, mscale_all_dim) ** 2`` when ``mscale_all_dim`` is set
    (DeepSeek-V2 reference ``DeepseekV2Attention``; HF ``yarn_apply_mscale``), else 1."""
    scaling = scaling or {}
    mscale_all_dim = scaling.get("mscale_all_dim", 0)
    if scaling.get("rope_type", "default") == "default" or not mscale_all_dim:
        return 1.0
    return yarn_get_mscale(float(scaling["factor"]), float(mscale_all_dim)) ** 2


def scaled_context_len(max_position: int, scaling: dict[str, Any] | None) -> int:
    """Positions a RoPE with ``scaling`` serves: ``max_position``, or for YaRN
    ``original_max_position_embeddings * factor`` when larger (as vLLM derives
    it; e.g. Qwen2.5's 32768 * 4 = 131072 while its config says 32768)."""
    scaling = scaling or {}
    if scaling.get("rope_type") != "yarn" or not scaling.get("factor"):
        return max_position
    return max(max_position, int(scaling["original_max_position_embeddings"] * float(scaling["factor"])))


def rope_context_len(config: Any) -> int:
    """The longest context an HF config's model serves (default 2048 when it
    gives no ``max_position_embeddings``), see :func:`scaled_context_len`."""
    max_position = int(getattr(config, "max_position_embeddings", 0) or 2048)
    return scaled_context_len(max_position, rope_parameters(config)[1])


class RotaryEmbedding(nn.Module):
    """Applies RoPE to query and key.

    Args:
        head_dim: size of one head.
        rotary_dim: leading dims of each head that rotate (== head_dim for Llama/Qwen2).
        max_position: the model's ``max_position_embeddings``; the cos/sin
            cache covers :func:`scaled_context_len` positions.
        base: rope_theta.
        scaling: a ``rope_scaling`` dict (see :func:`rope_inv_freq`), or None.
        is_neox_style: True for "rotate half", False for interleaved pairs
            (the rotated pairs then come out de-interleaved, ``[evens | odds]``,
            as HF ``apply_rotary_pos_emb_interleave``; q and k get the same
            permutation so their dot products are unchanged).
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, base: float,
                 scaling: dict[str, Any] | None = None, is_neox_style: bool = True) -> None:
        super().__init__()
        self.head_dim, self.rotary_dim, self.is_neox_style = head_dim, rotary_dim, is_neox_style
        inv_freq, attention_factor = rope_inv_freq(base, rotary_dim, scaling, max_position)
        t = torch.arange(scaled_context_len(max_position, scaling), dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_position, rotary_dim / 2]
        # float32 cache: [max_position, rotary_dim] = cos halves | sin halves
        cache = torch.cat([freqs.cos() * attention_factor, freqs.sin() * attention_factor], dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions``: [n] int64; ``query``: [n, num_heads * head_dim] (or
        [n, num_heads, head_dim]); ``key`` likewise with its own head count.
        Returns rotated copies, same shapes (on CUDA, 2-D neox-style inputs are
        rotated in place by one fused kernel and returned)."""
        if query.is_cuda and self.is_neox_style and query.dim() == 2 and query.stride(1) == key.stride(1) == 1:
            from ember.kernels.triton_ops import rotary_embedding_

            rotary_embedding_(positions, query, key, self.cos_sin_cache, self.head_dim, self.rotary_dim)
            return query, key
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape, n = x.shape, x.shape[0]
        x = x.reshape(n, -1, self.head_dim)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        if self.is_neox_style:
            x1, x2 = rot.float().chunk(2, dim=-1)
        else:
            x1, x2 = rot[..., 0::2].float(), rot[..., 1::2].float()
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        if rest.shape[-1]:
            out = torch.cat([out, rest], dim=-1)
        return out.reshape(shape)


def get_rope(head_dim: int, rotary_dim: int, max_position: int, base: float,
             scaling: dict[str, Any] | None = None, is_neox_style: bool = True) -> RotaryEmbedding:
    """A RotaryEmbedding shared by every layer that asks for the same settings
    on the same device: its cos/sin cache ([max_position, rotary_dim] float32,
    64 MiB at 128k positions) is then built once per model, not once per layer."""
    key = tuple(sorted((scaling or {}).items(), key=lambda kv: kv[0]))
    return _cached_rope(head_dim, rotary_dim, max_position, float(base), _freeze(key), is_neox_style,
                        torch.get_default_device())


def _freeze(items: tuple) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in items)


@functools.lru_cache(maxsize=32)
def _cached_rope(head_dim: int, rotary_dim: int, max_position: int, base: float, scaling: tuple,
                 is_neox_style: bool, device: torch.device) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, rotary_dim, max_position, base, dict(scaling), is_neox_style)
