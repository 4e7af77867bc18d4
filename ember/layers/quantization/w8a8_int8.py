"""INT8 W8A8 (SmoothQuant-style): int8 weights with one scale per output
channel, int8 activations with one scale per token computed as the layer runs
(or one static scale from a calibrated checkpoint), an int32 product and the
scales applied to it in float32.

The arithmetic (see :mod:`ember.kernels.triton_int8` for the exact
definition shared by every path): ``x_s[m] = max|x[m, :]| / 127.5``,
``x_q = round(clamp(x / x_s, -128, 127))``, and
``y = float(x_q @ w_q.T) * x_s[:, None] * w_s[None, :] + b``. Per element of
``y`` the error against the float product ``x @ w.T`` is at most
``sum_k (|w[n,k]| * x_s[m] / 2 + |x[m,k]| * w_s[n] / 2 + x_s[m] * w_s[n] / 4)``
(half a step on each operand); against the float32 product of the
dequantized operands it is float32 rounding only.

Two sources of weights:

- ``--quantization w8a8_int8`` (:class:`W8A8Int8Config`) quantizes a
  floating-point checkpoint at load: ``scale[n] = max_k |W[n, k]| / 127``,
  ``q = round(W / scale)`` in [-127, 127] (as
  :func:`~ember.layers.quantization.int8_weight_only.quantize_per_channel_int8`).
  Every linear layer is quantized; the embedding, the LM head and MoE experts
  keep their dtype.
- a compressed-tensors checkpoint (``int-quantized``, what llm-compressor's
  W8A8 recipes write; see
  :mod:`ember.layers.quantization.compressed_tensors`): ``weight`` int8
  [N, K], ``weight_scale`` [N, 1] (channel strategy) or [1] (tensor strategy,
  one per stacked projection), and with static activations ``input_scale``
  [1] (one per stacked projection; a merged layer takes their maximum).

Kernels: on CUDA :func:`ember.kernels.triton_int8.w8a8_int8_linear` (the
Triton int8 GEMM with the activation quantization in it at decode row counts,
``torch._int_mm`` with a Triton epilogue for larger batches); on other
devices the same arithmetic in plain PyTorch (``torch._int_mm`` on CPU).

With tensor parallelism a column-parallel shard holds whole output channels
(the same scales as one device); a row-parallel rank's per-token scales come
from its part of K.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ember.layers.linear import LinearBase, UnquantizedLinearMethod
from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig
from ember.layers.quantization.int8_weight_only import quantize_per_channel_int8

INT8_QMIN, INT8_QMAX = -128, 127
# NOTE: torch._int_mm is slow on CPU: from 16 rows on, a float64 matmul of the same
# integers is faster (measured on AVX2, torch 2.13: 16 x 896 x 4864 about even, 2048
# rows 0.3 s against 3.7 s).
CPU_FLOAT64_MM_MIN_ROWS = 16
INT8_SCALE_DIVISOR = 127.5  # compressed-tensors' symmetric int8 scale: max|x| / ((127 - -128) / 2)


def quantize_per_token_int8(x: torch.Tensor, static_scale: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch per-token symmetric int8 quantization (the reference of
    :func:`ember.kernels.triton_int8.per_token_quant_int8`, bit for bit).

    Args:
        x: [M, K] floating point.
        static_scale: optional [1] float32, one scale for every row.
    Returns:
        ``(x_q, x_s)``: x_q [M, K] int8 in [-128, 127]; x_s [M] float32 (an
        all-zero row gets scale 1), or ``static_scale`` itself.
    """
    xf = x.float()
    if static_scale is None:
        amax = xf.abs().amax(dim=1)
        # NOTE: divided by a tensor, not a Python scalar: CUDA divides by a
        # scalar as a product with its reciprocal, off by an ulp at times.
        x_s = torch.where(amax > 0, amax / torch.full_like(amax, INT8_SCALE_DIVISOR), torch.ones_like(amax))
        scale = x_s[:, None]
    else:
        x_s = scale = static_scale.float()
    x_q = torch.round((xf / scale).clamp_(INT8_QMIN, INT8_QMAX)).to(torch.int8)
    return x_q, x_s


def int8_scaled_mm_reference(x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor,
                             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``float(x_q @ w_q.T) * x_s[:, None] * w_s[None, :] (+ bias)`` rounded to
    ``out_dtype``: the int32 product (``torch._int_mm``, or a float64 matmul,
    exact for these integers, where it does not take the shapes or, on CPU, from
    :data:`CPU_FLOAT64_MM_MIN_ROWS` rows on), then the float32 epilogue in the
    kernels' order.

    Args:
        x_q: [M, K] int8; x_s: [M] or [1] float32.
        w_q: [N, K] int8; w_s: [N] float32.
        bias: optional [N].
    Returns:
        [M, N] in ``out_dtype``.
    """
    acc = None
    if x_q.device.type != "cpu" or x_q.shape[0] < CPU_FLOAT64_MM_MIN_ROWS:
        try:
            acc = torch._int_mm(x_q, w_q.t())
        except RuntimeError:  # shapes this device's _int_mm refuses (CUDA: M <= 16)
            pass
    if acc is None:  # the same integers, exactly: |sum| <= K * 2**14, far below 2**53
        acc = (x_q.double() @ w_q.double().t()).to(torch.int32)
    y = acc.float() * x_s.reshape(-1, 1) * w_s[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _check_int8(param: nn.Parameter, loaded: torch.Tensor, layer: nn.Module) -> None:
    if loaded.dtype != torch.int8:
        raise ValueError(f"{getattr(layer, 'prefix', '')}.weight: the W8A8 INT8 scheme stores int8 weights, the "
                         f"checkpoint has {loaded.dtype}")


class W8A8Int8LinearMethod(LinearMethodBase):
    """int8 ``weight`` [N, K] and float32 ``weight_scale`` [N] after loading,
    per-token (or static, ``input_scale`` [1]) int8 activations.

    Args:
        checkpoint_int8: the checkpoint stores the int8 weight and its scales
            (compressed-tensors); False: quantize the floating-point weight at load.
        weight_per_channel: (checkpoint) ``weight_scale`` is [N, 1], one per
            output channel; False: one per tensor ([1] per stacked projection).
        static_input_scale: (checkpoint) activations take the checkpoint's
            ``input_scale`` instead of per-token scales.
    """

    def __init__(self, checkpoint_int8: bool = False, weight_per_channel: bool = True,
                 static_input_scale: bool = False) -> None:
        if not checkpoint_int8 and (static_input_scale or not weight_per_channel):
            raise ValueError("W8A8 INT8 quantized at load has per-channel weights and per-token activations")
        self.checkpoint_int8 = checkpoint_int8
        self.weight_per_channel = weight_per_channel
        self.static_input_scale = static_input_scale

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        if not self.checkpoint_int8:
            UnquantizedLinearMethod().create_weights(layer, input_size_per_partition, output_partition_sizes,
                                                     input_size, output_size, params_dtype)
            return
        n = sum(output_partition_sizes)
        weight = nn.Parameter(torch.empty(n, input_size_per_partition, dtype=torch.int8), requires_grad=False)

        def load_weight(param: nn.Parameter, loaded: torch.Tensor, *shard: Any) -> None:
            _check_int8(param, loaded, layer)
            layer.weight_loader(param, loaded, *shard)

        weight.weight_loader = load_weight
        layer.weight = weight
        if self.weight_per_channel:
            scale = nn.Parameter(torch.empty(n, 1, dtype=torch.float32), requires_grad=False)
            scale.input_dim = None  # a row-parallel rank keeps every output channel's scale
            layer.weight_scale = scale
        else:
            layer.weight_scale = _per_shard_scalar(layer, len(output_partition_sizes))
        if self.static_input_scale:
            layer.input_scale = _per_shard_scalar(layer, len(output_partition_sizes))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Online: quantize ``layer.weight`` (its float copy is freed).
        Checkpoint: scales to float32 [N] (a per-tensor scale repeated over its
        projection's channels) and the static input scale to [1] (the largest
        of the stacked projections')."""
        if not self.checkpoint_int8:
            q, scale = quantize_per_channel_int8(layer.weight.data)
            del layer.weight
            layer.weight = nn.Parameter(q, requires_grad=False)
            layer.weight_scale = nn.Parameter(scale, requires_grad=False)
            return
        scale = layer.weight_scale.data.float()
        if self.weight_per_channel:
            scale = scale.reshape(-1)
        else:
            sizes = torch.tensor(layer.output_partition_sizes, device=scale.device)
            scale = scale.repeat_interleave(sizes)
        layer.weight_scale = nn.Parameter(scale.contiguous(), requires_grad=False)
        if self.static_input_scale:
            layer.input_scale = nn.Parameter(layer.input_scale.data.float().amax().reshape(1), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [num_tokens, K] -> [num_tokens, N] in ``x``'s dtype (float32
        for the LM head, which writes float32 logits anyway)."""
        input_scale = layer.input_scale if self.static_input_scale else None
        if x.is_cuda:
            from ember.kernels.triton_int8 import w8a8_int8_linear
            return w8a8_int8_linear(x, layer.weight, layer.weight_scale, input_scale, bias)
        x_q, x_s = quantize_per_token_int8(x, input_scale)
        return int8_scaled_mm_reference(x_q, x_s, layer.weight, layer.weight_scale, bias, x.dtype)


def _per_shard_scalar(layer: nn.Module, num_shards: int) -> nn.Parameter:
    """A float32 [num_shards] parameter holding one checkpoint scalar per stacked
    projection (``q``/``k``/``v`` or 0/1 shard ids; a plain layer's is [1]),
    loaded whole on every rank."""
    param = nn.Parameter(torch.zeros(num_shards, dtype=torch.float32), requires_grad=False)
    index = {"q": 0, "k": 1, "v": 2}

    def load(p: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None, *_: Any) -> None:
        if loaded.numel() != 1:
            raise ValueError(f"{getattr(layer, 'prefix', '')}: a per-tensor scale has {loaded.numel()} elements "
                             f"{tuple(loaded.shape)}, expected 1")
        if shard_id is None:
            p.data.fill_(loaded.float().reshape(()))
        else:
            p.data[index.get(shard_id, shard_id)] = loaded.float().reshape(())

    param.weight_loader = load
    return param


class W8A8Int8Config(QuantizationConfig):
    """``--quantization w8a8_int8``: every linear layer in INT8 W8A8
    (per-channel weights quantized at load, per-token activations)."""

    @classmethod
    def get_name(cls) -> str:
        return "w8a8_int8"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> W8A8Int8Config:
        """Raises:
            ValueError: ``config`` is a checkpoint's ``quantization_config``:
                INT8 W8A8 checkpoints are compressed-tensors ones
                (``quant_method: "compressed-tensors"``), read by
                :class:`~ember.layers.quantization.compressed_tensors.CompressedTensorsConfig`.
        """
        if config:
            raise ValueError("w8a8_int8 quantizes a floating-point checkpoint at load; INT8 W8A8 checkpoints are "
                             "read through their quant_method 'compressed-tensors'")
        return cls()

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        return W8A8Int8LinearMethod() if isinstance(layer, LinearBase) else None
