"""Load errors that name the tensor and the quantization scheme.

Two mistakes a checkpoint can hold, whatever the method:

- a parameter the model's scheme needs is not in the checkpoint (e.g. FP8
  weight scales missing): :func:`missing_weights_message` names each such
  parameter with the scheme of the layer that owns it;
- a checkpoint tensor has no parameter to go to, because it belongs to a
  quantization scheme the model was not built with (typically a quantized
  checkpoint whose ``config.json`` lost its ``quantization_config``):
  :func:`unexpected_weight_message` names the tensor and suggests the scheme
  its name (and dtype) belongs to.

The tensor names follow each format's own layout: AutoAWQ and AutoGPTQ
(``qweight``, ``qzeros``, ``scales``, ``g_idx``), HF transformers' ``fp8``
(``weight_scale_inv`` for block scales, ``weight_scale`` / ``input_scale``),
compressed-tensors (``weight_packed``, ``weight_shape``, ``weight_zero_point``,
``weight_g_idx``) and FP8 KV-cache scales (``k_scale``, ``v_scale``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Checkpoint-name suffix -> (schemes that store it, what it is).
_QUANTIZED_SUFFIXES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (".qweight", ("awq", "gptq"), "int32-packed 4-bit weights"),
    (".qzeros", ("awq", "gptq"), "int32-packed zero points"),
    (".scales", ("awq", "gptq"), "per-group weight scales"),
    (".g_idx", ("gptq",), "GPTQ group indices"),
    (".weight_scale_inv", ("fp8",), "FP8 block weight scales"),
    (".weight_packed", ("compressed-tensors",), "packed 4-bit weights"),
    (".weight_shape", ("compressed-tensors",), "the unpacked weight shape"),
    (".weight_zero_point", ("compressed-tensors",), "weight zero points"),
    (".weight_g_idx", ("compressed-tensors",), "group indices"),
    (".weight_scale", ("fp8", "compressed-tensors", "w8a8_int8"), "weight scales"),
    (".input_scale", ("fp8", "compressed-tensors"), "static activation scales"),
    (".k_scale", (), "FP8 KV-cache scales (kv_cache_dtype fp8)"),
    (".v_scale", (), "FP8 KV-cache scales (kv_cache_dtype fp8)"),
)

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantized_tensor_schemes(name: str, tensor: torch.Tensor | None = None) -> tuple[tuple[str, ...], str] | None:
    """The quantization schemes a checkpoint tensor belongs to, from its name
    (and dtype: an FP8 or int8 ``weight``), with what the tensor is; None for a
    name no scheme uses.

    Args:
        name: the checkpoint name, e.g. ``model.layers.0.mlp.down_proj.qweight``.
        tensor: the tensor, if at hand.
    """
    for suffix, schemes, what in _QUANTIZED_SUFFIXES:
        if name.endswith(suffix):
            return schemes, what
    if tensor is not None and name.endswith(".weight"):
        if tensor.dtype in _FP8_DTYPES:
            return ("fp8",), "FP8 weights"
        if tensor.dtype == torch.int8:
            return ("w8a8_int8", "compressed-tensors"), "int8 weights"
    return None


def _is_unquantized(method: Any) -> bool:
    # UnquantizedLinearMethod (linear layers, embeddings, LM head), UnquantizedFusedMoEMethod.
    return type(method).__name__.startswith("Unquantized")


def _owner(model: nn.Module, param_name: str) -> nn.Module | None:
    try:
        return model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
    except AttributeError:
        return None


def param_scheme(model: nn.Module, param_name: str, scheme: str | None) -> str:
    """The scheme parameter ``param_name`` of ``model`` is stored in:
    ``scheme`` (the model's quantization method name) when the owning layer
    runs a quantized method, else ``"unquantized"``."""
    method = getattr(_owner(model, param_name), "quant_method", None)
    if scheme is None or method is None or _is_unquantized(method):
        return "unquantized"
    return scheme


def missing_weights_message(model_path: str, model: nn.Module, missing: set[str], scheme: str | None,
                            limit: int = 8) -> str:
    """``checkpoint PATH lacks weights for: NAME (SCHEME), ...``: the first
    ``limit`` missing parameters (sorted), each with its scheme (see
    :func:`param_scheme`), and how many are missing in all."""
    names = sorted(missing)
    listed = ", ".join(f"{n} ({param_scheme(model, n, scheme)})" for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"checkpoint {model_path} lacks weights for: {listed}{more}"


def unexpected_weight_message(model: nn.Module, name: str, tensor: torch.Tensor) -> str:
    """The error for checkpoint tensor ``name`` that matches no parameter of
    ``model``: when its name or dtype belongs to a quantization scheme, the
    scheme and how to load the checkpoint with it."""
    msg = f"checkpoint weight {name!r} has no matching parameter in {type(model).__name__}"
    found = quantized_tensor_schemes(name, tensor)
    if found is None:
        return msg
    schemes, what = found
    quantized = any(not _is_unquantized(m.quant_method) for m in model.modules() if hasattr(m, "quant_method"))
    built = "built with another quantization method" if quantized else "loaded unquantized"
    if not schemes:
        return (f"{msg}: it holds {what}, which this model does not take ({built}); "
                f"run with --kv-cache-dtype fp8 to use them")
    names = " or ".join(repr(s) for s in schemes)
    return (f"{msg}: it holds {what} of a {names} quantized checkpoint, but the model is {built}; "
            f"the checkpoint's config.json needs the quantization_config it was saved with "
            f"(quant_method {names})")


# Checkpoint schemes the loader dequantizes by itself when no method is
# registered under their name: block-scaled FP8 (DeepSeek-V3's layout, see
# ember.loader.weight_utils).
DEQUANTIZED_AT_LOAD = frozenset({"fp8"})


def checkpoint_quant_method(hf_config: Any) -> str | None:
    """``hf_config.quantization_config``'s ``quant_method`` (a dict or a
    transformers quantization config object), or None when absent."""
    ckpt = getattr(hf_config, "quantization_config", None)
    if ckpt is None:
        return None
    if not isinstance(ckpt, dict):
        ckpt = ckpt.to_dict() if hasattr(ckpt, "to_dict") else dict(vars(ckpt))
    return ckpt.get("quant_method")


def unsupported_scheme_message(hf_config: Any) -> str | None:
    """Why a checkpoint cannot load when no quantization method was found for
    it: its ``quant_method`` names a scheme that no registered method runs and
    the loader does not dequantize. None when the checkpoint is unquantized or
    the loader dequantizes its scheme."""
    from ember.layers.quantization import QUANTIZATION_METHODS

    scheme = checkpoint_quant_method(hf_config)
    if scheme is None or scheme in DEQUANTIZED_AT_LOAD or scheme in QUANTIZATION_METHODS:
        return None
    return (f"the checkpoint's quantization_config.quant_method {scheme!r} is not supported "
            f"(quantization methods: {sorted(QUANTIZATION_METHODS)})")
