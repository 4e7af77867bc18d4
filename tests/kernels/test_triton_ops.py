"""Fused Triton ops vs the plain-PyTorch layers (their CPU paths), bf16 and
float32: on CUDA at full shapes, without it on CPU in Triton's interpreter at
small ones (tests/kernels/interpret.py)."""

import pytest
import torch

from ember.layers.activation import silu_and_mul as silu_and_mul_native
from ember.layers.layernorm import RMSNorm
from ember.layers.rotary import RotaryEmbedding
from tests.kernels.interpret import DEVICE, by_device

pytest.importorskip("triton")

from ember.kernels.triton_ops import argmax_rows, rms_norm, rotary_embedding_, silu_and_mul  # noqa: E402


def _rel(a, b):
    return ((a.cpu().float() - b.cpu().float()).norm() / b.cpu().float().norm()).item()


def _tol(dtype):
    return 1e-2 if dtype == torch.bfloat16 else 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", by_device([576, 4096, 7168], [576, 2048]))
def test_rms_norm_with_and_without_residual(dtype, hidden):
    g = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    norm.weight.data = torch.randn(hidden, generator=g).to(dtype)
    x = torch.randn(37, hidden, generator=g).to(dtype)
    r = torch.randn(37, hidden, generator=g).to(dtype)
    w = norm.weight.to(DEVICE)
    ref = norm(x)
    out = rms_norm(x.to(DEVICE), w, 1e-5)
    assert out.dtype == dtype and _rel(out, ref) < _tol(dtype)
    ref_o, ref_r = norm(x, r)
    o, new_r = rms_norm(x.to(DEVICE), w, 1e-5, r.to(DEVICE))
    assert torch.equal(new_r.cpu(), ref_r)  # the sum rounded to the dtype, as the separate add
    assert _rel(o, ref_o) < _tol(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_of_strided_rows_and_of_heads(dtype):
    # Rows sliced out of a wider output (row stride > hidden), and Qwen3's
    # per-head q norm: [tokens, heads, head_dim] rows of one head each.
    g = torch.Generator().manual_seed(3)
    num_heads, num_kv_heads, head_dim = 32, 8, 128
    norm = RMSNorm(head_dim, 1e-6).to(dtype)
    norm.weight.data = torch.randn(head_dim, generator=g).to(dtype)
    n = by_device(29, 7)
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(n, num_heads, head_dim)
    w = norm.weight.to(DEVICE)
    out = rms_norm(q.reshape(-1, head_dim).to(DEVICE), w, 1e-6).view(q.shape)
    assert _rel(out, norm(q)) < _tol(dtype)
    big = RMSNorm(1024, 1e-6).to(dtype)
    big.weight.data = torch.randn(1024, generator=g).to(dtype)
    rows = qkv.to(DEVICE)[:, 512:1536]
    assert rows.stride(0) != 1024
    assert _rel(rms_norm(rows, big.weight.to(DEVICE), 1e-6), big(qkv[:, 512:1536])) < _tol(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul(dtype):
    # d = 3000 (1500 on CPU): more than one 1024-column program per row.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(by_device(19, 5), 2 * by_device(3000, 1500), generator=g).to(dtype)
    ref = silu_and_mul_native(x.float())
    out = silu_and_mul(x.to(DEVICE))
    assert out.dtype == dtype and _rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 128), (128, 64)])
def test_rotary_in_place(dtype, head_dim, rotary_dim):
    # q and k are strided views of one qkv output, as the models pass them.
    g = torch.Generator().manual_seed(head_dim + rotary_dim)
    rope = RotaryEmbedding(head_dim, rotary_dim, 4096, 10000.0)
    n, hq, hk = 23, 14, 2
    qkv = torch.randn(n, (hq + 2 * hk) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.to(DEVICE).split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
    pos = torch.randint(0, 4096, (n,), generator=g)
    ref_q, ref_k = rope(pos, q.cpu().float(), k.cpu().float())
    before_v = v.clone()
    rotary_embedding_(pos.to(DEVICE), q, k, rope.cos_sin_cache.to(DEVICE), head_dim, rotary_dim)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert _rel(q, ref_q) < tol and _rel(k, ref_k) < tol
    assert torch.equal(v, before_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", by_device([(1, 128256), (7, 151936), (300, 4097), (2, 5)],
                                             [(1, 20000), (7, 9000), (40, 4097), (2, 5)]))
def test_argmax_rows_matches_torch(dtype, rows, n):
    g = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, n, generator=g).to(dtype)
    x[0, n // 2] = x[0, n - 1] = x[0].max() + 1  # a tie: the first index wins
    if rows > 1:
        x[1] = float("-inf")
    if rows > 2:
        x[2] = torch.randint(0, 3, (n,), generator=g).to(dtype)  # many ties
    out = argmax_rows(x.to(DEVICE))
    assert out.dtype == torch.int64
    assert torch.equal(out.cpu(), x.argmax(dim=-1))
    assert torch.equal(argmax_rows(x.to(DEVICE)[:, : n - 1]).cpu(), x[:, : n - 1].argmax(dim=-1))  # row stride != n
