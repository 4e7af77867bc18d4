"""Model registry: architecture name (HF ``config.architectures[0]``) -> class,
imported lazily. Every class is built as ``cls(hf_config, attn_backend,
quant_config=None)`` and names its layers by their checkpoint names
(``prefix``), so a quantization config can choose per layer."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("ember.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("ember.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("ember.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("ember.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("ember.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "DeepseekV3ForCausalLM": ("ember.models.deepseek_v3", "DeepseekV3ForCausalLM"),
}

# Architectures whose checkpoints carry multi-token-prediction layers -> the
# MTP module (speculative_config method "mtp").
_MTP_MODELS: dict[str, tuple[str, str]] = {
    "DeepseekV3ForCausalLM": ("ember.models.deepseek_mtp", "DeepseekV3MTP"),
}


class ModelRegistry:
    @staticmethod
    def supported() -> list[str]:
        return sorted(_MODELS)

    @staticmethod
    def resolve(hf_config: Any) -> str:
        """The registered architecture of ``hf_config``.

        Raises:
            UnsupportedArchitectureError: none of its architectures is registered.
        """
        from ember.loader import UnsupportedArchitectureError

        archs = list(getattr(hf_config, "architectures", None) or [])
        for arch in archs:
            if arch in _MODELS:
                return arch
        raise UnsupportedArchitectureError(
            f"unsupported model architecture {archs or '(none given)'}; Ember supports {ModelRegistry.supported()}")

    @staticmethod
    def load_class(architecture: str) -> type[nn.Module]:
        module, cls = _MODELS[architecture]
        return getattr(importlib.import_module(module), cls)

    @staticmethod
    def mtp_architectures() -> list[str]:
        """The architectures with an MTP module (speculative method ``"mtp"``)."""
        return sorted(_MTP_MODELS)

    @staticmethod
    def load_mtp_class(architecture: str) -> type[nn.Module]:
        """The MTP module class of ``architecture`` (see :meth:`mtp_architectures`)."""
        module, cls = _MTP_MODELS[architecture]
        return getattr(importlib.import_module(module), cls)
