"""compressed-tensors checkpoints (``quant_method: "compressed-tensors"``, what
llm-compressor writes), run as they are stored.

The ``quantization_config`` is parsed by the ``compressed-tensors`` library
itself (``compressed_tensors.quantization.QuantizationConfig``: config groups
of a :class:`QuantizationScheme` with ``targets``, plus a global ``ignore``
list). A layer's scheme is found as the library finds it when it applies a
config to a model: the layer is skipped when an ``ignore`` entry matches it,
else the first matching target wins, exact names before ``re:`` regexes before
the class name ``Linear`` (``compressed_tensors.utils.match``). Names are the
checkpoint's module names; a merged Ember layer (``qkv_proj``,
``gate_up_proj``) is checked under its checkpoint projections' names, which
must all resolve to the same scheme.

Schemes and the methods that run them:

- W8A8 INT8 (``int-quantized``): int8 weights with channel (or tensor)
  scales, int8 activations dynamic per token or static per tensor ->
  :class:`~ember.layers.quantization.w8a8_int8.W8A8Int8LinearMethod`;
- FP8 W8A8 (``float-quantized``): float8 e4m3 weights with channel or tensor
  scales, activations dynamic per token or static per tensor ->
  ``Fp8LinearMethod`` of :mod:`ember.layers.quantization.fp8_linear`;
- W4A16 (``pack-quantized``): int4 weights packed into int32, group or
  channel scales, symmetric or with zero points, optional activation order ->
  ``PackQuantizedW4A16Method`` of :mod:`ember.layers.quantization.w4a16`.

MoE experts (:class:`~ember.layers.moe.FusedMoE`) take the FP8 scheme only
(``Fp8MoEMethod`` of :mod:`ember.layers.quantization.fp8_moe`).

Anything else (sparsity such as 2:4, transforms, quantized KV caches, int8
weight-only, NVFP4 / MXFP4, block FP8, output activations, int8 or int4
experts) raises a ValueError naming the scheme and the layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig

# Ember's merged layers -> the checkpoint projections they hold (the models'
# stacked_params_mapping).
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# A stand-in for HF's module class when matching class targets ("Linear").
_HF_LINEAR = torch.nn.Linear(1, 1, device="meta")

SUPPORTED = ("W8A8 INT8 (int-quantized: int8 channel/tensor weights, int8 dynamic per-token or static per-tensor "
             "activations), FP8 W8A8 (float-quantized: fp8 channel/tensor weights, dynamic per-token or static "
             "per-tensor activations), W4A16 (pack-quantized: int4 group/channel weights)")


def describe_scheme(scheme: Any, fmt: str | None) -> str:
    """A scheme in one line, e.g. ``weights int8 channel symmetric, input int8 token dynamic, format int-quantized``."""
    def args(a: Any) -> str:
        if a is None:
            return "none"
        group = f" group_size={a.group_size}" if a.group_size not in (None, -1) else ""
        block = f" block={a.block_structure}" if getattr(a, "block_structure", None) else ""
        return (f"{a.type}{a.num_bits} {a.strategy}{group}{block} {'symmetric' if a.symmetric else 'asymmetric'}"
                f"{' dynamic' if a.dynamic is True else ' static' if a.dynamic is False else f' dynamic={a.dynamic}'}")
    out = f"; output {args(scheme.output_activations)}" if scheme.output_activations is not None else ""
    return f"weights {args(scheme.weights)}; input {args(scheme.input_activations)}{out}; format {fmt}"


class CompressedTensorsConfig(QuantizationConfig):
    """A compressed-tensors ``quantization_config``.

    Args:
        config: the parsed ``compressed_tensors.quantization.QuantizationConfig``.
    """

    raw_checkpoint = True

    def __init__(self, config: Any) -> None:
        from compressed_tensors.quantization import QuantizationScheme

        self.config = config
        self.group_actorder: set[str] = set()  # groups whose checkpoint says actorder "group"
        self.ignore = list(config.ignore or [])
        # target -> (scheme, group name); a target named by two groups takes the
        # later one, as compressed-tensors' apply_quantization_config does.
        self.target_to_scheme: dict[str, tuple[QuantizationScheme, str]] = {}
        for group_name, scheme in config.config_groups.items():
            for target in scheme.targets:
                self.target_to_scheme[target] = (scheme, group_name)

    @classmethod
    def get_name(cls) -> str:
        return "compressed-tensors"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        """Parse a checkpoint's ``quantization_config`` with compressed-tensors.

        Raises:
            ValueError: not a checkpoint's config (``--quantization
                compressed-tensors`` on a floating-point checkpoint), a config
                the library rejects, or features Ember does not run: sparsity
                (e.g. ``sparse-24-bitmask``), transforms, a KV cache scheme.
        """
        from compressed_tensors.quantization import QuantizationConfig as CTQuantizationConfig

        if not config:
            raise ValueError("compressed-tensors is a checkpoint format: it cannot quantize a floating-point "
                             "checkpoint (use --quantization w8a8_int8 or fp8)")
        sparsity = config.get("sparsity_config") or {}
        if sparsity and sparsity.get("format", "dense") != "dense":
            raise ValueError(f"compressed-tensors sparsity_config format {sparsity.get('format')!r} (structure "
                             f"{sparsity.get('sparsity_structure')!r}) is not supported")
        if config.get("transform_config"):
            raise ValueError("compressed-tensors transform_config (rotations such as SpinQuant / QuIP) is not "
                             "supported")
        # NOTE: GPTQ act-order checkpoints say ``actorder: "group"`` (rows
        # permuted, ``weight_g_idx`` stored), which the library has since
        # removed and refuses to parse; it is set aside here and handed to the
        # W4A16 method.
        config, legacy_actorder = _without_group_actorder(config)
        try:
            parsed = CTQuantizationConfig.model_validate(config)
        except ValueError as e:  # pydantic's ValidationError is one
            raise ValueError(f"compressed-tensors quantization_config is not valid: {e}") from e
        if parsed.kv_cache_scheme is not None:
            raise ValueError(f"compressed-tensors kv_cache_scheme ({parsed.kv_cache_scheme.type}"
                             f"{parsed.kv_cache_scheme.num_bits} {parsed.kv_cache_scheme.strategy}) is not supported")
        out = cls(parsed)
        out.group_actorder = legacy_actorder
        return out

    # ------------------------------------------------------------ matching
    def scheme_for(self, name: str) -> tuple[Any, str] | None:
        """``(scheme, group name)`` of the checkpoint linear module ``name``, or
        None when no group targets it or ``ignore`` names it."""
        from compressed_tensors.utils.match import is_match, match_targets

        if self.ignore and is_match(name, _HF_LINEAR, self.ignore):
            return None
        matched = match_targets(name, _HF_LINEAR, self.target_to_scheme)
        return self.target_to_scheme[matched[0]] if matched else None

    def _layer_scheme(self, prefix: str) -> tuple[Any, str] | None:
        """The one scheme of every checkpoint projection of the Ember layer ``prefix``.

        Raises:
            ValueError: the projections of a merged layer differ (one ignored,
                or two schemes).
        """
        parent, _, leaf = prefix.rpartition(".")
        names = [f"{parent}.{p}" if parent else p for p in FUSED_PROJECTIONS[leaf]] \
            if leaf in FUSED_PROJECTIONS else [prefix]
        found = [self.scheme_for(n) for n in names]
        if any(f != found[0] for f in found[1:]):
            detail = ", ".join(f"{n}: {'unquantized' if f is None else f[1]}" for n, f in zip(names, found))
            raise ValueError(f"compressed-tensors: the projections merged into {prefix} must share one scheme; "
                             f"the checkpoint has {detail}")
        return found[0]

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """The method of the scheme that targets ``layer`` (linear layers and
        the LM head), None for layers no group quantizes.

        Raises:
            ValueError: a scheme Ember does not run (naming it and the layer),
                or quantized MoE experts.
        """
        from ember.layers.linear import LinearBase
        from ember.layers.moe.layer import FusedMoE
        from ember.layers.vocab_embedding import ParallelLMHead

        if isinstance(layer, FusedMoE):
            return self._experts_method(prefix)
        if not isinstance(layer, (LinearBase, ParallelLMHead)):
            return None
        found = self._layer_scheme(prefix)
        if found is None:
            return None
        scheme, group = found
        return self._method(scheme, self._format(scheme), f"{prefix} (group {group})",
                            "group" if group in self.group_actorder else None)

    def _experts_method(self, prefix: str) -> Any:
        """FP8 experts -> ``Fp8MoEMethod`` (:mod:`ember.layers.quantization.fp8_moe`);
        experts no group quantizes -> None. Checked on expert 0's projections
        (``{prefix}.0.gate_proj`` ...), which must share one scheme.

        Raises:
            ValueError: other schemes, or projections that differ.
        """
        names = [f"{prefix}.0.{proj}" for proj in ("gate_proj", "up_proj", "down_proj")]
        found = [self.scheme_for(n) for n in names]
        if any(f != found[0] for f in found[1:]):
            detail = ", ".join(f"{n}: {'unquantized' if f is None else f[1]}" for n, f in zip(names, found))
            raise ValueError(f"compressed-tensors: the experts of {prefix} must share one scheme; the checkpoint "
                             f"has {detail}")
        if found[0] is None:
            return None
        scheme, group = found[0]
        fmt = self._format(scheme)
        fp8 = _fp8_activation_scheme(scheme, fmt)
        if fp8 is None:
            raise ValueError(f"compressed-tensors scheme [{describe_scheme(scheme, fmt)}] of the MoE experts "
                             f"{prefix} (group {group}) is not supported; quantized experts run FP8 W8A8 "
                             f"(float-quantized: fp8 channel/tensor weights, dynamic per-token or static "
                             f"per-tensor activations)")
        from ember.layers.quantization.fp8 import Fp8Config
        from ember.layers.quantization.fp8_moe import Fp8MoEMethod
        return Fp8MoEMethod(Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme=fp8))

    def _format(self, scheme: Any) -> str | None:
        fmt = scheme.format or self.config.format
        return getattr(fmt, "value", fmt)

    # -------------------------------------------------------- scheme -> method
    def _method(self, scheme: Any, fmt: str | None, layer: str, actorder: str | None = None) -> LinearMethodBase:
        w, a = scheme.weights, scheme.input_activations

        def unsupported(why: str) -> ValueError:
            return ValueError(f"compressed-tensors scheme [{describe_scheme(scheme, fmt)}] of layer {layer} is not "
                              f"supported ({why}); Ember runs {SUPPORTED}")

        if w is None:
            raise unsupported("activation-only quantization")
        if scheme.output_activations is not None:
            raise unsupported("output activations are quantized")
        if w.dynamic is not False:
            raise unsupported("dynamic weights")
        act_static = a is not None and a.dynamic is False and a.strategy == "tensor"
        act_dynamic = a is not None and a.dynamic is True and a.strategy == "token"
        if w.type == "int" and w.num_bits == 8:
            if a is None:
                raise unsupported("int8 weight-only")
            if not (a.type == "int" and a.num_bits == 8 and (act_static or act_dynamic)):
                raise unsupported("int8 weights need int8 activations, dynamic per token or static per tensor")
            if not (w.symmetric and a.symmetric):
                raise unsupported("asymmetric int8")
            if w.strategy not in ("channel", "tensor"):
                raise unsupported(f"int8 weights with {w.strategy} scales")
            if fmt not in ("int-quantized", "naive-quantized"):
                raise unsupported(f"format {fmt}")
            from ember.layers.quantization.w8a8_int8 import W8A8Int8LinearMethod
            return W8A8Int8LinearMethod(checkpoint_int8=True, weight_per_channel=w.strategy == "channel",
                                        static_input_scale=act_static)
        if w.type == "float" and w.num_bits == 8:
            if w.strategy not in ("channel", "tensor"):
                raise unsupported(f"fp8 weights with {w.strategy} scales")
            if not (a is not None and a.type == "float" and a.num_bits == 8 and (act_static or act_dynamic)):
                raise unsupported("fp8 weights need fp8 activations, dynamic per token or static per tensor")
            if fmt not in ("float-quantized", "naive-quantized"):
                raise unsupported(f"format {fmt}")
            from ember.layers.quantization.fp8 import Fp8Config
            from ember.layers.quantization.fp8_linear import Fp8LinearMethod
            return Fp8LinearMethod(Fp8Config(is_checkpoint_fp8_serialized=True,
                                             activation_scheme="static" if act_static else "dynamic"))
        if w.type == "int" and w.num_bits == 4 and a is None:
            if w.strategy not in ("group", "channel"):
                raise unsupported(f"int4 weights with {w.strategy} scales")
            if fmt != "pack-quantized":
                raise unsupported(f"format {fmt}")
            from ember.layers.quantization.w4a16 import PackQuantizedW4A16Method
            actorder = actorder or getattr(w.actorder, "value", w.actorder)
            return PackQuantizedW4A16Method(group_size=w.group_size if w.strategy == "group" else None,
                                            symmetric=w.symmetric, actorder=actorder)
        raise unsupported(f"{w.type}{w.num_bits} weights")


def _without_group_actorder(config: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """``config`` with ``weights.actorder`` "group" / "dynamic" (GPTQ act-order,
    which the library no longer parses) removed, and the names of those groups."""
    groups = config.get("config_groups") or {}
    legacy = {name for name, g in groups.items()
              if isinstance(g, dict) and isinstance(g.get("weights"), dict)
              and str(g["weights"].get("actorder")).lower() in ("group", "dynamic")}
    if not legacy:
        return config, set()
    groups = {name: (g if name not in legacy else {**g, "weights": {**g["weights"], "actorder": None}})
              for name, g in groups.items()}
    return {**config, "config_groups": groups}, legacy


def _fp8_activation_scheme(scheme: Any, fmt: str | None) -> str | None:
    """``"dynamic"`` / ``"static"`` for an FP8 W8A8 scheme Ember runs (fp8
    weights with channel or tensor scales, fp8 activations per token dynamic
    or per tensor static, float-quantized storage), else None."""
    w, a = scheme.weights, scheme.input_activations
    if (w is None or a is None or scheme.output_activations is not None or w.type != "float" or w.num_bits != 8
            or w.dynamic is not False or w.strategy not in ("channel", "tensor") or a.type != "float"
            or a.num_bits != 8 or fmt not in ("float-quantized", "naive-quantized")):
        return None
    if a.dynamic is True and a.strategy == "token":
        return "dynamic"
    if a.dynamic is False and a.strategy == "tensor":
        return "static"
    return None
