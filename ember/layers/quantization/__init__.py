"""Quantization methods, found by name (``--quantization`` or a checkpoint's
``quantization_config.quant_method``). See :mod:`ember.layers.quantization.base`."""

from __future__ import annotations

from typing import Any

from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig

# name -> QuantizationConfig subclass. A method registers itself with
# ``register_quantization_config``; model code never names one.
QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {}


def register_quantization_config(cls: type[QuantizationConfig]) -> type[QuantizationConfig]:
    """Class decorator: make ``cls`` available under ``cls.get_name()``."""
    QUANTIZATION_METHODS[cls.get_name()] = cls
    return cls


def get_quant_config(quantization: str | None, hf_config: Any) -> QuantizationConfig | None:
    """The model's quantization config: ``quantization`` (``--quantization``)
    if given, else the checkpoint's ``hf_config.quantization_config``, else
    None (unquantized).

    A checkpoint scheme with no registered method returns None: the loader
    dequantizes the formats it knows (e.g. DeepSeek-V3's FP8 blocks, see
    :mod:`ember.loader.weight_utils`) and refuses the others.

    Raises:
        ValueError: ``--quantization`` names an unknown method, or a method
            other than the checkpoint's.
    """
    ckpt = getattr(hf_config, "quantization_config", None)
    if ckpt is not None and not isinstance(ckpt, dict):
        ckpt = ckpt.to_dict() if hasattr(ckpt, "to_dict") else dict(vars(ckpt))
    ckpt_name = (ckpt or {}).get("quant_method")
    name = quantization or ckpt_name
    if name is None:
        return None
    if quantization is not None and ckpt_name is not None and quantization != ckpt_name:
        raise ValueError(f"--quantization {quantization!r} does not match the checkpoint's "
                         f"quantization_config.quant_method {ckpt_name!r}")
    if name not in QUANTIZATION_METHODS:
        if quantization is None:
            return None
        raise ValueError(f"unknown quantization method {name!r}; known: {sorted(QUANTIZATION_METHODS)}")
    return QUANTIZATION_METHODS[name].from_config(ckpt if ckpt_name == name else {})


# The built-in methods register themselves on import (after the registry exists).
from ember.layers.quantization import int8_weight_only  # noqa: E402,F401

__all__ = ["LinearMethodBase", "QuantizationConfig", "QUANTIZATION_METHODS", "get_quant_config",
           "register_quantization_config"]
