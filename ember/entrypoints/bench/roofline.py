"""Measured ceilings of the device (copy bandwidth, bf16 matmul rate) and the
model's bytes and FLOPs per token, for roofline bounds in benchmark output.

Method: the copy bandwidth counts bytes read
plus bytes written of a large device-to-device copy; the matmul rate is a large
square bf16 product on random data. Both are medians of timed repeats after a
warm-up, measured in the benchmark's own process.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceCeilings:
    """``copy_bytes_per_s``: bytes read + written per second;
    ``matmul_flops_per_s``: dense bf16 (CPU: float32) FLOP/s."""

    device: str
    name: str
    copy_bytes_per_s: float
    matmul_flops_per_s: float


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_ceilings(device: torch.device) -> DeviceCeilings:
    """Measure copy bandwidth and matmul rate on ``device`` (a few seconds)."""
    cuda = device.type == "cuda"
    n_bytes = (2 << 30) if cuda else (256 << 20)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t_copy = _time(functools.partial(dst.copy_, src), 20 if cuda else 5, device)
    del src, dst
    n = 8192 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = _time(lambda: a @ b, 10 if cuda else 3, device)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return DeviceCeilings(device.type, name, 2 * n_bytes / t_copy, 2 * n ** 3 / t_mm)


@dataclass(frozen=True)
class ModelCost:
    """Bytes and FLOPs of one model (weights in their run dtype).

    Attributes:
        weight_bytes: bytes of all parameters (read once per forward step).
        flops_per_token: 2 x non-embedding parameters (matmul FLOPs of one token).
        kv_bytes_per_token: KV-cache bytes of one token across all layers.
        attn_flops_per_token_ctx: attention FLOPs of one query token per context token.
    """

    weight_bytes: int
    flops_per_token: int
    kv_bytes_per_token: int
    attn_flops_per_token_ctx: int


def model_cost(model: torch.nn.Module, model_config, kv_cache_dtype: torch.dtype | None = None) -> ModelCost:
    """Bytes and FLOPs of ``model``; the KV bytes per token in ``kv_cache_dtype``
    (default: the model dtype)."""
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    embed = model.get_submodule("model.embed_tokens").weight
    matmul_params = sum(p.numel() for p in params if p.dim() >= 2) - embed.numel()
    if model.get_submodule("lm_head").weight is embed:
        matmul_params += embed.numel()  # tied: the LM head matmul still runs
    elem = torch.empty((), dtype=kv_cache_dtype or model_config.dtype).element_size()
    hc = model_config.hf_config
    kv = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * elem
    attn = 4 * model_config.num_layers * hc.num_attention_heads * model_config.head_dim
    return ModelCost(weight_bytes, 2 * matmul_params, kv, attn)
