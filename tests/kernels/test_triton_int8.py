"""The INT8 W8A8 kernels (ember.kernels.triton_int8) against the plain-PyTorch
arithmetic of ember.layers.quantization.w8a8_int8, which they must equal bit
for bit (same float32 operations in the same order): in Triton's interpreter
on CPU at tiny shapes, and on CUDA at Llama-3.1-8B shapes (there the int8
product of cuBLASLt / the Triton GEMM is exact, so results still agree to the
last bit of the float32 epilogue)."""

import pytest
import torch

from tests.kernels.interpret import DEVICE, ON_GPU

triton = pytest.importorskip("triton")

from ember.kernels.triton_int8 import (FUSED_QUANT_MAX_M, int8_gemm, int8_scaled_mm,  # noqa: E402
                                       int_mm_supported, per_token_quant_int8, scale_epilogue, w8a8_int8_linear)
from ember.layers.quantization.int8_weight_only import quantize_per_channel_int8  # noqa: E402
from ember.layers.quantization.w8a8_int8 import int8_scaled_mm_reference, quantize_per_token_int8  # noqa: E402


def _data(m, n, k, dtype, seed=0, outlier=False):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=DEVICE)
    if outlier:
        x[:, 3] = 1e4
        x[0, :] = 0.0  # an all-zero row too
    w = torch.randn(n, k, generator=g, device=DEVICE) * k ** -0.5
    w_q, w_s = quantize_per_channel_int8(w)
    b = torch.randn(n, generator=g, device=DEVICE).to(dtype)
    return x.to(dtype), w_q, w_s, b


def _reference(x, w_q, w_s, bias, static=None):
    x_q, x_s = quantize_per_token_int8(x.cpu(), None if static is None else static.cpu())
    return int8_scaled_mm_reference(x_q, x_s, w_q.cpu(), w_s.cpu(), None if bias is None else bias.cpu(), x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_per_token_quant_is_the_reference(dtype, static):
    x = _data(5, 8, 100, dtype, outlier=True)[0]
    scale = torch.tensor([0.01], device=DEVICE) if static else None
    x_q, x_s = per_token_quant_int8(x, scale)
    r_q, r_s = quantize_per_token_int8(x.cpu(), None if scale is None else scale.cpu())
    assert torch.equal(x_q.cpu(), r_q) and torch.equal(x_s.cpu(), r_s)
    assert x_q.min() >= -128 and x_q.max() <= 127 and int(x_q[1].max()) == 127  # the outlier maps to the top


TILES = [(16, 32, 64, 1, 4), (16, 64, 128, 2, 4), (32, 32, 64, 1, 4)]


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemm_is_the_reference(tiles, m, bias):
    # K = 96 is not a multiple of the 64-wide K tile (masked loads); N = 40 not of BLOCK_N.
    x, w_q, w_s, b = _data(m, 40, 96, torch.float16, seed=m)
    b = b if bias else None
    ref = _reference(x, w_q, w_s, b)
    x_q, x_s = quantize_per_token_int8(x)
    got = int8_gemm(x_q.to(DEVICE), w_q, x_s.to(DEVICE), w_s, b, x.dtype, tiles=tiles)
    assert torch.equal(got.cpu(), ref)
    fused = int8_gemm(x, w_q, None, w_s, b, tiles=tiles, quantize_x=True)
    assert fused.dtype == x.dtype and torch.equal(fused.cpu(), ref)


@pytest.mark.parametrize("m", [1, 2, 20])
def test_static_input_scale(m):
    x, w_q, w_s, b = _data(m, 32, 64, torch.bfloat16, seed=3)
    scale = torch.tensor([0.02], device=DEVICE)
    ref = _reference(x, w_q, w_s, b, static=scale)
    fused = int8_gemm(x, w_q, scale, w_s, b, tiles=TILES[0], quantize_x=True)
    x_q, x_s = per_token_quant_int8(x, scale)
    assert x_s is scale
    split = int8_gemm(x_q, w_q, x_s, w_s, b, torch.bfloat16, tiles=TILES[0])
    assert torch.equal(fused.cpu(), ref) and torch.equal(split.cpu(), ref)


@pytest.mark.parametrize("static", [False, True])
def test_scale_epilogue_after_int_mm(static):
    x, w_q, w_s, b = _data(24, 32, 64, torch.float16, seed=5, outlier=True)
    scale = torch.tensor([0.05], device=DEVICE) if static else None
    x_q, x_s = per_token_quant_int8(x, scale)
    got = int8_scaled_mm(x_q, w_q, x_s, w_s, b, torch.float16)
    assert torch.equal(got.cpu(), _reference(x, w_q, w_s, b, static=scale))
    assert torch.isfinite(got).all()
    acc = torch._int_mm(x_q, w_q.t())
    assert torch.equal(scale_epilogue(acc, x_s, w_s, None, torch.float32).cpu(),
                       acc.cpu().float() * x_s.cpu().reshape(-1, 1) * w_s.cpu()[None, :])


@pytest.mark.parametrize("m", [1, FUSED_QUANT_MAX_M + 1, 17])
def test_linear_dispatch_with_outliers(m):
    """Every row count's path: finite results equal to the reference, the
    1e4 outlier column included (int32 accumulation)."""
    x, w_q, w_s, b = _data(m, 40, 64, torch.bfloat16, seed=7, outlier=True)
    got = w8a8_int8_linear(x, w_q, w_s, None, b)
    assert torch.isfinite(got.float()).all()
    assert torch.equal(got.cpu(), _reference(x, w_q, w_s, b))


def test_int8_gemm_refuses_bad_inputs():
    x, w_q, w_s, _ = _data(2, 32, 64, torch.float16)
    with pytest.raises(ValueError, match="int8_gemm"):
        int8_gemm(x, w_q, None, w_s)  # float x without quantize_x
    with pytest.raises(ValueError, match="int8_gemm"):
        int8_gemm(x, w_q.float(), None, w_s, quantize_x=True)
    assert not int_mm_supported(16, 4096, 4096) and int_mm_supported(17, 4096, 4096)
    assert not int_mm_supported(64, 4096, 4100)


# Llama-3.1-8B projections (N, K): qkv, o, gate_up, down.
LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", LLAMA_8B)
@pytest.mark.parametrize("m", [1, 4, 16, 256, 4096])
def test_llama_8b_shapes_on_gpu(m, n, k):
    assert ON_GPU
    x, w_q, w_s, b = _data(m, n, k, torch.bfloat16, seed=m + n, outlier=True)
    got = w8a8_int8_linear(x, w_q, w_s, None, None)
    # The reference on the GPU, independent of the kernels: the plain-PyTorch
    # quantization, the integer product exact in float64, the float32 epilogue.
    x_q, x_s = quantize_per_token_int8(x)
    acc = x_q.double() @ w_q.double().t()
    ref = (acc.float() * x_s[:, None] * w_s[None, :]).to(x.dtype).cpu()
    assert torch.isfinite(got.float()).all()
    # Same integers, same float32 epilogue (no FMA contraction): bit for bit.
    assert torch.equal(got.cpu(), ref)
    # Without outliers, against the float product of the dequantized weights
    # and the unquantized activations: the activations' int8 error only.
    x, w_q, w_s, _ = _data(m, n, k, torch.bfloat16, seed=m + n)
    got = w8a8_int8_linear(x, w_q, w_s, None, None)
    exact = x.float() @ (w_q.float() * w_s[:, None]).t()
    rel = float((got.float() - exact).norm() / exact.norm())
    assert rel < 0.02, rel


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 300])
def test_static_scale_and_bias_on_gpu(m):
    x, w_q, w_s, b = _data(m, 4096, 4096, torch.bfloat16, seed=m)
    scale = x.float().abs().amax().reshape(1) / 127.5
    got = w8a8_int8_linear(x, w_q, w_s, scale, b)
    x_q, x_s = quantize_per_token_int8(x, scale)
    acc = x_q.double() @ w_q.double().t()
    ref = (acc.float() * x_s.reshape(-1, 1) * w_s[None, :] + b.float()).to(x.dtype)
    assert torch.equal(got, ref)
