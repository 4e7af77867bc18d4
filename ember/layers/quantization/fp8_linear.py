"""FP8 W8A8 linear layers (:class:`Fp8LinearMethod`), for the schemes of
:class:`~ember.layers.quantization.fp8.Fp8Config`.

Stored form after loading (whatever the source):

- ``weight``: [N, K] ``float8_e4m3fn``;
- per-channel scheme: ``weight_scale`` [N] float32. A per-tensor checkpoint
  (one scalar per stored tensor; q/k/v or gate/up each have their own) is
  expanded at load to one scale per output row of its shard, which is exact;
  a per-channel one ([N] or [N, 1], compressed-tensors' "channel" strategy)
  is taken as is. Which one a checkpoint holds is read from the loaded
  shapes, not from the config;
- block scheme (``weight_block_size`` (bm, bn)): ``weight_scale_inv``
  [ceil(N / bm), ceil(K / bn)] float32, as stored. When a merged layer's
  stacked projections (or a tensor-parallel split of the rows) do not start
  on block boundaries, each row keeps its own copy of its block's scales
  ([N, ceil(K / bn)], row granularity), which is exact too;
- ``input_scale`` [1] float32 with ``activation_scheme == "static"`` (the
  largest of the merged projections' scales: they quantize the same input).

``--quantization fp8`` (online) quantizes a floating-point checkpoint's
weights at load per output channel (``scale = amax / 448``): per-channel keeps
a row's outliers from flattening the other rows, costs nothing at run time
(the scale is applied once per output in the epilogue), and runs on cuBLAS's
row-wise scaled FP8 GEMM. Activations are then scaled dynamically per token.

``apply`` on CUDA:

- M <= 16 rows (decode): :func:`~ember.kernels.triton_fp8.fp8_skinny_linear`
  reads the FP8 weight once and widens it in registers against the 16-bit
  activations (W8A16 math: decode is bound by the weight's bytes, so
  quantizing the activations would add a kernel and error for no speed);
- otherwise the activations are quantized per token (per token and 1 x bn
  group for the block scheme; with the static scale for "static") and the
  product runs on FP8 tensor cores: ``torch._scaled_mm`` with row-wise scales
  (per-channel scheme, bfloat16 output, N and K multiples of 16) or with
  DeepSeek-V3's block recipe (:func:`block_scaled_mm`: 128 x 128 blocks, N a
  multiple of 128 and K of 512, on Hopper where the PyTorch build has it), else the
  Triton GEMM :func:`~ember.kernels.triton_fp8.w8a8_scaled_mm`.

On CPU :func:`fp8_linear_reference` runs the same math in plain PyTorch
(float32): quantized activations times dequantized weights.

Tensor parallelism: ``weight_scale`` shards like the weight's rows;
``weight_scale_inv`` shards like the weight in block units (column-parallel:
block rows, or row-granular scales as above; row-parallel: block columns, and a
split of K that is not a multiple of bn is refused).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.linear import ColumnParallelLinear, RowParallelLinear, UnquantizedLinearMethod
from ember.layers.quantization.base import LinearMethodBase
from ember.loader.weight_utils import dequant_fp8_block
from ember.logger import init_logger

logger = init_logger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_AMAX = 1e-10  # as ember.kernels.triton_fp8.MIN_AMAX (not imported: Triton stays off the CPU path)


# ----------------------------------------------------------------- reference math (plain PyTorch)
def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel FP8: ``scale[n] = max(amax_n, 1e-10) / 448``,
    ``q = clamp(w / scale, -448, 448)`` rounded to nearest even.

    Args:
        weight: [N, K] floating point.
    Returns:
        ``(q, scale)``: q [N, K] ``float8_e4m3fn``, scale [N] float32.
    """
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=MIN_AMAX) / FP8_MAX
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quant_fp8_reference(x: torch.Tensor, group: int | None = None, static_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch activation quantization, as the Triton kernels do it
    (:mod:`ember.kernels.triton_fp8`): per token (``group`` None), per token
    and ``group`` columns, or with a static scale.

    Args:
        x: [M, K] float.
    Returns:
        ``(q, scale)``: q [M, K] ``float8_e4m3fn``; scale [M, 1] (per token or
        static) or [M, ceil(K / group)] float32.
    """
    xf = x.float()
    m, k = xf.shape
    if static_scale is not None:
        s = static_scale.float().reshape(1, 1).expand(m, 1)
        return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s.contiguous()
    g = k if group is None else group
    groups = -(-k // g)
    padded = F.pad(xf, (0, groups * g - k)).view(m, groups, g)
    s = padded.abs().amax(dim=2).clamp(min=MIN_AMAX) / FP8_MAX
    q = (padded / s[:, :, None]).clamp(-FP8_MAX, FP8_MAX).view(m, groups * g)[:, :k].to(FP8_DTYPE)
    return q, s


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """float32 ``q * scale``.

    Args:
        q: [rows, cols] FP8.
        scale: [rows] / [rows, 1] (per row, ``block`` None), or
            [ceil(rows / bm), ceil(cols / bn)] for ``block`` = (bm, bn)
            (bm 1: row-granular block scales).
    Returns:
        [rows, cols] float32.
    """
    if block is None:
        return q.float() * scale.float().reshape(-1, 1)
    (rows, cols), (bm, bn) = q.shape, block
    s = scale.float().repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return q.float() * s


def fp8_linear_reference(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, block: tuple[int, int] | None,
                         input_scale: torch.Tensor | None, bias: torch.Tensor | None,
                         scale_rows: int | None = None) -> torch.Tensor:
    """The W8A8 product in float32 plain PyTorch: activations quantized (per
    token, per 1 x bn group for blocks, or with ``input_scale``) and
    dequantized, times the dequantized weight.

    Args:
        x: [M, K]; qw [N, K] FP8; sw: per-channel [N] or block scales.
        scale_rows: rows per scale row of ``sw`` (block scheme: bm, or 1 for
            row-granular scales).
    Returns:
        [M, N] in x's dtype.
    """
    if block is not None:
        qa, sa = quant_fp8_reference(x, group=block[1])
        xa = dequantize_fp8(qa, sa, (1, block[1]))
        w = dequantize_fp8(qw, sw, (scale_rows or block[0], block[1]))
    else:
        qa, sa = quant_fp8_reference(x, static_scale=input_scale)
        xa = qa.float() * sa
        w = qw.float() * sw.float().reshape(-1, 1)
    y = xa @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------- loading
def _checkpoint_error(layer: nn.Module, name: str, scheme: str, what: str) -> ValueError:
    return ValueError(f"{layer.prefix}.{name} ({scheme}): {what}")


def _shard_rows(layer: nn.Module, shard_id: str | int | None) -> int:
    """This rank's rows of one stacked projection (all rows for None)."""
    if shard_id is None:
        return layer.out_features
    return layer._shard(shard_id)[1]


def _load_fp8_weight(layer: nn.Module, scheme: str, param: nn.Parameter, loaded: torch.Tensor,
                     shard_id: str | int | None = None) -> None:
    if loaded.dtype != FP8_DTYPE:
        raise _checkpoint_error(layer, "weight", scheme, f"checkpoint tensor has dtype {loaded.dtype}, expected "
                                f"float8_e4m3fn (a layer stored unquantized must be in ignored_layers)")
    layer.weight_loader(param, loaded, *(() if shard_id is None else (shard_id,)))


def _load_channel_scale(layer: nn.Module, scheme: str, param: nn.Parameter, loaded: torch.Tensor,
                        shard_id: str | int | None = None) -> None:
    """``weight_scale``: a scalar (per tensor: fills the shard's rows) or one
    per output row ([N] / [N, 1], sharded like the weight's rows)."""
    extra = () if shard_id is None else (shard_id,)
    loaded = loaded.float()
    if loaded.numel() == 1:
        # The shard's full (unsharded) rows, each with the tensor's scale;
        # the layer's loader then takes this rank's part.
        rows = _shard_rows(layer, shard_id)
        loaded = loaded.reshape(1).expand(rows * layer.tp_size if isinstance(layer, ColumnParallelLinear) else rows)
    elif loaded.dim() == 2 and loaded.shape[1] == 1:
        loaded = loaded[:, 0]
    elif loaded.dim() != 1:
        raise _checkpoint_error(layer, "weight_scale", scheme, f"shape {tuple(loaded.shape)} is neither one scale "
                                f"per tensor nor one per output channel ([N] or [N, 1]); block scales need "
                                f"quantization_config.weight_block_size")
    try:
        layer.weight_loader(param, loaded, *extra)
    except ValueError as e:
        raise _checkpoint_error(layer, "weight_scale", scheme, f"per-channel scales of shape "
                                f"{tuple(loaded.shape)} do not fit the weight's {layer.out_features} rows "
                                f"(tp_size {layer.tp_size}): {e}") from e


def _load_block_scale(layer: nn.Module, scheme: str, block: tuple[int, int], row_granular: bool,
                      param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
    """``weight_scale_inv`` [ceil(N / bm), ceil(K / bn)] of one checkpoint
    tensor, into this rank's block rows (or row-granular scales) / block columns."""
    extra = () if shard_id is None else (shard_id,)
    bm, bn = block
    loaded = loaded.float()
    if loaded.dim() != 2:
        raise _checkpoint_error(layer, "weight_scale_inv", scheme, f"shape {tuple(loaded.shape)} is not 2-D "
                                f"[ceil(N / {bm}), ceil(K / {bn})]")
    k_blocks = -(-layer.input_size // bn)
    if loaded.shape[1] != k_blocks:
        raise _checkpoint_error(layer, "weight_scale_inv", scheme, f"shape {tuple(loaded.shape)} has "
                                f"{loaded.shape[1]} block columns, the weight's K = {layer.input_size} needs "
                                f"{k_blocks}")
    try:
        if isinstance(layer, ColumnParallelLinear):
            # Rows of the (stacked, sharded) weight, each with its block's scales.
            rows = loaded.repeat_interleave(bm, 0)
            if row_granular:
                layer.weight_loader(param, rows, *extra)
            else:
                expanded = param.data.repeat_interleave(bm, 0)[: layer.out_features]
                layer.weight_loader(expanded, rows, *extra)
                param.data.copy_(expanded[::bm])
        else:  # replicated, or row-parallel (block columns split, checked aligned at create_weights)
            layer.weight_loader(param, loaded, *extra)
    except (ValueError, RuntimeError) as e:
        raise _checkpoint_error(layer, "weight_scale_inv", scheme, f"shape {tuple(loaded.shape)} does not fit "
                                f"the weight [{layer.output_size}, {layer.input_size}] in {bm}x{bn} blocks: {e}") from e


def _load_input_scale(layer: nn.Module, scheme: str, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
    """``input_scale``: one scalar per checkpoint tensor; merged projections keep the largest."""
    if loaded.numel() != 1:
        raise _checkpoint_error(layer, "input_scale", scheme, f"shape {tuple(loaded.shape)} is not one scale per "
                                f"tensor (static activation scales are per tensor)")
    param.data.copy_(torch.maximum(param.data, loaded.float().reshape(1).to(param.device)))


def _param(data: torch.Tensor, loader=None, **attrs) -> nn.Parameter:
    p = nn.Parameter(data, requires_grad=False)
    if loader is not None:
        p.weight_loader = loader
    for name, value in attrs.items():
        setattr(p, name, value)
    return p


class Fp8LinearMethod(LinearMethodBase):
    """FP8 weights with per-channel or block scales, FP8 activations (see
    the module docstring).

    Args:
        quant_config: the scheme (online or checkpoint, activation scheme,
            block size).
    """

    def __init__(self, quant_config: "Fp8Config") -> None:  # noqa: F821 (fp8.py imports this module)
        self.quant_config = quant_config
        self.block = quant_config.weight_block_size
        self.static = quant_config.activation_scheme == "static"
        self.row_granular = False  # block scales kept per row (see the module docstring)
        self.use_pdl = False  # the decode GEMV launches with PDL (set by the decode fusions)

    @property
    def scheme(self) -> str:
        """The scheme in words, for errors."""
        if not self.quant_config.is_checkpoint_fp8_serialized:
            return "fp8 online (per-channel)"
        if self.block is not None:
            return f"fp8 block {self.block[0]}x{self.block[1]}"
        return f"fp8 per-tensor/per-channel, {self.quant_config.activation_scheme} activations"

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        """Online: the floating-point weight, as the unquantized layer's.
        Checkpoint: ``weight`` FP8 [N, K] and its scales (see the module
        docstring), each with the weight loader of its layout.

        Raises:
            ValueError: a row-parallel split of K that is not a multiple of
                the block's bn.
        """
        self.out_dtype = params_dtype
        if not self.quant_config.is_checkpoint_fp8_serialized:
            UnquantizedLinearMethod().create_weights(layer, input_size_per_partition, output_partition_sizes,
                                                     input_size, output_size, params_dtype)
            return
        n, k, scheme = sum(output_partition_sizes), input_size_per_partition, self.scheme
        layer.weight = _param(torch.empty(n, k, dtype=FP8_DTYPE), functools.partial(_load_fp8_weight, layer, scheme))
        if self.block is None:
            layer.weight_scale = _param(torch.empty(n, dtype=torch.float32),
                                        functools.partial(_load_channel_scale, layer, scheme))
            if self.static:
                layer.input_scale = _param(torch.zeros(1, dtype=torch.float32),
                                           functools.partial(_load_input_scale, layer, scheme))
            return
        bm, bn = self.block
        if isinstance(layer, RowParallelLinear) and layer.tp_size > 1 and k % bn:
            raise ValueError(f"{layer.prefix} ({scheme}): tp_size {layer.tp_size} splits K = {input_size} into "
                             f"{k} columns per rank, not a multiple of the {bn}-column weight block")
        self.row_granular = (isinstance(layer, ColumnParallelLinear)
                             and (len(output_partition_sizes) > 1 or layer.tp_size > 1)
                             and any(size % bm for size in output_partition_sizes))
        rows = n if self.row_granular else -(-n // bm)
        layer.weight_scale_inv = _param(torch.empty(rows, -(-k // bn), dtype=torch.float32),
                                        functools.partial(_load_block_scale, layer, scheme, self.block,
                                                          self.row_granular))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Online: quantize the weight per output channel (the floating-point
        weight is freed). Checkpoint: the tensors stay as loaded; a static
        input scale is taken by magnitude.

        Raises:
            ValueError: a static ``input_scale`` that is zero or not finite.
        """
        if not self.quant_config.is_checkpoint_fp8_serialized:
            q, scale = quantize_fp8_per_channel(layer.weight.data)
            del layer.weight
            layer.weight = _param(q)
            layer.weight_scale = _param(scale)
            return
        if self.static:
            s = layer.input_scale.data
            s.abs_()  # NOTE: --load-format dummy fills it with signed random values
            if not bool(torch.isfinite(s).all() and (s > 0).all()):
                raise _checkpoint_error(layer, "input_scale", self.scheme, f"must be nonzero and finite, got "
                                        f"{s.tolist()}")

    # ------------------------------------------------------------- compute
    def _scales(self, layer: nn.Module) -> tuple[torch.Tensor, int, int | None]:
        """(weight scales, group_n, group_k) as the kernels take them."""
        if self.block is None:
            return layer.weight_scale, 1, None
        return layer.weight_scale_inv, 1 if self.row_granular else self.block[0], self.block[1]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [num_tokens, K] -> [num_tokens, N] in x's dtype (see the
        module docstring for the path each device and row count takes)."""
        if not x.is_cuda:
            return self.apply_reference(layer, x, bias)
        return self.apply_kernels(layer, x, bias)

    def apply_reference(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The CPU path: :func:`fp8_linear_reference`."""
        sw, group_n, _ = self._scales(layer)
        shape = x.shape
        y = fp8_linear_reference(x.reshape(-1, shape[-1]), layer.weight, sw, self.block,
                                 layer.input_scale if self.static else None, bias,
                                 scale_rows=group_n if self.block is not None else None)
        return y.view(*shape[:-1], y.shape[-1])

    def apply_kernels(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The CUDA path (also runs on CPU tensors under Triton's interpreter,
        for tests): skinny W8A16 GEMV for M <= 16 16-bit rows, else quantized
        activations and an FP8 GEMM. No host synchronization."""
        from ember.kernels.triton_fp8 import (fp8_skinny_linear, quant_fp8_per_token, quant_fp8_per_token_group,
                                              use_fp8_skinny, w8a8_scaled_mm)

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        qw = layer.weight
        sw, group_n, group_k = self._scales(layer)
        if use_fp8_skinny(x2):
            y = fp8_skinny_linear(x2, qw, sw, group_n, group_k, bias, use_pdl=self.use_pdl)
        elif self.block is not None:
            qa, sa = quant_fp8_per_token_group(x2, group_k)
            if _block_scaled_mm_ok(x2, qw, group_n, group_k):
                y = block_scaled_mm(qa, sa, qw, sw, x.dtype)
                if bias is not None:
                    y = y + bias
            else:
                y = w8a8_scaled_mm(qa, sa, qw, sw, group_n, group_k, bias, x.dtype)
        else:
            qa, sa = quant_fp8_per_token(x2, layer.input_scale if self.static else None)
            if _scaled_mm_ok(x2, qw):
                y = torch._scaled_mm(qa, qw.t(), scale_a=sa, scale_b=sw.view(1, -1), out_dtype=x.dtype)
                if bias is not None:
                    y = y + bias
            else:
                y = w8a8_scaled_mm(qa, sa, qw, sw, bias=bias, out_dtype=x.dtype)
        return y.view(*shape[:-1], y.shape[-1])


    def set_decode_pdl(self, use_pdl: bool) -> None:
        """The decode fusion's hook: launch the decode GEMV with programmatic
        dependent launch (:mod:`ember.kernels.pdl`; ``--no-pdl`` turns it off)."""
        self.use_pdl = use_pdl

    def fused_gated_mlp(self, mlp: nn.Module) -> nn.Module | None:
        """The decode fusion's hook (:func:`ember.layers.fusion.apply_decode_fusions`):
        ``mlp`` (a :class:`~ember.layers.mlp.GatedMLP` whose gate_up_proj
        this method runs) as a :class:`Fp8SkinnyGatedMLP`, or None where the
        gate and up rows do not split evenly."""
        g = mlp.gate_up_proj
        if getattr(g, "output_partition_sizes", None) is None or len(set(g.output_partition_sizes)) != 1 \
                or len(g.output_partition_sizes) != 2 or g.weight.dtype != FP8_DTYPE:
            return None
        if self.block is not None and not self.row_granular and g.output_partition_sizes[0] % self.block[0]:
            return None
        return Fp8SkinnyGatedMLP(mlp)

    def apply_gated(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``silu(g) * u`` of ``[g | u] = layer(x)`` through the FP8 decode
        GEMV's SwiGLU epilogue: ``x`` [M <= 16, K] 16-bit -> [M, N / 2]."""
        from ember.kernels.triton_fp8 import fp8_skinny_linear

        sw, group_n, group_k = self._scales(layer)
        return fp8_skinny_linear(x, layer.weight, sw, group_n, group_k, layer.bias, gated=True,
                                 use_pdl=self.use_pdl)


class Fp8SkinnyGatedMLP(nn.Module):
    """A gated MLP with an FP8 gate_up_proj whose decode steps (at most 16
    16-bit rows on CUDA, or in Triton's interpreter) compute ``silu(gate) *
    up`` in the gate_up GEMV's epilogue; other steps run the plain
    ``down(silu_and_mul(gate_up(x)))``. Same submodules and parameter names
    as :class:`~ember.layers.mlp.GatedMLP`."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = mlp.gate_up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        from ember.kernels.triton_fp8 import use_fp8_skinny
        from ember.kernels.triton_gemm import INTERPRETED
        from ember.layers.activation import silu_and_mul

        g = self.gate_up_proj
        if (x.is_cuda or INTERPRETED) and use_fp8_skinny(x):
            return self.down_proj(g.quant_method.apply_gated(g, x))
        return self.down_proj(silu_and_mul(g(x)))


BLOCK_SCALED_MM_BLOCK = 128


def block_scaled_mm(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """``(qa * sa) @ (qw * sw).T`` on cuBLASLt's block-scaled FP8 GEMM
    (``torch._scaled_mm`` with DeepSeek-V3's recipe: 1 x 128 activation
    groups, 128 x 128 weight blocks; Hopper, CUDA 12.9 or later).

    Args:
        qa: [M, K] ``float8_e4m3fn`` activations; sa: [M, K / 128] float32
            scales (any strides).
        qw: [N, K] ``float8_e4m3fn``; sw: [N / 128, K / 128] float32
            (``weight_scale_inv``).
        out_dtype: bfloat16 or float16.
    Returns:
        [M, N] ``out_dtype``. cuBLASLt takes M in multiples of 4: other row
        counts are padded (zero rows, unit scales) and cut back.
    """
    m = qa.shape[0]
    pad = -m % 4
    if pad:
        qa = torch.cat([qa, qa.new_zeros(pad, qa.shape[1])])
    # The activation scales column-major ([M, G] with unit stride along M), as cuBLASLt reads them.
    sa_t = torch.ones(sa.shape[1], m + pad, dtype=torch.float32, device=sa.device)
    sa_t[:, :m] = sa.t()
    y = torch._scaled_mm(qa, qw.t(), scale_a=sa_t.t(), scale_b=sw.t(), out_dtype=out_dtype)
    return y[:m] if pad else y


# Per device: whether block_scaled_mm runs there (see _block_scaled_mm_works).
_BLOCK_SCALED_MM_WORKS: dict[torch.device, bool] = {}


def _block_scaled_mm_works(device: torch.device) -> bool:
    """Whether this PyTorch build runs :func:`block_scaled_mm` on ``device``
    (sm_90), checked once per device on a small product against float32
    (never while a CUDA graph is being captured: such a step takes the Triton
    GEMM and the check waits for an eager step, which comes first)."""
    known = _BLOCK_SCALED_MM_WORKS.get(device)
    if known is not None:
        return known
    if torch.cuda.is_current_stream_capturing():
        return False
    _BLOCK_SCALED_MM_WORKS[device] = ok = _check_block_scaled_mm(device)
    return ok


def _check_block_scaled_mm(device: torch.device) -> bool:
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    g = torch.Generator(device=device).manual_seed(0)
    b = BLOCK_SCALED_MM_BLOCK
    qa = torch.randn(6, 4 * b, device=device, generator=g).to(FP8_DTYPE)
    qw = torch.randn(2 * b, 4 * b, device=device, generator=g).to(FP8_DTYPE)
    sa = torch.rand(6, 4, device=device, generator=g) + 0.5
    sw = torch.rand(2, 4, device=device, generator=g) + 0.5
    try:
        y = block_scaled_mm(qa, sa, qw, sw, torch.bfloat16).float()
    except RuntimeError as e:
        logger.info(f"block-scaled FP8 GEMMs run on Triton: torch._scaled_mm has no 1x128 / 128x128 recipe here ({e})")
        return False
    ref = (qa.float() * sa.repeat_interleave(b, 1)) @ dequant_fp8_block(qw, sw, (b, b), torch.float32).T
    ok = bool(((y - ref).abs().max() <= 1e-2 * ref.abs().max()).item())
    if not ok:
        logger.warning("torch._scaled_mm's block-scaled FP8 GEMM disagrees with float32: block-scaled FP8 GEMMs "
                       "run on Triton")
    return ok


def _block_scaled_mm_ok(x: torch.Tensor, qw: torch.Tensor, group_n: int, group_k: int | None) -> bool:
    """:func:`block_scaled_mm` applies: 128 x 128 weight blocks (not
    row-granular scales), N a multiple of 128 and K of 512, 16-bit output,
    and a build and device that run it (:func:`_block_scaled_mm_works`).
    With K of 256 or 384 (2 or 3 scale groups) cuBLASLt's results were wrong
    on an H100 (PyTorch 2.11, CUDA 13.0) while every K from 512 up in steps
    of 512 was right."""
    b = BLOCK_SCALED_MM_BLOCK
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and group_n == b and group_k == b
            and qw.shape[0] % b == 0 and qw.shape[1] % (4 * b) == 0 and _block_scaled_mm_works(x.device))


def _scaled_mm_ok(x: torch.Tensor, qw: torch.Tensor) -> bool:
    """cuBLASLt's row-wise scaled FP8 GEMM applies: CUDA, bfloat16 output,
    N and K multiples of 16."""
    return x.is_cuda and x.dtype == torch.bfloat16 and qw.shape[0] % 16 == 0 and qw.shape[1] % 16 == 0


class Fp8DenseWeightMethod(LinearMethodBase):
    """For a layer whose ``weight`` the model reads directly, not only
    through ``apply`` (MLA's ``kv_b_proj``, whose weight the absorbed decode
    splits into W_UK / W_UV): the FP8 checkpoint tensors are loaded as
    :class:`Fp8LinearMethod` loads them, then dequantized once to the model
    dtype, and the layer runs unquantized. Online FP8 leaves such a layer in
    the model dtype."""

    def __init__(self, quant_config: "Fp8Config") -> None:  # noqa: F821 (fp8.py imports this module)
        self.fp8 = Fp8LinearMethod(quant_config)
        self.online = not quant_config.is_checkpoint_fp8_serialized

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        self.params_dtype = params_dtype
        method = UnquantizedLinearMethod() if self.online else self.fp8
        method.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                              params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Replace the FP8 weight and its scales by ``weight`` [N, K] in the model dtype."""
        if self.online:
            return
        sw, group_n, _ = self.fp8._scales(layer)
        block = None if self.fp8.block is None else (group_n, self.fp8.block[1])
        w = dequantize_fp8(layer.weight.data, sw.data, block)
        for name in ("weight", "weight_scale", "weight_scale_inv", "input_scale"):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.weight = _param(w.to(self.params_dtype))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)
