"""The quantization seam: what a quantization method implements.

A linear layer (and the LM head) holds a ``quant_method``: a
:class:`LinearMethodBase` that creates the layer's parameters in its storage
format, turns the loaded checkpoint tensors into the form its kernel wants
once after loading, and computes ``y = x @ W.T + b``. Which method a layer
gets is decided by the model's :class:`QuantizationConfig` (from the
checkpoint's ``quantization_config`` or ``--quantization``), given the layer's
checkpoint name (``prefix``), so a config can leave some layers unquantized.
The design follows vLLM's ``QuantizationConfig`` / ``LinearMethodBase``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn


class LinearMethodBase(ABC):
    """How one linear layer stores its weight and computes its product."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        """Register the layer's parameters (e.g. ``weight``, scales) on ``layer``.

        Args:
            layer: the linear layer; parameters are set as its attributes, and
                each may carry a ``weight_loader`` attribute of its own where the
                layer's default sharded copy does not fit its layout.
            input_size_per_partition: this rank's input features (K).
            output_partition_sizes: this rank's output features of each stacked
                projection (one entry for a plain layer; q/k/v or gate/up for
                merged ones); their sum is N.
            input_size, output_size: the full (unsharded) sizes.
            params_dtype: the model's activation dtype.
        """

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded tensors into the kernel's layout (repack, transpose,
        compute scales). Called once per layer after every weight is loaded."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [num_tokens, K] (activation dtype) -> ``x @ W.T + bias``
        [num_tokens, N] in ``x``'s dtype."""


M = TypeVar("M")


def quant_method_for(quant_config: QuantizationConfig | None, layer: nn.Module, prefix: str,
                     default: Callable[[], M]) -> Any:
    """The method a layer holds: ``quant_config``'s for ``layer`` (checkpoint
    name ``prefix``), or ``default()`` when there is no config or it leaves the
    layer unquantized."""
    method = quant_config.get_quant_method(layer, prefix) if quant_config is not None else None
    return method if method is not None else default()


class QuantizationConfig(ABC):
    """A checkpoint's (or ``--quantization``'s) quantization scheme."""

    #: True when the checkpoint stores this scheme (FP8 weights and scales,
    #: packed integers): the loader then yields tensors as stored, neither
    #: dequantized nor cast, and the methods' parameters take them as they are.
    #: False for a method that quantizes a floating-point checkpoint at load.
    raw_checkpoint: bool = False

    @classmethod
    @abstractmethod
    def get_name(cls) -> str:
        """The name ``--quantization`` and ``quantization_config.quant_method`` use."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """Build from a checkpoint's ``quantization_config`` dict ({} for an
        online method chosen by ``--quantization``).

        Raises:
            ValueError: the dict does not describe a scheme this method runs.
        """

    def describe(self) -> str:
        """The scheme in words, for errors (default: its name)."""
        return self.get_name()

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """The method for ``layer`` (checkpoint name ``prefix``), or None to
        leave it unquantized."""

    def get_dense_weight_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """The method for a layer whose ``weight`` the model reads directly
        (not only through ``apply``; see :func:`dense_weight`): it loads the
        checkpoint's tensors for that layer and leaves ``layer.weight`` [N, K]
        in the model dtype after ``process_weights_after_loading``. None (the
        default): the layer is unquantized, right for methods that quantize a
        floating-point checkpoint at load; a method whose checkpoints store
        such a layer quantized overrides this."""
        return None


class _DenseWeightConfig(QuantizationConfig):
    """``quant_config`` as seen by a layer whose weight must stay dense (see
    :func:`dense_weight`)."""

    def __init__(self, inner: QuantizationConfig) -> None:
        self.inner = inner

    @property
    def raw_checkpoint(self) -> bool:  # type: ignore[override]
        return self.inner.raw_checkpoint

    @classmethod
    def get_name(cls) -> str:
        return "dense_weight"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        raise ValueError("dense_weight wraps a model's quantization config; it is not a checkpoint scheme")

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        return self.inner.get_dense_weight_method(layer, prefix)


def dense_weight(quant_config: QuantizationConfig | None) -> QuantizationConfig | None:
    """The config to give a layer whose ``weight`` [N, K] the model reads
    directly in the model dtype (e.g. MLA's ``kv_b_proj``, split into W_UK /
    W_UV by the absorbed decode): such a layer loads a quantized checkpoint's
    tensors and is dequantized once after loading
    (:meth:`QuantizationConfig.get_dense_weight_method`), or stays
    unquantized."""
    return None if quant_config is None else _DenseWeightConfig(quant_config)
