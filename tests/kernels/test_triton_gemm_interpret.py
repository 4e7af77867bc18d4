"""Every variant of the skinny decode GEMM's kernel (plain, bias, float32
output, gated SiLU-and-mul epilogue, RMSNorm folded in with the norm weight in
the K loop or in the weight and the sums of squares from the Gram diagonal or
given, residual-add epilogue, sums-of-squares output) against float32
PyTorch, through :func:`launch_skinny_gemm` with explicit tiles, so that it
runs on CPU in Triton's interpreter (tests/kernels/interpret.py) as well as on
CUDA. The public wrappers, their tile choice and their checks are tested on
CUDA at full shapes in test_triton_gemm.py."""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.interpret import DEVICE

triton = pytest.importorskip("triton")

from ember.kernels.triton_gemm import SKINNY_MAX_M, launch_skinny_gemm  # noqa: E402

# (BLOCK_N, BLOCK_K): the wrappers' tiles, and one whose K tile does not divide
# the K of the shapes below (the masked loads of EVEN_K=False).
TILES = [(32, 512), (64, 256), (32, 128)]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _data(m, n, k, dtype, seed, scale=1.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = (torch.randn(m, k, generator=g, device=DEVICE) * scale).to(dtype)
    w = (torch.randn(n, k, generator=g, device=DEVICE) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g, device=DEVICE).to(dtype)
    return g, x, w, b


def _gemm(x, w, tiles, bias=None, out_dtype=None, gated=False, norm=None, sumsq=None, residual=None,
          with_sumsq=False):
    """The kernel's result into a NaN-filled output (an unwritten element
    shows), and with ``with_sumsq`` its partial sums of squares."""
    block_n, block_k = tiles
    n = w.shape[0] // 2 if gated else w.shape[0]
    out = torch.full((x.shape[0], n), float("nan"), dtype=out_dtype or x.dtype, device=x.device)
    ss = (torch.full((triton.cdiv(n, block_n), SKINNY_MAX_M), float("nan"), device=x.device)
          if with_sumsq else None)
    launch_skinny_gemm(x, w, bias, out, block_n, block_k, 4, gated=gated, norm=norm, sumsq=sumsq,
                       residual=residual, sumsq_out=ss)
    assert not out.isnan().any(), "unwritten output"
    return (out, ss) if with_sumsq else out


def _silu_mul(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("n,k", [(96, 512), (72, 600)])
@pytest.mark.parametrize("tiles", TILES)
def test_plain_and_bias_match_float32(dtype, m, n, k, tiles):
    _, x, w, b = _data(m, n, k, dtype, seed=m + n + k)
    for bias in (None, b):
        out = _gemm(x, w, tiles, bias)
        assert out.shape == (m, n) and out.dtype == dtype
        ref = x.float() @ w.float().T + (0 if bias is None else b.float())
        assert _rel(out, ref) < 1e-2
        assert _rel(out, ref) <= 2 * _rel(F.linear(x, w, bias), ref) + 1e-3  # as close as torch's own GEMM


@pytest.mark.parametrize("m", [1, 4])
def test_float32_output_is_the_rounded_result_widened(m):
    # The LM head's float32 logits straight from the kernel: the bf16 result, widened.
    _, x, w, _ = _data(m, 200, 256, torch.bfloat16, seed=m)
    out = _gemm(x, w, (64, 256), out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, _gemm(x, w, (64, 256)).float())
    assert _rel(out, x.float() @ w.float().T) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("d,k", [(64, 512), (50, 600)])
def test_gated_matches_float32_and_the_unfused_pair(dtype, m, d, k):
    _, x, w, b = _data(m, 2 * d, k, dtype, seed=m + d)
    for bias in (None, b):
        out = _gemm(x, w, (32, 256), bias, gated=True)
        assert out.shape == (m, d) and out.dtype == dtype
        assert _rel(out, _silu_mul(x.float() @ w.float().T + (0 if bias is None else b.float()))) < 1e-2
        # The products are rounded to the dtype before the activation, as the
        # unfused GEMM + SiLU-and-mul round them.
        unfused = _silu_mul(_gemm(x, w, (64, 256), bias).float()).to(dtype)
        torch.testing.assert_close(out, unfused, rtol=1e-2, atol=1e-2)


def _norm_reference(x, norm_w, eps):
    """Float32 pre-norm input as the unfused kernel rounds it (the normalized row
    rounded to x's dtype)."""
    s = x.float()
    return (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float() * norm_w.float()


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("weight_in_loop", [True, False])
@pytest.mark.parametrize("given_sumsq", [False, True])
def test_rms_norm_folded_matches_float32(m, gated, weight_in_loop, given_sumsq):
    # The norm weight multiplied into x's tiles in the K loop, or already
    # multiplied into the weight's columns (fold_norm_weight); the rows' sums
    # of squares from the Gram diagonal of the K loop, or given as the partial
    # sums that the GEMM which wrote x returned (with the residual add in its
    # epilogue, as down hands the stream to the next layer's qkv).
    dtype, k, n, eps = torch.bfloat16, 600, 160 if gated else 96, 1e-5
    g, h, w_prev, _ = _data(m, k, 256, dtype, seed=m + n)
    r = (torch.randn(m, k, generator=g, device=DEVICE) * 3).to(dtype)
    x, sumsq = _gemm(h, w_prev, (32, 512), residual=r, with_sumsq=True)
    norm_w = (torch.rand(k, generator=g, device=DEVICE) + 0.5).to(dtype)
    w = (torch.randn(n, k, generator=g, device=DEVICE) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g, device=DEVICE).to(dtype)
    tiles = (32, 128) if gated else (32, 256)
    if weight_in_loop:
        out = _gemm(x, w, tiles, b, gated=gated, norm=(norm_w, eps), sumsq=sumsq if given_sumsq else None)
    else:
        out = _gemm(x, w * norm_w, tiles, b, gated=gated, norm=(None, eps), sumsq=sumsq if given_sumsq else None)
    ref = _norm_reference(x, norm_w, eps) @ w.float().T + b.float()
    if gated:
        ref = _silu_mul(ref)
    assert out.shape == (m, n // 2 if gated else n) and out.dtype == dtype
    assert _rel(out, ref) < 1e-2
    # As close to float32 as the unfused norm + GEMM pair.
    normed = _norm_reference(x, torch.ones_like(norm_w), eps).to(dtype) * norm_w
    unfused = _gemm(normed, w, (64, 256), b, gated=gated)
    assert _rel(out, ref) <= 2 * _rel(unfused, ref) + 1e-3


@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("n,k", [(96, 512), (100, 600)])
def test_residual_added_in_the_epilogue_as_the_separate_add(m, n, k):
    g, x, w, _ = _data(m, n, k, torch.bfloat16, seed=m + n)
    r = torch.randn(m, n, generator=g, device=DEVICE).to(torch.bfloat16)
    assert torch.equal(_gemm(x, w, (32, 256), residual=r), _gemm(x, w, (32, 256)) + r)


@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("n,k", [(96, 512), (100, 600)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_partial_sums_of_squares_add_up_to_the_rows_as_written(m, n, k, with_residual):
    g, x, w, _ = _data(m, n, k, torch.bfloat16, seed=m + n + k)
    r = torch.randn(m, n, generator=g, device=DEVICE).to(torch.bfloat16) if with_residual else None
    out, sumsq = _gemm(x, w, (32, 256), residual=r, with_sumsq=True)
    assert torch.equal(out, _gemm(x, w, (32, 256), residual=r))  # the result itself is unchanged
    assert sumsq.shape == (triton.cdiv(n, 32), SKINNY_MAX_M)
    totals = sumsq.sum(0)
    torch.testing.assert_close(totals[:m], out.float().pow(2).sum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(totals[m:], torch.zeros(SKINNY_MAX_M - m, device=DEVICE))
