"""Fused Triton ops vs the plain-PyTorch layers, bf16 and float32. GPU only."""

import pytest
import torch

from ember.layers.activation import silu_and_mul
from ember.layers.layernorm import RMSNorm
from ember.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [576, 4096, 7168])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    g = torch.Generator(device="cuda").manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5).cuda().to(dtype)
    norm.weight.data = torch.randn(hidden, generator=g, device="cuda").to(dtype)
    x = torch.randn(37, hidden, generator=g, device="cuda").to(dtype)
    r = torch.randn(37, hidden, generator=g, device="cuda").to(dtype)
    ref = norm.cpu()(x.cpu())
    out = norm.cuda()(x)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert _rel(out.cpu(), ref) < tol
    ref_o, ref_r = norm.cpu()(x.cpu(), r.cpu())
    o, new_r = norm.cuda()(x, r)
    assert torch.equal(new_r.cpu(), ref_r)
    assert _rel(o.cpu(), ref_o) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_head_rms_norm_on_a_strided_view(dtype):
    # Qwen3's q/k norm: [tokens, heads, head_dim] sliced out of the fused qkv output.
    g = torch.Generator(device="cuda").manual_seed(3)
    num_heads, num_kv_heads, head_dim = 32, 8, 128
    norm = RMSNorm(head_dim, 1e-6).cuda().to(dtype)
    norm.weight.data = torch.randn(head_dim, generator=g, device="cuda").to(dtype)
    qkv = torch.randn(29, (num_heads + 2 * num_kv_heads) * head_dim, generator=g, device="cuda").to(dtype)
    q = qkv[:, : num_heads * head_dim].view(29, num_heads, head_dim)
    x = q.float()
    ref = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).float() * norm.weight.float()
    out = norm(q)
    assert out.shape == q.shape
    assert _rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul(dtype):
    x = torch.randn(19, 2 * 3000, device="cuda").to(dtype)
    ref = silu_and_mul(x.cpu().float())
    out = silu_and_mul(x)
    assert _rel(out.cpu(), ref) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 128), (128, 64)])
def test_rotary_in_place(head_dim, rotary_dim):
    rope = RotaryEmbedding(head_dim, rotary_dim, 4096, 10000.0)
    n, hq, hk = 23, 14, 2
    qkv = torch.randn(n, (hq + 2 * hk) * head_dim, device="cuda")
    q, k, _ = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
    pos = torch.randint(0, 4096, (n,), device="cuda")
    ref_q, ref_k = rope.forward(pos.cpu(), q.cpu().clone(), k.cpu().clone())
    out_q, out_k = rope.cuda().forward(pos, q, k)
    assert _rel(out_q.cpu(), ref_q) < 1e-6 and _rel(out_k.cpu(), ref_k) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(1, 128256), (7, 151936), (300, 4097), (2, 5)])
def test_argmax_rows_matches_torch(dtype, rows, n):
    from ember.kernels.triton_ops import argmax_rows

    g = torch.Generator(device="cuda").manual_seed(rows + n)
    x = torch.randn(rows, n, generator=g, device="cuda").to(dtype)
    x[0, n // 2] = x[0, n - 1] = x[0].max() + 1  # a tie: the first index wins
    if rows > 1:
        x[1] = float("-inf")
    if rows > 2:
        x[2] = torch.randint(0, 3, (n,), generator=g, device="cuda").to(dtype)  # many ties
    out = argmax_rows(x)
    assert out.dtype == torch.int64
    assert torch.equal(out, x.argmax(dim=-1))
    assert torch.equal(argmax_rows(x[:, : n - 1]), x[:, : n - 1].argmax(dim=-1))  # row stride != n
