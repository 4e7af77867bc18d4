"""Tiny compressed-tensors checkpoints written by the compressed-tensors
library itself, as llm-compressor writes them: the scheme applied to an HF
model (``apply_quantization_config``), min-max weight scales and (for static
activations) calibrated input scales from ``calculate_qparams``, then
``ModelCompressor.compress_model`` and ``update_config`` around
``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                             apply_quantization_config)
from compressed_tensors.quantization.utils import calculate_qparams
from transformers import PreTrainedModel

from tests.models.tiny import make_prompts, save_tiny


def _minmax(t: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-strategy min and max of a weight [N, K] (shaped as the library's scales)."""
    if args.strategy == "channel":
        return t.amin(dim=1, keepdim=True), t.amax(dim=1, keepdim=True)
    if args.strategy == "group":
        g = t.reshape(t.shape[0], -1, args.group_size)
        return g.amin(dim=-1), g.amax(dim=-1)
    if args.strategy == "tensor":
        return t.min().reshape(1), t.max().reshape(1)
    raise ValueError(f"no min-max observer here for strategy {args.strategy}")


def _calibrate_inputs(model: PreTrainedModel, modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Min and max of every quantized module's input over a few prompts (the
    static_minmax observer), with quantization off."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in modules.items():
        def hook(mod, args, name=name):
            x = args[0].detach()
            lo, hi = x.min().reshape(1), x.max().reshape(1)
            if name in seen:
                lo, hi = torch.minimum(lo, seen[name][0]), torch.maximum(hi, seen[name][1])
            seen[name] = [lo, hi]
        hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for p in make_prompts():
            model(input_ids=torch.tensor([p]))
    for h in hooks:
        h.remove()
    return seen


def save_compressed(model: PreTrainedModel, scheme: QuantizationScheme | str, path: Path,
                    ignore: list[str] | None = None) -> str:
    """Quantize ``model`` (in place) with ``scheme`` (a QuantizationScheme or a
    preset name such as ``"W8A8"``, targeting ``Linear``) and save it, compressed,
    with a tiny tokenizer into ``path``. Returns the path."""
    groups = {"group_0": scheme} if isinstance(scheme, QuantizationScheme) else {scheme: ["Linear"]}
    config = QuantizationConfig(config_groups=groups, ignore=["lm_head"] if ignore is None else ignore)
    static_inputs = None
    if any(s.input_activations is not None and s.input_activations.dynamic is False
           for s in config.config_groups.values()):
        plain = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        static_inputs = _calibrate_inputs(model, plain)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for name, m in model.named_modules():
            scheme_ = getattr(m, "quantization_scheme", None)
            if scheme_ is None:
                continue
            lo, hi = _minmax(m.weight, scheme_.weights)
            scale, zp = calculate_qparams(lo, hi, scheme_.weights)
            m.weight_scale.data = scale.to(m.weight_scale.dtype)
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data = zp.to(m.weight_zero_point.dtype)
            args = scheme_.input_activations
            if args is not None and args.dynamic is False:
                scale, zp = calculate_qparams(*static_inputs[name], args)
                m.input_scale.data = scale.to(m.input_scale.dtype)
                if hasattr(m, "input_zero_point"):
                    m.input_zero_point.data = zp.to(m.input_zero_point.dtype)
            m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    save_tiny(model, path)
    compressor.update_config(str(path))
    return str(path)


def library_dequantized_model(path: str) -> PreTrainedModel:
    """The checkpoint at ``path`` as a plain float32 HF model whose quantized
    weights are the compressed-tensors library's own decompression of the
    stored tensors (``BaseCompressor.decompress`` of each module's state dict
    under its scheme's format): the reference where HF transformers' loader
    cannot read a format (e.g. packed asymmetric zero points)."""
    import json

    from compressed_tensors.compressors import BaseCompressor
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    qconfig = QuantizationConfig.model_validate(json.load(open(f"{path}/config.json"))["quantization_config"])
    (scheme,) = qconfig.config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(scheme.format or qconfig.format)
    stored = load_file(f"{path}/model.safetensors")
    modules = {name.rsplit(".", 1)[0] for name in stored if name.endswith("weight_scale")}
    state = {n: t for n, t in stored.items() if n.rsplit(".", 1)[0] not in modules}
    for module in modules:
        local = {n[len(module) + 1:]: t for n, t in stored.items() if n.rsplit(".", 1)[0] == module}
        state[f"{module}.weight"] = compressor.decompress(local, scheme)["weight"].float()
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(state)
    return model
