"""Per-layer FP8 KV-cache scales: checkpoint names, validation, calibration.

An FP8 KV cache stores ``x / scale`` (saturated at the format's largest finite
value) and attention reads ``fp8 * scale``, with one float32 ``k_scale`` and
one ``v_scale`` per attention layer (:class:`~ember.layers.attention.Attention`
buffers, 1.0 unless set). They come from:

* the checkpoint, under the names FP8 checkpoints use (relative to the
  attention block, e.g. ``model.layers.3.self_attn.``): ``k_scale`` /
  ``v_scale`` (llm-compressor / compressed-tensors ``kv_cache_scheme``, HF
  ``"fp8"``), ``k_proj.output_scale`` / ``v_proj.output_scale`` (older
  compressed-tensors), ``k_proj.k_scale`` / ``v_proj.v_scale`` (NVIDIA
  ModelOpt), ``attn.k_scale`` / ``attn.v_scale``, and ``kv_scale`` (one scale
  for both, older AutoFP8 files);
* or calibration (``--calculate-kv-scales``): ``amax(|x|) / fp8_max`` over the
  first prefill step's keys (after RoPE) and values, then fixed.

Attention-activation scales that an FP8 KV cache does not use (``q_scale``,
``prob_scale``) are accepted and ignored.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Checkpoint name suffix after the attention block's prefix -> the scales it sets.
KV_SCALE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "k_scale": ("k",), "v_scale": ("v",),
    "attn.k_scale": ("k",), "attn.v_scale": ("v",),
    "k_proj.output_scale": ("k",), "v_proj.output_scale": ("v",),
    "k_proj.k_scale": ("k",), "v_proj.v_scale": ("v",),
    "kv_scale": ("k", "v"), "attn.kv_scale": ("k", "v"),
}
IGNORED_SUFFIXES = frozenset({"q_scale", "prob_scale", "attn.q_scale", "attn.prob_scale"})
_BLOCK = ".self_attn."


def match_kv_scale(name: str) -> tuple[str, tuple[str, ...]] | None:
    """``(attention block prefix, scales set)`` for a checkpoint KV-scale
    name (``("model.layers.3.self_attn", ("k",))`` for
    ``model.layers.3.self_attn.k_scale``), ``(prefix, ())`` for an attention
    scale that is ignored, None for any other name."""
    at = name.rfind(_BLOCK)
    if at < 0:
        return None
    prefix, suffix = name[:at + len(_BLOCK) - 1], name[at + len(_BLOCK):]
    if suffix in KV_SCALE_SUFFIXES:
        return prefix, KV_SCALE_SUFFIXES[suffix]
    if suffix in IGNORED_SUFFIXES:
        return prefix, ()
    return None


def check_kv_scale(name: str, tensor: torch.Tensor) -> float:
    """The value of the checkpoint scale ``name``.

    Raises:
        ValueError (naming the tensor): not a single element, not a floating
            type, or not a finite positive number.
    """
    if tensor.numel() != 1:
        raise ValueError(f"KV-cache scale {name!r} must hold one value (a per-tensor scale), "
                         f"got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"KV-cache scale {name!r} must be a floating-point tensor, got {tensor.dtype}")
    value = float(tensor.float().item())
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"KV-cache scale {name!r} must be finite and positive, got {value}")
    return value


def attention_layers_by_block(model: nn.Module) -> dict[str, nn.Module]:
    """Each KV-cache attention layer of ``model`` (modules with ``k_scale`` and
    ``v_scale`` buffers) under its parent's name, the attention block that
    checkpoints name (``model.layers.3.self_attn`` for its ``.attn``)."""
    return {name.rsplit(".", 1)[0]: m for name, m in model.named_modules()
            if "." in name and isinstance(getattr(m, "k_scale", None), torch.Tensor)
            and isinstance(getattr(m, "v_scale", None), torch.Tensor)}


def load_kv_scale(layers: dict[str, nn.Module], name: str, tensor: torch.Tensor,
                  hit: tuple[str, tuple[str, ...]]) -> bool:
    """Copy the checkpoint scale ``name`` (``hit``: its :func:`match_kv_scale`)
    into its layer's ``k_scale`` / ``v_scale``.

    Returns:
        True when a scale was set (False: an ignored attention scale).
    Raises:
        ValueError: a bad scale (see :func:`check_kv_scale`), or no attention
            layer of the model is named by it.
    """
    prefix, kinds = hit
    if not kinds:
        return False
    value = check_kv_scale(name, tensor)
    layer = layers.get(prefix)
    if layer is None:
        raise ValueError(f"checkpoint KV-cache scale {name!r} names no attention layer of the model")
    for kind in kinds:
        getattr(layer, f"{kind}_scale").fill_(value)
    return True


@torch.no_grad()
def calibrate_kv_scales(layer: nn.Module, key: torch.Tensor, value: torch.Tensor, fp8_max: float) -> None:
    """Set ``layer.k_scale`` / ``layer.v_scale`` to ``amax(|key|) / fp8_max``
    and ``amax(|value|) / fp8_max`` (on the device, no host sync); an all-zero
    input keeps a scale of 1.0.

    Args:
        key, value: [num_tokens, ...] the step's new keys (after RoPE) and values.
        fp8_max: the cache format's largest finite value (448 for e4m3).
    """
    for x, scale in ((key, layer.k_scale), (value, layer.v_scale)):
        amax = x.abs().amax().float() if x.numel() else torch.zeros((), device=scale.device)
        scale.copy_(torch.where(amax > 0, amax / fp8_max, torch.ones_like(amax)))
