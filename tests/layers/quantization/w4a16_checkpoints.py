"""Writers of AWQ and GPTQ checkpoints for tests: an HF model directory
(``config.json`` with ``quantization_config``, ``model.safetensors``) whose
``*.{q,k,v,o,gate,up,down}_proj.weight`` tensors are quantized to 4 bits per
group by round to nearest and packed as each format documents it; every other
tensor is written as given.

Written from the formats' documented layouts, independently of Ember's loader:

- AWQ GEMM (AutoAWQ ``WQLinear_GEMM``): asymmetric, ``scale = (max - min) /
  15``, ``zero = round(-min / scale)``; ``qweight`` int32 [K, N / 8] and
  ``qzeros`` int32 [K / G, N / 8] packed along N with nibble i of word c holding
  column ``8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]``; ``scales`` float16 [K / G, N].
- GPTQ v1 (AutoGPTQ): ``qweight`` int32 [K / 8, N] packed along K (nibble i of
  row r = row 8r + i); ``qzeros`` int32 [K / G, N / 8] packed along N in order,
  storing ``zero - 1``; ``scales`` float16 [K / G, N]; ``g_idx`` int32 [K].
  Symmetric: ``scale = 2 max|w| / 15``, zero 8. Asymmetric: as AWQ, the zero
  kept in 1..15 so that ``zero - 1`` fits a nibble. Act order (``desc_act``):
  rows are grouped by a fixed pseudo-random permutation (``g_idx[perm[i]] = i //
  G``), the weight stays in row order.
"""

from __future__ import annotations

import json
import pathlib
import re

import torch
from safetensors.torch import save_file

QUANTIZED = re.compile(r".*\.(q|k|v|o|gate|up|down)_proj\.weight$")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15 -> int32 [R / 8, C]: nibble i of row r is row 8r + i."""
    r, c = q.shape
    words = torch.zeros(r // 8, c, dtype=torch.int64)
    for i in range(8):
        words |= q[i::8].to(torch.int64) << (4 * i)
    return _to_int32(words)


def _pack_cols(q: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[R, C] values 0..15 -> int32 [R, C / 8]: nibble i of word c is column 8c + order[i]."""
    r, c = q.shape
    words = torch.zeros(r, c // 8, dtype=torch.int64)
    for i in range(8):
        words |= q[:, order[i]::8].to(torch.int64) << (4 * i)
    return _to_int32(words)


def _quantize_groups(w: torch.Tensor, symmetric: bool, min_zero: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 of groups ``w`` [num_groups, G, N] (float32):
    ``(q [num_groups, G, N] uint8 0..15, zeros [num_groups, N] int64, scales [num_groups, N] float16)``."""
    if symmetric:
        scale = (2 * w.abs().amax(1) / 15).clamp(min=1e-8).to(torch.float16)
        zero = torch.full(scale.shape, 8, dtype=torch.int64)
    else:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.float16)
        zero = torch.round(-lo / scale.float()).to(torch.int64).clamp(min_zero, 15)
    q = (torch.round(w / scale.float()[:, None]) + zero[:, None]).clamp(0, 15).to(torch.uint8)
    return q, zero, scale


def _quantize(weight: torch.Tensor, group_size: int, symmetric: bool, min_zero: int = 0,
              g_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF ``weight`` [N, K] -> ``(q [K, N], zeros [K / G, N], scales [K / G, N] float16)``;
    group g holds the rows k with ``g_idx[k] == g`` (default ``k // G``; G rows each)."""
    w = weight.float().t()
    k, n = w.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K={k}")
    order = torch.arange(k) if g_idx is None else torch.argsort(g_idx, stable=True)
    if g_idx is None:
        q, zeros, scales = _quantize_groups(w.reshape(k // group_size, group_size, n), symmetric, min_zero)
        return q.view(k, n), zeros, scales
    q_sorted, zeros, scales = _quantize_groups(w[order].view(k // group_size, group_size, n), symmetric, min_zero)
    q = torch.empty(k, n, dtype=torch.uint8)
    q[order] = q_sorted.view(k, n)
    return q, zeros, scales


def _write(tensors: dict[str, torch.Tensor], config, quantization_config: dict, path: pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fields = config.to_dict()
    fields["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(fields, indent=2))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path / "model.safetensors"))


def write_awq_checkpoint(weights: dict[str, torch.Tensor], config, path: pathlib.Path,
                         group_size: int = 128) -> None:
    """Write ``weights`` (HF names, [N, K] linear weights) as an AWQ GEMM
    checkpoint in ``path`` (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if not QUANTIZED.match(name):
            out[name] = t
            continue
        prefix = name[: -len(".weight")]
        q, zeros, scales = _quantize(t, group_size, symmetric=False)
        out[f"{prefix}.qweight"] = _pack_cols(q, AWQ_ORDER)
        out[f"{prefix}.qzeros"] = _pack_cols(zeros, AWQ_ORDER)
        out[f"{prefix}.scales"] = scales
    _write(out, config, {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                         "version": "gemm"}, path)


def act_order_permutation(k: int, seed: int = 0) -> torch.Tensor:
    """The row order act order quantizes in (a fixed pseudo-random permutation of ``k``)."""
    return torch.randperm(k, generator=torch.Generator().manual_seed(seed))


def write_gptq_checkpoint(weights: dict[str, torch.Tensor], config, path: pathlib.Path, group_size: int = 128,
                          desc_act: bool = False, sym: bool = True) -> None:
    """Write ``weights`` (HF names, [N, K] linear weights) as a GPTQ v1
    checkpoint in ``path`` (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if not QUANTIZED.match(name):
            out[name] = t
            continue
        prefix = name[: -len(".weight")]
        k = t.shape[1]
        if desc_act:
            perm = act_order_permutation(k)
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[perm] = torch.arange(k) // group_size
        else:
            g_idx = torch.arange(k) // group_size
        q, zeros, scales = _quantize(t, group_size, symmetric=sym, min_zero=1, g_idx=g_idx)
        out[f"{prefix}.qweight"] = _pack_rows(q)
        out[f"{prefix}.qzeros"] = _pack_cols(zeros - 1)
        out[f"{prefix}.scales"] = scales
        out[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
    _write(out, config, {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act,
                         "sym": sym, "checkpoint_format": "gptq"}, path)
