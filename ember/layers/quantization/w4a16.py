"""W4A16: 4-bit integer weights with per-group scales, 16-bit activations, run
as stored (never dequantized to the model dtype at load).

Three checkpoint layouts, read as the format documents them (K = input
features, N = output features, G = group size, q and z unsigned 4-bit values,
``W[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n]``):

- **AWQ** (``quant_method: "awq"``, ``version: "gemm"``, AutoAWQ's
  ``WQLinear_GEMM``): ``qweight`` int32 [K, N / 8] packed along N, nibble i
  (bits 4i..4i+3) of word c holding column ``8c + AWQ_PACK_ORDER[i]``;
  ``qzeros`` int32 [K / G, N / 8] packed the same way; ``scales`` float16
  [K / G, N].
- **GPTQ** (``quant_method: "gptq"``, AutoGPTQ / GPTQModel ``checkpoint_format``
  ``"gptq"``, i.e. v1): ``qweight`` int32 [K / 8, N] packed along K (nibble i of
  row r is row ``8r + i``); ``qzeros`` int32 [K / G, N / 8] packed along N in
  order, storing ``z - 1`` (the v1 offset: the zero point is the nibble plus
  one; ``"gptq_v2"`` stores z); ``scales`` [K / G, N]; ``g_idx`` int32 [K], the
  group of each row (act order, ``desc_act``: rows grouped by a permutation).
  Symmetric checkpoints store z = 8.
- **compressed-tensors** ``pack-quantized`` int4 (llm-compressor):
  ``weight_packed`` int32 [N, K / 8] packed along K (nibble i of word c is
  column ``8c + i``) holding ``q + 8`` for the signed value q;
  ``weight_scale`` [N, K / G]; ``weight_zero_point`` int32 [N / 8, K / G]
  packed along N (asymmetric only; symmetric means z = 8 unsigned);
  ``weight_shape`` [2]; ``weight_g_idx`` [K] (``actorder: "group"``).

Each format's loader unpacks its tensors into one form (``q`` uint8 [K, N],
zeros, scales, g_idx) and :func:`build_kernel_layout` repacks that into the one
layout the kernels read (:mod:`ember.kernels.triton_w4a16`): int32 packed along
K in 128-row tiles, scale rows per group of 32/64/128 rows (larger groups and
per-channel scales repeated), rows sorted by group under act order (``x`` is
gathered through ``perm`` in the kernel). Act order whose groups are not all
``group_size`` rows (a row-parallel shard) pads each group to 32 rows.

Tensor parallelism: column-parallel layers split N, row-parallel layers split K
in whole groups (act order: ``g_idx`` is split and the scales stay whole),
through each parameter's ``weight_loader``. The vocabulary embedding and the
LM head stay in the model dtype, as the formats leave them.

On CUDA the Triton kernels run; on CPU the layout is dequantized and
multiplied in plain PyTorch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig

#: AutoAWQ's packing order: nibble i of a word holds column ``8c + AWQ_PACK_ORDER[i]``.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
TILE_K = 128  # rows of K per tile of the kernel layout (ember.kernels.triton_w4a16.TILE_K)
_ACT_ORDER_CHUNK = 32  # group padding of act order with unequal groups


# ----------------------------------------------------------------- packing
def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Nibbles of int32 ``packed`` in order along ``dim``: element ``8c + i``
    is bits ``4i .. 4i + 3`` of word c. Returns uint8 with ``dim`` 8x longer."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    p = packed.movedim(dim, -1)
    q = ((p.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)
    return q.reshape(*p.shape[:-1], p.shape[-1] * 8).movedim(-1, dim)


def pack_int4(q: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`unpack_int4`: values 0..15 along ``dim`` (a multiple
    of 8) into int32 words."""
    v = q.movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)
    words = torch.zeros(v.shape[:-1], dtype=torch.int32, device=q.device)
    for i in range(7):
        words |= v[..., i].to(torch.int32) << (4 * i)
    top = v[..., 7].to(torch.int64) << 28  # bit 31: the word's sign
    words |= torch.where(top >= 2 ** 31, top - 2 ** 32, top).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


@dataclass
class W4Weights:
    """One layer's weight in the common unpacked form.

    Attributes:
        q: uint8 [K, N], values 0..15.
        zeros: uint8 [K / G, N] (0..16), or None for the symmetric zero point 8.
        scales: [K / G, N] floating point, as stored.
        g_idx: int [K] group of each row (act order), or None (row k in group k // G).
        group_size: G (K for one group per column).
    """

    q: torch.Tensor
    zeros: torch.Tensor | None
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    group_size: int


@dataclass
class W4KernelLayout:
    """A layer's weight in the kernel layout (see :mod:`ember.kernels.triton_w4a16`).

    Attributes:
        qweight: int32 [K_pad / 8, N]; scales [K_pad / group, N]; zeros uint8
            like scales or None; perm int32 [K_pad] or None; group: KG; k: K.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    group: int
    k: int


def _kernel_group(group_size: int, k: int) -> int:
    if group_size == k:
        return TILE_K  # one group per column: any chunking
    g = math.gcd(group_size, TILE_K)
    if g < 32:
        raise ValueError(f"group_size {group_size} is not a multiple of 32")
    return g


def build_kernel_layout(w: W4Weights) -> W4KernelLayout:
    """Repack :class:`W4Weights` into the kernel layout (exact: integer moves
    and scale copies only).

    Raises:
        ValueError: a group size that is not a multiple of 32; a g_idx with
            values outside the scales' groups.
    """
    q, k, n = w.q, w.q.shape[0], w.q.shape[1]
    num_groups = w.scales.shape[0]
    dev = q.device
    rows = torch.arange(k, device=dev)
    if w.g_idx is not None:
        g_idx = w.g_idx.to(torch.int64)
        if g_idx.numel() != k or int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
            raise ValueError(f"g_idx (values {int(g_idx.min())}..{int(g_idx.max())}) does not index the "
                             f"{num_groups} groups of the scales")
        if torch.equal(g_idx, rows // w.group_size):
            g_idx = None
    else:
        g_idx = None
    if g_idx is None:
        kg = _kernel_group(w.group_size, k)
        order = rows
        k_real = k
        chunk_group = None
    else:
        order = torch.argsort(g_idx, stable=True)
        counts = torch.bincount(g_idx, minlength=num_groups)
        if bool((counts == w.group_size).all()) and w.group_size % 32 == 0:
            kg = _kernel_group(w.group_size, k)
            k_real = k
            chunk_group = None
        else:  # pad every group to a multiple of 32 rows
            kg = _ACT_ORDER_CHUNK
            padded = (counts + kg - 1) // kg * kg
            starts = torch.cumsum(padded, 0) - padded
            first = torch.cumsum(counts, 0) - counts
            sorted_g = g_idx[order]
            pos = starts[sorted_g] + (torch.arange(k, device=dev) - first[sorted_g])
            k_real = int(padded.sum())
            new_order = torch.full((k_real,), -1, dtype=torch.int64, device=dev)
            new_order[pos] = order
            order = new_order
            chunk_group = torch.repeat_interleave(torch.arange(num_groups, device=dev), padded // kg)
    k_pad = (k_real + TILE_K - 1) // TILE_K * TILE_K
    full_order = torch.full((k_pad,), -1, dtype=torch.int64, device=dev)
    full_order[:k_real] = order
    valid = full_order >= 0
    q_k = torch.zeros(k_pad, n, dtype=torch.uint8, device=dev)
    if g_idx is None:
        q_k[:k] = q
    else:
        q_k[valid] = q[full_order[valid]]
    # The group of each kernel row of scales (-1: padding, scale 0).
    num_rows = k_pad // kg
    if chunk_group is not None:
        row_group = torch.full((num_rows,), -1, dtype=torch.int64, device=dev)
        row_group[:chunk_group.numel()] = chunk_group
    else:
        first_row = full_order[torch.arange(num_rows, device=dev) * kg]
        if g_idx is None:
            row_group = torch.where(first_row >= 0, first_row // w.group_size, -1)
        else:
            row_group = torch.where(first_row >= 0, g_idx[first_row.clamp(min=0)], -1)
    keep = (row_group >= 0)[:, None]
    scales = torch.where(keep, w.scales[row_group.clamp(min=0)], torch.zeros((), dtype=w.scales.dtype, device=dev))
    zeros = None
    if w.zeros is not None:
        zeros = torch.where(keep, w.zeros[row_group.clamp(min=0)], torch.zeros((), dtype=torch.uint8, device=dev))
    packed = pack_int4(q_k.view(k_pad // TILE_K, 8, 16, n).transpose(1, 2).reshape(k_pad, n), dim=0)
    perm = full_order.to(torch.int32) if g_idx is not None else None
    return W4KernelLayout(packed, scales.contiguous(), zeros.contiguous() if zeros is not None else None, perm, kg, k)


def dequantize_rows(layout: W4KernelLayout) -> torch.Tensor:
    """``(q - z) * s`` float32 [K_pad, N] in the kernel layout's row order
    (padding rows 0): nibble j of packed row ``16t + i`` is row ``128t + 16j + i``."""
    packed = layout.qweight.view(-1, 16, layout.qweight.shape[1])  # [tiles, 16, N]
    tiles, _, n = packed.shape
    w = torch.empty(tiles, 8, 16, n, dtype=torch.float32, device=packed.device)
    for j in range(8):
        w[:, j] = (packed >> (4 * j)) & 0xF
    groups = w.view(-1, layout.group, n)
    if layout.zeros is not None:
        groups -= layout.zeros[:, None, :]
    else:
        groups -= 8
    groups *= layout.scales[:, None, :]
    return w.view(tiles * TILE_K, n)


def dequantize_layout(layout: W4KernelLayout) -> torch.Tensor:
    """The layer's weight, ``(q - z) * s`` in float32 (exact for float16 /
    bfloat16 scales), as [N, K] in the checkpoint's row order."""
    w = dequantize_rows(layout)
    if layout.perm is None:
        return w[:layout.k].t().contiguous()
    perm = layout.perm.to(torch.int64)
    out = torch.zeros(w.shape[1], layout.k, dtype=torch.float32, device=w.device)
    valid = perm >= 0
    out[:, perm[valid]] = w[valid].t()
    return out


def w4a16_apply(layout: W4KernelLayout, x: torch.Tensor, bias: torch.Tensor | None,
                workspace: Any = None) -> torch.Tensor:
    """``x`` [num_tokens, K] -> ``x @ W.T + bias`` [num_tokens, N] in ``x``'s
    dtype: the Triton kernels on CUDA, PyTorch elsewhere."""
    if x.is_cuda:
        from ember.kernels.triton_w4a16 import w4a16_gemm
        return w4a16_gemm(x, layout.qweight, layout.scales, layout.zeros, layout.perm, layout.group, layout.k,
                          bias, workspace)
    w = dequantize_rows(layout)
    if layout.perm is not None:
        perm = layout.perm.to(torch.int64)
        x = F.pad(x, (0, 1))[:, torch.where(perm >= 0, perm, layout.k)]
    else:
        w = w[:layout.k]
    y = x @ w.to(x.dtype)
    return y if bias is None else y + bias


# ------------------------------------------------------------ parameters
@dataclass(frozen=True)
class _ParamSpec:
    """How one checkpoint tensor of a layer is stored and sharded."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    output_dim: int | None = None
    output_pack: int = 1  # output features per element along output_dim
    input_dim: int | None = None
    input_pack: int = 1  # input features per element along input_dim
    input_sharded: bool = True  # split along input_dim by row-parallel layers


def _output_slices(layer: nn.Module, shard_id: str | int | None) -> list[tuple[int, int, int, Any]]:
    """``(offset in this rank's output, size, offset in the checkpoint
    tensor, shard)`` of each projection that ``shard_id`` brings, in output features."""
    from ember.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear

    if isinstance(layer, MergedColumnParallelLinear):
        if shard_id is not None:
            return [(*layer._shard(shard_id), shard_id)]
        if isinstance(layer, QKVParallelLinear):
            q, kv = layer.total_num_heads * layer.head_dim, layer.total_num_kv_heads * layer.head_dim
            parts = [("q", 0), ("k", q), ("v", q + kv)]
        else:
            parts = [(i, sum(layer.output_sizes[:i])) for i in range(len(layer.output_sizes))]
        out = []
        for sid, start in parts:
            off, size, src = layer._shard(sid)
            out.append((off, size, start + src, sid))
        return out
    if isinstance(layer, ColumnParallelLinear):
        n = layer.out_features
        return [(0, n, layer.tp_rank * n, None)]
    return [(0, layer.out_features, 0, None)]


def _load_param(scheme: str, layer: nn.Module, spec: _ParamSpec, param: nn.Parameter, loaded: torch.Tensor,
                shard_id: str | int | None = None) -> None:
    """Copy this rank's part of checkpoint tensor ``loaded`` into ``param``.

    Raises:
        ValueError: a dtype or shape that does not match the scheme's layout,
            naming the tensor and the scheme.
    """
    from ember.layers.linear import RowParallelLinear

    where = f"{scheme}: {layer.prefix}.{spec.name}" + (f" (shard {shard_id!r})" if shard_id is not None else "")
    if spec.dtype == torch.int32 and loaded.dtype != torch.int32:
        raise ValueError(f"{where}: dtype {loaded.dtype}, expected packed int32")
    if spec.dtype.is_floating_point and not loaded.is_floating_point():
        raise ValueError(f"{where}: dtype {loaded.dtype}, expected floating point scales")
    if loaded.dim() != len(spec.shape):
        raise ValueError(f"{where}: {loaded.dim()}-D tensor of shape {tuple(loaded.shape)}, expected "
                         f"{len(spec.shape)}-D like {spec.shape}")
    if spec.dtype.is_floating_point and loaded.dtype != param.dtype and \
            not any(name == spec.name for name, _ in layer._w4_loaded):
        param.data = torch.empty_like(param.data, dtype=loaded.dtype)  # scales keep the stored dtype
    src = loaded
    if isinstance(layer, RowParallelLinear) and spec.input_dim is not None and spec.input_sharded \
            and layer.tp_size > 1:
        local = param.shape[spec.input_dim]
        if src.shape[spec.input_dim] != local * layer.tp_size:
            raise ValueError(f"{where}: shape {tuple(loaded.shape)} does not split into {layer.tp_size} x {local} "
                             f"along dim {spec.input_dim} (whole groups per rank)")
        src = src.narrow(spec.input_dim, layer.tp_rank * local, local)
    slices = _output_slices(layer, shard_id) if spec.output_dim is not None else [(0, 0, 0, shard_id)]
    for off, size, start, sid in slices:
        dst, part = param.data, src
        if spec.output_dim is not None:
            d, p = spec.output_dim, spec.output_pack
            if off % p or size % p or start % p:
                raise ValueError(f"{where}: output slice [{start}, {start + size}) is not a multiple of {p} "
                                 f"(columns packed {p} to a word)")
            if start // p + size // p > part.shape[d]:
                raise ValueError(f"{where}: shape {tuple(loaded.shape)} too small for output features "
                                 f"[{start}, {start + size}) (packed {p} to an element along dim {d})")
            dst, part = dst.narrow(d, off // p, size // p), part.narrow(d, start // p, size // p)
        if dst.shape != part.shape:
            raise ValueError(f"{where}: shape {tuple(part.shape)} does not match {tuple(dst.shape)} "
                             f"(tp_size {getattr(layer, 'tp_size', 1)})")
        dst.copy_(part)
        layer._w4_loaded.add((spec.name, sid))


class W4A16LinearMethod(LinearMethodBase):
    """A linear layer whose weight is 4-bit with group scales in one of the
    checkpoint layouts; subclasses declare the layout's tensors
    (:meth:`param_specs`) and unpack them (:meth:`unpack`)."""

    scheme = "w4a16"

    def __init__(self, workspace: Any = None) -> None:
        # The split-K scratch (ember.kernels.triton_w4a16.W4A16Workspace); the
        # process's shared one unless given, taken when a CUDA layer loads.
        self.workspace = workspace

    def param_specs(self, k: int, n: int, k_full: int, layer: nn.Module) -> list[_ParamSpec]:
        raise NotImplementedError

    def unpack(self, layer: nn.Module) -> W4Weights:
        raise NotImplementedError

    def _group(self, group_size: int | None, k: int, k_full: int, layer: nn.Module) -> int:
        """This rank's group size (per-channel: its K).

        Raises:
            ValueError: K not a multiple of the group size, or a row-parallel
                shard that splits a group.
        """
        if group_size is None or group_size <= 0:
            return k
        if k_full % group_size:
            raise ValueError(f"{self.scheme}: {layer.prefix}: input size {k_full} is not a multiple of "
                             f"group_size {group_size}")
        if k % group_size and not self.act_order:
            raise ValueError(f"{self.scheme}: {layer.prefix}: this rank's {k} input features split groups of "
                             f"{group_size} (tensor parallelism must give each rank whole groups)")
        return group_size

    act_order = False

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        k, n = input_size_per_partition, sum(output_partition_sizes)
        if k % 8:
            raise ValueError(f"{self.scheme}: {layer.prefix}: {k} input features are not a multiple of 8")
        layer._w4_loaded = set()
        layer._w4_specs = self.param_specs(k, n, input_size, layer)
        for spec in layer._w4_specs:
            param = nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype), requires_grad=False)
            param.weight_loader = functools.partial(_load_param, self.scheme, layer, spec)
            setattr(layer, spec.name, param)

    def _check_loaded(self, layer: nn.Module) -> None:
        """Raises ValueError naming a tensor (and shard) the checkpoint lacked;
        nothing is checked for dummy weights (no tensor loaded at all)."""
        loaded = layer._w4_loaded
        if not loaded:
            return
        names = {name for name, _ in loaded}
        shards = {sid for _, sid in loaded if sid is not None}
        for spec in layer._w4_specs:
            if spec.name not in names:
                raise ValueError(f"{self.scheme}: {layer.prefix}: checkpoint lacks {spec.name}")
            for sid in shards if spec.output_dim is not None else ():
                if (spec.name, sid) not in loaded and (spec.name, None) not in loaded:
                    raise ValueError(f"{self.scheme}: {layer.prefix}: checkpoint lacks {spec.name} of shard {sid!r}")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Unpack the checkpoint tensors, repack them into the kernel layout
        (:func:`build_kernel_layout`) and drop them.

        Raises:
            ValueError: a tensor the checkpoint lacked, or values the layout
                cannot hold (see :func:`build_kernel_layout`), naming the
                layer and the scheme.
        """
        self._check_loaded(layer)
        try:
            layout = build_kernel_layout(self.unpack(layer))
        except ValueError as e:
            raise ValueError(f"{self.scheme}: {layer.prefix}: {e}") from e
        for spec in layer._w4_specs:
            delattr(layer, spec.name)
        del layer._w4_specs, layer._w4_loaded
        layer.w4_qweight = nn.Parameter(layout.qweight, requires_grad=False)
        layer.w4_scales = nn.Parameter(layout.scales, requires_grad=False)
        layer.w4_zeros = nn.Parameter(layout.zeros, requires_grad=False) if layout.zeros is not None else None
        layer.w4_perm = nn.Parameter(layout.perm, requires_grad=False) if layout.perm is not None else None
        layer.w4_group, layer.w4_k = layout.group, layout.k
        if layout.qweight.is_cuda:
            if self.workspace is None:
                from ember.kernels.triton_w4a16 import shared_workspace
                self.workspace = shared_workspace()
            self.workspace.reserve(layout.qweight.shape[1], layout.qweight.device)

    @staticmethod
    def layout(layer: nn.Module) -> W4KernelLayout:
        """The layer's weight in the kernel layout (after loading)."""
        return W4KernelLayout(layer.w4_qweight, layer.w4_scales, layer.w4_zeros, layer.w4_perm, layer.w4_group,
                              layer.w4_k)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """[N, K] float32: the weight the layer multiplies by (tests, references)."""
        return dequantize_layout(self.layout(layer))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return w4a16_apply(self.layout(layer), x, bias, self.workspace)


def _zeros_sym_or(z: torch.Tensor, symmetric: bool) -> torch.Tensor | None:
    """None (the kernels' fixed zero point 8) when the scheme is symmetric and
    every zero point is 8, else ``z``."""
    return None if symmetric and bool((z == 8).all()) else z


# ------------------------------------------------------------------ AWQ
class AWQLinearMethod(W4A16LinearMethod):
    """AWQ GEMM checkpoints (``qweight``, ``qzeros``, ``scales``; see the module docstring)."""

    scheme = "awq"

    def __init__(self, group_size: int, workspace: Any = None) -> None:
        super().__init__(workspace)
        self.group_size = group_size

    def param_specs(self, k: int, n: int, k_full: int, layer: nn.Module) -> list[_ParamSpec]:
        if n % 8:
            raise ValueError(f"awq: {layer.prefix}: {n} output features are not a multiple of 8")
        g = self._group(self.group_size, k, k_full, layer)
        per_channel = g == k and self.group_size <= 0
        return [_ParamSpec("qweight", (k, n // 8), torch.int32, 1, 8, 0, 1),
                _ParamSpec("qzeros", (k // g, n // 8), torch.int32, 1, 8, 0, g, not per_channel),
                _ParamSpec("scales", (k // g, n), torch.float16, 1, 1, 0, g, not per_channel)]

    def unpack(self, layer: nn.Module) -> W4Weights:
        inverse = [AWQ_PACK_ORDER.index(c) for c in range(8)]  # column c of a word is nibble inverse[c]
        idx = torch.tensor(inverse, device=layer.qweight.device)

        def columns(packed: torch.Tensor) -> torch.Tensor:
            nib = unpack_int4(packed, dim=1)
            return nib.view(nib.shape[0], -1, 8)[:, :, idx].reshape(nib.shape)

        q, z = columns(layer.qweight.data), columns(layer.qzeros.data)
        k = q.shape[0]
        return W4Weights(q, z, layer.scales.data, None, k // layer.scales.shape[0])


# ----------------------------------------------------------------- GPTQ
class GPTQLinearMethod(W4A16LinearMethod):
    """GPTQ checkpoints (``qweight``, ``qzeros``, ``scales``, ``g_idx``; see
    the module docstring), v1 or v2 zero points."""

    scheme = "gptq"

    def __init__(self, group_size: int, desc_act: bool, sym: bool, zero_offset: int = 1,
                 workspace: Any = None) -> None:
        super().__init__(workspace)
        self.group_size, self.act_order, self.sym, self.zero_offset = group_size, desc_act, sym, zero_offset

    def param_specs(self, k: int, n: int, k_full: int, layer: nn.Module) -> list[_ParamSpec]:
        from ember.layers.linear import RowParallelLinear

        if n % 8:
            raise ValueError(f"gptq: {layer.prefix}: {n} output features are not a multiple of 8")
        g = self._group(self.group_size, k, k_full, layer)
        per_channel = self.group_size <= 0
        # Act order on a row-parallel shard: its rows reach any group, the scales stay whole.
        whole = per_channel or (self.act_order and isinstance(layer, RowParallelLinear) and layer.tp_size > 1)
        rows = 1 if per_channel else (k_full // g if whole else k // g)
        specs = [_ParamSpec("qweight", (k // 8, n), torch.int32, 1, 1, 0, 8),
                 _ParamSpec("qzeros", (rows, n // 8), torch.int32, 1, 8, 0, g, not whole),
                 _ParamSpec("scales", (rows, n), torch.float16, 1, 1, 0, g, not whole),
                 # Checkpoints carry g_idx with or without act order; it is read with it only.
                 _ParamSpec("g_idx", (k,), torch.int32, None, 1, 0, 1)]
        return specs

    def unpack(self, layer: nn.Module) -> W4Weights:
        q = unpack_int4(layer.qweight.data, dim=0)
        z = (unpack_int4(layer.qzeros.data, dim=1) + self.zero_offset)
        g_idx = layer.g_idx.data if self.act_order else None
        group = q.shape[0] if self.group_size <= 0 else self.group_size
        return W4Weights(q, _zeros_sym_or(z, self.sym), layer.scales.data, g_idx, group)


# -------------------------------------------------- compressed-tensors
class PackQuantizedW4A16Method(W4A16LinearMethod):
    """compressed-tensors ``pack-quantized`` int4 weights (``weight_packed``,
    ``weight_scale``, ``weight_zero_point``, ``weight_shape``, ``weight_g_idx``).

    Args:
        group_size: the group strategy's size, or None for one scale per
            output channel.
        symmetric: no zero points (z = 8 on the unsigned values).
        actorder: ``"group"`` (rows grouped by ``weight_g_idx``), ``"weight"``
            or None (groups in row order).

    Raises:
        ValueError: an unknown ``actorder``.
    """

    scheme = "compressed-tensors pack-quantized int4"

    def __init__(self, group_size: int | None, symmetric: bool, actorder: str | None,
                 workspace: Any = None) -> None:
        super().__init__(workspace)
        if actorder not in (None, "group", "weight", "static", "dynamic"):
            raise ValueError(f"{self.scheme}: unknown actorder {actorder!r}")
        self.group_size = group_size if group_size is not None and group_size > 0 else None
        self.symmetric = symmetric
        self.act_order = actorder == "group"

    def param_specs(self, k: int, n: int, k_full: int, layer: nn.Module) -> list[_ParamSpec]:
        from ember.layers.linear import RowParallelLinear

        g = self._group(self.group_size, k, k_full, layer)
        per_channel = self.group_size is None
        whole = per_channel or (self.act_order and isinstance(layer, RowParallelLinear) and layer.tp_size > 1)
        cols = 1 if per_channel else (k_full // g if whole else k // g)
        specs = [_ParamSpec("weight_packed", (n, k // 8), torch.int32, 0, 1, 1, 8),
                 _ParamSpec("weight_scale", (n, cols), torch.get_default_dtype(), 0, 1, 1, g, not whole),
                 _ParamSpec("weight_shape", (2,), torch.int64)]
        if not self.symmetric:
            if n % 8:
                raise ValueError(f"{self.scheme}: {layer.prefix}: {n} output features are not a multiple of 8")
            specs.append(_ParamSpec("weight_zero_point", (n // 8, cols), torch.int32, 0, 8, 1, g, not whole))
        if self.act_order:
            specs.append(_ParamSpec("weight_g_idx", (k,), torch.int32, None, 1, 0, 1))
        return specs

    def unpack(self, layer: nn.Module) -> W4Weights:
        if layer._w4_loaded:
            shape = layer.weight_shape.data.tolist()
            if shape[1] != layer.input_size:
                raise ValueError(f"weight_shape {shape} does not have the layer's {layer.input_size} input features")
        q = unpack_int4(layer.weight_packed.data, dim=1).t()
        z = None
        if not self.symmetric:
            z = unpack_int4(layer.weight_zero_point.data, dim=0).t()
        g_idx = layer.weight_g_idx.data if self.act_order else None
        group = q.shape[0] if self.group_size is None else self.group_size
        return W4Weights(q, z, layer.weight_scale.data.t(), g_idx, group)


# --------------------------------------------------------------- configs
def _ignored(prefix: str, names: list[str]) -> bool:
    return any(prefix == name or prefix.endswith("." + name) or ("." + name + ".") in ("." + prefix + ".")
               for name in names)


class AWQConfig(QuantizationConfig):
    """``quant_method: "awq"``: 4-bit GEMM-packed weights with zero points.

    Args:
        group_size: rows of K per scale (-1: one per output channel).
        modules_to_not_convert: checkpoint names of layers kept unquantized.
    """

    raw_checkpoint = True

    def __init__(self, group_size: int = 128, modules_to_not_convert: list[str] | None = None) -> None:
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def get_name(cls) -> str:
        return "awq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        """Raises:
            ValueError: bits other than 4, no zero points, or a version other
                than ``"gemm"`` (e.g. ``"gemv"``, ``"marlin"``, ``"exllama"``).
        """
        bits = config.get("bits", config.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"awq: bits {bits} is not supported (only 4-bit weights)")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq: version {version!r} is not supported (only the 'gemm' packing)")
        if not config.get("zero_point", True):
            raise ValueError("awq: zero_point false is not supported (AWQ GEMM checkpoints store zero points)")
        return cls(int(config.get("group_size", config.get("q_group_size", 128))),
                   config.get("modules_to_not_convert"))

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        from ember.layers.linear import LinearBase

        if not isinstance(layer, LinearBase) or _ignored(prefix, self.modules_to_not_convert):
            return None
        return AWQLinearMethod(self.group_size)


class GPTQConfig(QuantizationConfig):
    """``quant_method: "gptq"``: 4-bit weights packed along K, v1 (``"gptq"``)
    or v2 (``"gptq_v2"``) zero points, optional act order.

    Args:
        group_size: rows of K per scale (-1: one per output channel).
        desc_act: act order (``g_idx`` groups rows by a permutation).
        sym: symmetric (every zero point 8).
        checkpoint_format: ``"gptq"`` (v1, zero points stored minus one) or ``"gptq_v2"``.
        modules_to_not_convert: checkpoint names of layers kept unquantized.
    """

    raw_checkpoint = True

    def __init__(self, group_size: int = 128, desc_act: bool = False, sym: bool = True,
                 checkpoint_format: str = "gptq", modules_to_not_convert: list[str] | None = None) -> None:
        self.group_size, self.desc_act, self.sym = group_size, desc_act, sym
        self.zero_offset = 1 if checkpoint_format == "gptq" else 0
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def get_name(cls) -> str:
        return "gptq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        """Raises:
            ValueError: bits other than 4, or a checkpoint format other than
                ``"gptq"`` / ``"gptq_v2"``.
        """
        bits = config.get("bits", 4)
        if bits != 4:
            raise ValueError(f"gptq: bits {bits} is not supported (only 4-bit weights)")
        fmt = config.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq: checkpoint_format {fmt!r} is not supported (only 'gptq' and 'gptq_v2')")
        return cls(int(config.get("group_size", 128)), bool(config.get("desc_act", False)),
                   bool(config.get("sym", True)), fmt, config.get("modules_to_not_convert"))

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        from ember.layers.linear import LinearBase

        if not isinstance(layer, LinearBase) or _ignored(prefix, self.modules_to_not_convert):
            return None
        return GPTQLinearMethod(self.group_size, self.desc_act, self.sym, self.zero_offset)
