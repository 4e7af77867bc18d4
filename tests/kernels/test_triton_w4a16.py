"""The W4A16 kernels (:mod:`ember.kernels.triton_w4a16`) against float32
products of the weights :func:`dequantize_layout` reads from the same layout:
the one-row CUDA-core path, the tensor-core path (2-16 rows, and 64-row tiles
beyond), split K with the last program summing the partials, act-order
gathers, zero points or the symmetric 8, group sizes 32-128, and the
dequantize kernel bit for bit. Tiny shapes run on CPU in Triton's interpreter
(tests/kernels/interpret.py); the ``gpu`` tests run the Llama-3.1-8B shapes
and a CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.interpret import DEVICE

triton = pytest.importorskip("triton")

from ember.kernels.triton_w4a16 import (DEQUANT_MIN_M, W4A16Workspace, w4a16_dequantize,  # noqa: E402
                                        w4a16_gemm)
from ember.layers.quantization.w4a16 import (W4Weights, build_kernel_layout, dequantize_layout,  # noqa: E402
                                             dequantize_rows)


def _layout(k: int, n: int, group: int, zeros: bool, act_order: str | None, seed: int = 0, device=DEVICE):
    """A random layer in the kernel layout: act_order None, "uniform" (a
    permutation of whole groups) or "ragged" (groups of unequal sizes)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 17, (k // group, n), generator=g, dtype=torch.uint8) if zeros else None
    s = (torch.rand(k // group, n, generator=g) * 0.02 + 0.001).half()
    g_idx = None
    if act_order == "uniform":
        g_idx = torch.argsort(torch.rand(k, generator=g)) // group
    elif act_order == "ragged":
        g_idx = torch.randint(0, k // group, (k,), generator=g)
    layout = build_kernel_layout(W4Weights(q, z, s, g_idx, group))
    for name in ("qweight", "scales", "zeros", "perm"):
        t = getattr(layout, name)
        setattr(layout, name, t.to(device) if t is not None else None)
    return layout


def _run(layout, x, bias=None, split_k=None, workspace=None):
    return w4a16_gemm(x, layout.qweight, layout.scales, layout.zeros, layout.perm, layout.group, layout.k, bias,
                      workspace, split_k=split_k)


def _check(y: torch.Tensor, x: torch.Tensor, layout, bias=None) -> None:
    w = dequantize_layout(layout)
    if x.shape[0] >= DEQUANT_MIN_M:  # the weight is rounded to x's dtype before torch.mm
        w = w.to(x.dtype).float()
    ref = x.float() @ w.t()
    if bias is not None:
        ref += bias.float()
    assert y.dtype == x.dtype and y.shape == ref.shape
    rtol = 2 ** -8 if x.dtype == torch.bfloat16 else 2 ** -11  # the output's rounding
    torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zeros,act_order", [(True, None), (False, "uniform"), (True, "ragged")])
def test_gemm_matches_float32(m, dtype, zeros, act_order):
    layout = _layout(256, 48, 64, zeros, act_order, seed=m)
    x = torch.randn(m, 256, device=DEVICE).to(dtype)
    ws = W4A16Workspace()
    ws.reserve(48, DEVICE)
    _check(_run(layout, x, workspace=ws), x, layout)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("group", [32, 128])
def test_split_k_sums_the_partials_and_re_arms_the_counters(m, group):
    layout = _layout(384, 80, group, True, None, seed=group)
    ws = W4A16Workspace()
    ws.reserve(80, DEVICE)
    bias = torch.randn(80, device=DEVICE).to(torch.bfloat16)
    for seed in (0, 1):  # a second launch finds the counters at zero again
        x = torch.randn(m, 384, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16)
        _check(_run(layout, x, bias, split_k=3, workspace=ws), x, layout, bias)
        assert not ws.get(x.device, 80)[1].any()


def test_k_not_a_multiple_of_the_tile_is_masked():
    layout = _layout(160, 32, 32, True, None)  # K 160: the second 128-row tile is partly padding
    x = torch.randn(3, 160, device=DEVICE).to(torch.float16)
    _check(_run(layout, x), x, layout)
    x = torch.randn(1, 160, device=DEVICE).to(torch.float16)
    _check(_run(layout, x), x, layout)


def test_outlier_activations_stay_finite():
    layout = _layout(256, 32, 128, True, None)
    x = torch.randn(2, 256, device=DEVICE)
    x[:, 7] = 1e4
    for m in (1, 2):
        xm = x[:m].to(torch.bfloat16)
        y = _run(layout, xm)
        assert torch.isfinite(y).all()
        _check(y, xm, layout)


@pytest.mark.parametrize("zeros", [True, False])
def test_dequantize_kernel_is_exact(zeros):
    layout = _layout(256, 48, 32, zeros, "ragged")
    w = w4a16_dequantize(layout.qweight, layout.scales, layout.zeros, layout.group, torch.float32)
    ref = dequantize_rows(layout)
    assert torch.equal(w, ref)
    w16 = w4a16_dequantize(layout.qweight, layout.scales, layout.zeros, layout.group, torch.bfloat16)
    assert torch.equal(w16, ref.to(torch.bfloat16))


def test_large_batches_dequantize_then_multiply():
    layout = _layout(128, 32, 64, True, "uniform")
    x = torch.randn(DEQUANT_MIN_M, 128, device=DEVICE).to(torch.bfloat16)
    _check(_run(layout, x), x, layout)


# --------------------------------------------------------------------- GPU
LLAMA_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N): qkv, o, gate_up, down


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", LLAMA_8B)
@pytest.mark.parametrize("m", [1, 8, 64, 1024])
def test_llama_8b_shapes(k, n, m):
    torch.backends.cuda.matmul.allow_tf32 = False
    layout = _layout(k, n, 128, True, None, device="cuda")
    ws = W4A16Workspace()
    ws.reserve(n, DEVICE)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    _check(_run(layout, x, workspace=ws), x, layout)


@pytest.mark.gpu
def test_act_order_at_a_real_shape():
    layout = _layout(4096, 4096, 128, True, "uniform", device="cuda")
    ws = W4A16Workspace()
    ws.reserve(4096, DEVICE)
    for m in (1, 4, 100):
        x = torch.randn(m, 4096, device="cuda").to(torch.float16)
        _check(_run(layout, x, workspace=ws), x, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
def test_cuda_graph_replay_with_new_inputs(m):
    layout = _layout(4096, 4096, 128, True, None, device="cuda")
    ws = W4A16Workspace()
    ws.reserve(4096, DEVICE)
    x = torch.randn(m, 4096, device="cuda").to(torch.bfloat16)
    _run(layout, x, workspace=ws)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _run(layout, x, workspace=ws)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _check(y, x, layout)


def test_decode_config_table_overrides_the_rule(monkeypatch):
    """A listed (N, K_pad, M bucket) takes the table's tiles; the result stays exact."""
    from ember.kernels import triton_w4a16

    layout = _layout(256, 48, 128, zeros=True, act_order=None, seed=3)
    rule = triton_w4a16.decode_config(5, 48, 2, 132)
    monkeypatch.setitem(triton_w4a16.W4A16_DECODE_CONFIGS, (48, 256, 4), (16, 2, 4))
    assert triton_w4a16.decode_config(3, 48, 2, 132) == (16, 2, 4)
    assert triton_w4a16.decode_config(3, 48, 3, 132) != (16, 2, 4)  # another K
    assert triton_w4a16.decode_config(5, 48, 2, 132) == rule  # bucket 8 is not listed
    ws = W4A16Workspace()
    ws.reserve(48, DEVICE)
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.bfloat16)
    _check(_run(layout, x, workspace=ws), x, layout)
