"""Weight transforms applied while reading checkpoints.

FP8 block quantization as DeepSeek-V3 ships it (``config.json``
``quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128]}``): a linear weight ``W`` [out, in] is stored
as ``weight`` (``float8_e4m3fn``) plus ``weight_scale_inv`` (float32,
``[ceil(out / 128), ceil(in / 128)]``), and ``W[i, j] = weight[i, j] *
weight_scale_inv[i // 128, j // 128]`` (DeepSeek-V3 ``inference/kernel.py``,
``weight_dequant``; the name says "inverse" because it is the inverse of the
scale used to quantize).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

SCALE_INV_SUFFIX = "_scale_inv"
DEFAULT_FP8_BLOCK = (128, 128)


def fp8_block_size(model_dir: str) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` of an HF directory's
    ``config.json``, or (128, 128) when absent (DeepSeek-V3's value)."""
    try:
        quant = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return DEFAULT_FP8_BLOCK
    block = quant.get("weight_block_size") or DEFAULT_FP8_BLOCK
    return int(block[0]), int(block[1])


def dequant_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int] = DEFAULT_FP8_BLOCK,
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize a block-scaled FP8 weight.

    Args:
        weight: [out, in] ``float8_e4m3fn`` (any dtype torch can upcast).
        scale_inv: [ceil(out / bm), ceil(in / bn)] float32 block scales.
        block_size: ``(bm, bn)``.
        dtype: result dtype.
    Returns:
        [out, in] ``dtype``: ``weight * scale_inv`` broadcast over each block,
        computed in float32 (partial blocks at the edges use their scale too).
    Raises:
        ValueError: ``scale_inv`` does not have one entry per block.
    """
    (m, n), (bm, bn) = weight.shape, block_size
    mb, nb = -(-m // bm), -(-n // bn)
    if weight.dim() != 2 or tuple(scale_inv.shape) != (mb, nb):
        raise ValueError(f"FP8 weight {tuple(weight.shape)} with {bm}x{bn} blocks needs scale_inv of shape "
                         f"({mb}, {nb}), got {tuple(scale_inv.shape)}")
    padded = F.pad(weight.to(torch.float32), (0, nb * bn - n, 0, mb * bm - m))
    out = padded.view(mb, bm, nb, bn) * scale_inv.to(torch.float32)[:, None, :, None]
    return out.view(mb * bm, nb * bn)[:m, :n].to(dtype)
