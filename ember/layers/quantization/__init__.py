"""Quantization methods, found by name (``--quantization`` or a checkpoint's
``quantization_config.quant_method``). See :mod:`ember.layers.quantization.base`."""

from __future__ import annotations

import importlib
from typing import Any

from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig

# name -> (module, QuantizationConfig subclass), imported on first use; model
# code never names a method. A new method is one module plus one line here.
QUANTIZATION_METHODS: dict[str, tuple[str, str]] = {
    "int8_weight_only": ("ember.layers.quantization.int8_weight_only", "Int8WeightOnlyConfig"),
    "fp8": ("ember.layers.quantization.fp8", "Fp8Config"),
    "gguf": ("ember.layers.quantization.gguf", "GGUFConfig"),
}


def get_quantization_config_class(name: str) -> type[QuantizationConfig]:
    """The :class:`QuantizationConfig` subclass registered as ``name``.

    Raises:
        ValueError: no method has that name.
    """
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization method {name!r}; known: {sorted(QUANTIZATION_METHODS)}")
    module, cls = QUANTIZATION_METHODS[name]
    return getattr(importlib.import_module(module), cls)


def get_quant_config(quantization: str | None, hf_config: Any) -> QuantizationConfig | None:
    """The model's quantization config: ``quantization`` (``--quantization``)
    if given, else the checkpoint's ``hf_config.quantization_config``, else
    None (unquantized).

    A checkpoint scheme with no registered method returns None: the loader
    dequantizes the formats it knows (FP8 block weights with
    ``weight_scale_inv``, see :mod:`ember.loader.weight_utils`) and refuses
    the others. FP8 checkpoints (``quant_method: "fp8"``) run in FP8.

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
    if name not in QUANTIZATION_METHODS and quantization is None:
        return None
    config_class = get_quantization_config_class(name)
    if ckpt_name != name and hasattr(config_class, "from_hf_config"):
        # A method that reads what it runs from the model's config itself
        # (gguf: the tensor types the GGUF loader recorded).
        return config_class.from_hf_config(hf_config)
    return config_class.from_config(ckpt if ckpt_name == name else {})


__all__ = ["LinearMethodBase", "QuantizationConfig", "QUANTIZATION_METHODS", "get_quant_config",
           "get_quantization_config_class"]
