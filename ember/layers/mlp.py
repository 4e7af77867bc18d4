"""The gated (SwiGLU) MLP of Llama, Qwen2/3 and DeepSeek's dense layers and
shared experts: ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020, "GLU Variants
Improve Transformer"), with gate and up stacked in one column-parallel matmul."""

from __future__ import annotations

import torch
from torch import nn

from ember.layers.activation import silu_and_mul
from ember.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from ember.layers.quantization.base import QuantizationConfig


class GatedMLP(nn.Module):
    """``[num_tokens, hidden] -> [num_tokens, hidden]``: ``down_proj(silu_and_mul(gate_up_proj(x)))``.

    Parameter names follow HF checkpoints (``gate_proj`` and ``up_proj``
    stacked into ``gate_up_proj`` as shards 0 and 1, ``down_proj``).

    Args:
        hidden_size: model width.
        intermediate_size: width of the gate (and of the up projection).
        bias: whether the projections carry a bias.
        quant_config: the model's quantization config, or None.
        prefix: the MLP's checkpoint name (e.g. ``model.layers.0.mlp``).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
