"""Int8 weight-only quantization (W8A16), done online at load.

``--quantization int8_weight_only`` (the name torchao gives the same scheme)
loads an ordinary floating-point checkpoint and, once every weight of a
linear layer is in, replaces its weight with int8 values and one float32
scale per output channel (symmetric, round to nearest):

    scale[n] = max_k |W[n, k]| / 127,    q[n, k] = round(W[n, k] / scale[n])

so ``|W - q * scale| <= scale / 2`` elementwise. Activations stay in the model
dtype; ``apply`` computes ``x @ (q * scale).T + b`` in plain PyTorch (a
reference path that halves weight memory, not a fast kernel). Only linear
layers are quantized; the vocabulary embedding, the LM head and MoE experts
keep their dtype.

With tensor parallelism each rank quantizes its own shard: a column-parallel
shard holds whole output channels (the same scales as one device); a
row-parallel shard's scales cover its part of K only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.linear import LinearBase, UnquantizedLinearMethod
from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig

INT8_MAX = 127


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization.

    Args:
        weight: [N, K] floating point.

    Returns:
        ``(q, scale)``: q [N, K] int8 in [-127, 127], scale [N] float32 with
        ``weight ~= q * scale[:, None]`` (an all-zero row gets scale 1 and
        zeros).
    """
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8WeightOnlyLinearMethod(LinearMethodBase):
    """A layer's weight as int8 ``weight_int8`` [N, K] and float32
    ``weight_scale`` [N] (see the module docstring)."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        # The checkpoint's floating-point weight is loaded as the unquantized
        # layer's would be (same shape, same sharding), then quantized.
        UnquantizedLinearMethod().create_weights(layer, input_size_per_partition, output_partition_sizes,
                                                 input_size, output_size, params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Quantize ``layer.weight`` and drop it (its memory is freed)."""
        q, scale = quantize_per_channel_int8(layer.weight.data)
        del layer.weight
        layer.weight_int8 = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [num_tokens, K] -> ``x @ (q * scale).T + bias`` [num_tokens, N]
        in ``x``'s dtype. The weight is dequantized to ``x``'s dtype first (not
        scaled after the product, whose int8-valued partial sums could
        overflow float16)."""
        w = (layer.weight_int8.to(torch.float32) * layer.weight_scale[:, None]).to(x.dtype)
        return F.linear(x, w, bias)


class Int8WeightOnlyConfig(QuantizationConfig):
    """``--quantization int8_weight_only``: every linear layer in int8 with
    per-output-channel scales, quantized at load."""

    @classmethod
    def get_name(cls) -> str:
        return "int8_weight_only"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Int8WeightOnlyConfig:
        """Raises:
            ValueError: ``config`` is a checkpoint's ``quantization_config``
                (a checkpoint already saved in this scheme): the method only
                quantizes floating-point checkpoints at load.
        """
        if config:
            raise ValueError("int8_weight_only quantizes a floating-point checkpoint at load; a checkpoint "
                             "saved with quantization_config.quant_method 'int8_weight_only' cannot be loaded")
        return cls()

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        return Int8WeightOnlyLinearMethod() if isinstance(layer, LinearBase) else None
