"""FP8 (``float8_e4m3fn``) quantization: the scheme, read from a checkpoint's
``quantization_config`` (``quant_method: "fp8"``) or chosen with
``--quantization fp8`` for a floating-point checkpoint (quantized at load).

Checkpoint layouts (HF transformers ``FineGrainedFP8`` / DeepSeek-V3, and the
per-tensor FP8 checkpoints of llm-compressor's older ``"fp8"`` format):

- ``weight_block_size: [bm, bn]`` (DeepSeek-V3/R1: [128, 128]): ``weight``
  FP8 [N, K] and ``weight_scale_inv`` float32 [ceil(N / bm), ceil(K / bn)];
  ``W = weight * weight_scale_inv`` per block. Activations are quantized per
  token in groups of ``bn`` (1 x 128) when the layer runs.
- no block size: ``weight`` FP8 [N, K] and ``weight_scale`` float32 (one per
  tensor, or one per output channel [N] / [N, 1]); with ``activation_scheme:
  "static"`` an ``input_scale`` per tensor, with ``"dynamic"`` activations are
  scaled per token when the layer runs.

``ignored_layers`` / ``modules_to_not_convert`` name layers (checkpoint
prefixes) kept in the model dtype.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig

ACTIVATION_SCHEMES = ("dynamic", "static")


class Fp8Config(QuantizationConfig):
    """An FP8 scheme.

    Attributes:
        is_checkpoint_fp8_serialized: the checkpoint stores FP8 weights (False:
            ``--quantization fp8`` quantizes a floating-point checkpoint at load).
        activation_scheme: ``"dynamic"`` (activation scales computed per token
            at run time) or ``"static"`` (the checkpoint's ``input_scale``).
        weight_block_size: ``(bm, bn)`` block scales, or None (per-tensor or
            per-channel scales).
        ignored_layers: checkpoint prefixes of layers left unquantized.
    """

    def __init__(self, is_checkpoint_fp8_serialized: bool = False, activation_scheme: str = "dynamic",
                 weight_block_size: tuple[int, int] | None = None,
                 ignored_layers: list[str] | None = None) -> None:
        if activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"fp8 quantization_config.activation_scheme {activation_scheme!r} is not one of "
                             f"{list(ACTIVATION_SCHEMES)}")
        if weight_block_size is not None:
            if len(weight_block_size) != 2 or min(weight_block_size) <= 0:
                raise ValueError(f"fp8 quantization_config.weight_block_size {list(weight_block_size)} is not "
                                 f"two positive sizes")
            if activation_scheme != "dynamic":
                raise ValueError("fp8 block quantization (weight_block_size) needs activation_scheme 'dynamic'")
            weight_block_size = (int(weight_block_size[0]), int(weight_block_size[1]))
        self.is_checkpoint_fp8_serialized = is_checkpoint_fp8_serialized
        self.activation_scheme = activation_scheme
        self.weight_block_size = weight_block_size
        self.ignored_layers = list(ignored_layers or [])

    @property
    def raw_checkpoint(self) -> bool:  # type: ignore[override]
        return self.is_checkpoint_fp8_serialized

    @classmethod
    def get_name(cls) -> str:
        return "fp8"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        """``{}`` (``--quantization fp8`` on a floating-point checkpoint:
        dynamic per-token activations, weights quantized at load), or a
        checkpoint's ``quantization_config``.

        Raises:
            ValueError: an FP8 format other than e4m3, an unknown activation
                scheme, or a malformed block size.
        """
        if not config:
            return cls()
        fmt = config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"fp8 quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
        ignored = config.get("ignored_layers") or config.get("modules_to_not_convert") or []
        return cls(is_checkpoint_fp8_serialized=True,
                   activation_scheme=config.get("activation_scheme", "dynamic"),
                   weight_block_size=config.get("weight_block_size"), ignored_layers=ignored)

    def is_ignored(self, prefix: str) -> bool:
        """Whether the layer named ``prefix`` stays unquantized (an ignored
        name equals the prefix or is one of its dotted components' suffix,
        e.g. ``lm_head`` or ``model.layers.0.mlp.gate``)."""
        return any(prefix == name or prefix.endswith("." + name) or prefix.startswith(name + ".")
                   for name in self.ignored_layers)

    def describe(self) -> str:
        return repr(self)

    def __repr__(self) -> str:
        if not self.is_checkpoint_fp8_serialized:
            return "fp8 (online, per-channel weights, dynamic per-token activations)"
        if self.weight_block_size is not None:
            bm, bn = self.weight_block_size
            return f"fp8 (checkpoint, {bm}x{bn} weight blocks: weight + weight_scale_inv)"
        return (f"fp8 (checkpoint, per-tensor/per-channel weight_scale, {self.activation_scheme} activations"
                f"{' with input_scale' if self.activation_scheme == 'static' else ''})")

    def get_dense_weight_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """For a checkpoint, :class:`~ember.layers.quantization.fp8_linear.Fp8DenseWeightMethod`
        (FP8 tensors loaded, then dequantized once); None (unquantized) for
        online FP8 and ignored layers."""
        if self.is_ignored(prefix) or not self.is_checkpoint_fp8_serialized:
            return None
        from ember.layers.quantization.fp8_linear import Fp8DenseWeightMethod
        return Fp8DenseWeightMethod(self)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """:class:`~ember.layers.quantization.fp8_linear.Fp8LinearMethod` for
        linear layers, :class:`~ember.layers.quantization.fp8_moe.Fp8MoEMethod`
        for routed experts, None (unquantized) for the rest and for ignored
        layers. The vocabulary embedding and the LM head stay unquantized."""
        from ember.layers.linear import LinearBase
        from ember.layers.moe.layer import FusedMoE

        if self.is_ignored(prefix):
            return None
        if isinstance(layer, LinearBase):
            from ember.layers.quantization.fp8_linear import Fp8LinearMethod
            return Fp8LinearMethod(self)
        if isinstance(layer, FusedMoE):
            from ember.layers.quantization.fp8_moe import Fp8MoEMethod
            return Fp8MoEMethod(self)
        return None
