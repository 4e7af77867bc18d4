"""FP8 routed experts: :class:`Fp8MoEMethod`, the :class:`~ember.layers.moe.FusedMoE`
method of :class:`~ember.layers.quantization.fp8.Fp8Config`.

The experts' weights stay in ``float8_e4m3fn`` on the device and the grouped
GEMMs run on FP8 operands (:func:`ember.kernels.triton_moe.fused_experts_fp8_triton`
on CUDA, :func:`ember.layers.moe.torch_moe.fused_experts_fp8_torch` on CPU).
Three ways to get there:

- block-scaled checkpoints (``weight_block_size: [bn, bk]``, DeepSeek-V3/R1,
  Qwen3 FP8): per expert ``{gate,up,down}_proj.weight`` FP8 and
  ``weight_scale_inv`` float32 [ceil(N / bn), ceil(K / bk)]; stacked into
  ``w13_weight_scale_inv`` [E, 2I / bn, ceil(hidden / bk)] and
  ``w2_weight_scale_inv`` [E, ceil(hidden / bn), I / bk]. Activations are
  quantized per token in 1 x ``bk`` groups. The per-rank intermediate size
  must be a multiple of ``bn`` and ``bk`` (tensor parallelism splits whole
  blocks).
- per-tensor / per-channel checkpoints: ``weight_scale`` (one element, or one
  per output row), kept as one scale per output row: ``w13_weight_scale``
  [E, 2I], ``w2_weight_scale`` [E, hidden] (gate and up keep their own
  per-tensor scales that way). With ``activation_scheme: "static"`` the
  ``input_scale`` of every expert is read and the largest one per GEMM is
  used for all tokens (one quantization of the shared input); with
  ``"dynamic"`` activations get one scale per token.
- ``--quantization fp8`` on a floating-point checkpoint: the experts load in
  the model dtype and are quantized once after loading, one scale per output
  row (absmax / 448), with dynamic per-token activations.

With expert parallelism a rank holds whole experts and their scales.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.layers.moe.torch_moe import FP8_E4M3_MAX
from ember.layers.quantization.base import QuantizationConfig
from ember.utils import resolve_lazy

# name -> "module:function", imported lazily so the CPU path never imports GPU kernels.
_FP8_IMPLS: dict[str, str] = {
    "torch": "ember.layers.moe.torch_moe:fused_experts_fp8_torch",
    "triton": "ember.kernels.triton_moe:fused_experts_fp8_triton",
}


class Fp8MoEMethod:
    """FP8 experts (see the module docstring).

    Args:
        quant_config: the model's FP8 scheme, an
            :class:`~ember.layers.quantization.fp8.Fp8Config` (not imported
            here: that module imports this one).
        impl: ``"triton"`` or ``"torch"`` (default: Triton when the layer is
            built on CUDA, else the plain-PyTorch loop).
    """

    def __init__(self, quant_config: QuantizationConfig, impl: str | None = None) -> None:
        self.quant_config = quant_config
        self.serialized = quant_config.is_checkpoint_fp8_serialized
        self.block_shape = quant_config.weight_block_size if self.serialized else None
        self.static = self.serialized and quant_config.activation_scheme == "static"
        self.impl_name = impl or ("triton" if torch.get_default_device().type == "cuda" else "torch")
        self.impl = resolve_lazy(_FP8_IMPLS, self.impl_name, "FP8 fused MoE implementation")
        # NOTE: as the unquantized method: the torch loop syncs on the chosen experts.
        self.cuda_graph_safe = self.impl_name != "torch"

    @property
    def scheme(self) -> str:
        """The scheme in words, for errors."""
        if not self.serialized:
            return "fp8 online (per-channel weights, dynamic per-token activations)"
        if self.block_shape is not None:
            return f"fp8 {self.block_shape[0]}x{self.block_shape[1]} block scales (weight_scale_inv)"
        return f"fp8 per-tensor/per-channel weight_scale, {self.quant_config.activation_scheme} activations"

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype) -> None:
        """Register ``w13_weight`` [E, 2I, hidden] and ``w2_weight`` [E, hidden, I]
        (``float8_e4m3fn`` for an FP8 checkpoint, ``params_dtype`` for online
        quantization) and the scheme's scales (see the module docstring).
        Scales start as NaN, so one the checkpoint lacks is found after loading.

        Raises:
            ValueError: block scales that the per-rank intermediate size does
                not split into whole blocks.
        """
        inter = intermediate_size_per_partition
        dtype = torch.float8_e4m3fn if self.serialized else params_dtype
        layer.w13_weight = _param(torch.empty(num_experts, 2 * inter, hidden_size, dtype=dtype), "weight",
                                  self.scheme)
        layer.w2_weight = _param(torch.empty(num_experts, hidden_size, inter, dtype=dtype), "weight", self.scheme)
        if not self.serialized:
            return
        if self.block_shape is not None:
            bn, bk = self.block_shape
            if inter % bn or inter % bk:
                raise ValueError(f"{layer.prefix}: expert intermediate size {inter} per rank is not a multiple of "
                                 f"the {bn}x{bk} weight blocks ({self.scheme}); use fewer tensor-parallel ranks "
                                 f"or expert parallelism")
            layer.w13_weight_scale_inv = _param(_nan(num_experts, 2 * inter // bn, -(-hidden_size // bk)),
                                                "weight_scale_inv", self.scheme, intermediate_block=bn)
            layer.w2_weight_scale_inv = _param(_nan(num_experts, -(-hidden_size // bn), inter // bk),
                                               "weight_scale_inv", self.scheme, intermediate_block=bk)
            return
        layer.w13_weight_scale = _param(_nan(num_experts, 2 * inter), "weight_scale", self.scheme, moe_scale="channel")
        layer.w2_weight_scale = _param(_nan(num_experts, hidden_size), "weight_scale", self.scheme,
                                       moe_scale="channel")
        if self.static:
            layer.w13_input_scale = _param(_nan(num_experts, 2), "input_scale", self.scheme, moe_scale="tensor")
            layer.w2_input_scale = _param(_nan(num_experts, 1), "input_scale", self.scheme, moe_scale="tensor")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Online: quantize the loaded experts (one expert at a time, so the
        float32 temporaries stay one expert's size). Checkpoint: check that
        every scale was loaded, and reduce the static input scales to one per
        GEMM (their maximum).

        Raises:
            ValueError: a scale the checkpoint did not provide (named as the
                checkpoint tensor of the first expert that lacks it).
        """
        if not self.serialized:
            for name in ("w13", "w2"):
                weight, scale = _quantize_per_row(getattr(layer, f"{name}_weight").data)
                setattr(layer, f"{name}_weight", _param(weight, "weight", self.scheme))
                setattr(layer, f"{name}_weight_scale", _param(scale, "weight_scale", self.scheme))
            return
        suffix = "weight_scale_inv" if self.block_shape is not None else "weight_scale"
        for name in ("w13", "w2"):
            _check_loaded(layer, f"{name}_{suffix}", self.scheme)
        if self.static:
            for name in ("w13", "w2"):
                _check_loaded(layer, f"{name}_input_scale", self.scheme)
                scale = getattr(layer, f"{name}_input_scale").data.amax().reshape(1).float()
                setattr(layer, f"{name}_input_scale", _param(scale, "input_scale", self.scheme))

    def apply(self, layer: nn.Module, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        """See :meth:`ember.layers.moe.FusedMoE.forward`."""
        if self.block_shape is not None:
            w13_scale, w2_scale = layer.w13_weight_scale_inv, layer.w2_weight_scale_inv
        else:
            w13_scale, w2_scale = layer.w13_weight_scale, layer.w2_weight_scale
        a13 = layer.w13_input_scale if self.static else None
        a2 = layer.w2_input_scale if self.static else None
        return self.impl(hidden_states, layer.w13_weight, layer.w2_weight, w13_scale, w2_scale, topk_weights,
                         topk_ids, self.block_shape, a13, a2)


def _nan(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32)


def _param(t: torch.Tensor, checkpoint_suffix: str, scheme: str, **attrs) -> nn.Parameter:
    """A frozen parameter carrying the attributes FusedMoE.weight_loader reads."""
    p = nn.Parameter(t, requires_grad=False)
    p.checkpoint_suffix, p.quant_scheme = checkpoint_suffix, scheme
    for key, value in attrs.items():
        setattr(p, key, value)
    return p


def _quantize_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] float -> (``float8_e4m3fn`` [E, N, K], float32 [E, N]) with
    ``w ~= q * scale[..., None]``, scale = row absmax / 448."""
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(w.shape[:2], dtype=torch.float32, device=w.device)
    for e in range(w.shape[0]):
        we = w[e].float()
        s = we.abs().amax(dim=1).clamp(min=1e-12) / FP8_E4M3_MAX
        q[e] = (we / s[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        scale[e] = s
    return q, scale


def _check_loaded(layer: nn.Module, param_name: str, scheme: str) -> None:
    param = getattr(layer, param_name)
    missing = param.data.isnan()
    if bool(missing.any()):
        local = int(missing.reshape(param.shape[0], -1).any(dim=1).nonzero()[0])
        rows = missing[local].reshape(missing.shape[1], -1).any(dim=1)
        half = param.shape[1] // 2
        proj = "down_proj" if param_name.startswith("w2") else \
            ("gate_proj" if bool(rows[:half].any()) or param.shape[1] == 1 else "up_proj")
        tensor = f"{layer.prefix}.{local + layer.expert_start}.{proj}.{param.checkpoint_suffix}"
        raise ValueError(f"FusedMoE {layer.prefix}: the checkpoint lacks {tensor} ({scheme})")
