"""FP8 KV cache with per-layer scales: the Triton KV write, extend and decode
kernels against a float32 reference that quantizes with the scales
(``x / scale``, saturated, rounded to nearest even), dequantizes
(``fp8 * scale``) and attends densely; on CUDA at full shapes, without it in
Triton's interpreter at small ones (tests/kernels/interpret.py)."""

from __future__ import annotations

import pytest
import torch

from ember.layers.attention.backend import standard_layout, to_cache_dtype
from ember.layers.attention.torch_backend import TorchAttentionBackend
from tests.kernels.interpret import DEVICE, by_device, synchronize
from tests.kernels.test_triton_attention import BLOCK, _case, _triton_backend

pytest.importorskip("triton")

FP8 = torch.float8_e4m3fn


def quant_dequant(x: torch.Tensor, scale: float) -> torch.Tensor:
    """What an FP8 cache with ``scale`` gives back of ``x``, in float32."""
    return to_cache_dtype(x.float(), FP8, torch.tensor(scale)).float() * scale


def _scaled_case(reqs, num_heads, num_kv_heads, head_dim, seed, magnitude):
    """A case whose new K/V are ``magnitude`` times larger than unit normals
    (past FP8's range unless scaled); its cache's old context is random FP8
    codes (meaning code * scale)."""
    q, k, v, kv, meta = _case(reqs, num_heads, num_kv_heads, head_dim, seed, cache_dtype=FP8)
    k, v = (k.float() * magnitude).to(torch.bfloat16), (v.float() * magnitude).to(torch.bfloat16)
    return q, k, v, kv, meta


@pytest.mark.parametrize("group", by_device([1, 4], [1, 3]))
@pytest.mark.parametrize("num_decodes", [0, 2])
def test_scaled_fp8_write_extend_decode_vs_float32_reference(group, num_decodes):
    head_dim, num_kv_heads = by_device(128, 64), 2
    num_heads = num_kv_heads * group
    magnitude = 2000.0  # |x| up to ~8000: unscaled, e4m3 (max 448) would saturate
    k_scale, v_scale = 8000.0 / 448, 6000.0 / 448
    reqs = [(by_device(300, 150), 1), (BLOCK - 1, 1), (0, BLOCK + 3), (BLOCK + 1, 5)]
    q, k, v, kv, meta = _scaled_case(reqs, num_heads, num_kv_heads, head_dim, 11, magnitude)
    meta.num_decodes = num_decodes
    scale = head_dim ** -0.5
    scales = (torch.tensor(k_scale, device=DEVICE), torch.tensor(v_scale, device=DEVICE))
    # Reference: a float32 cache of the dequantized old context, new K/V quantized then dequantized.
    ref_cache = standard_layout(kv).float().clone()
    ref_cache[0] *= k_scale
    ref_cache[1] *= v_scale
    # Queries small enough that the softmax is not one-hot at these key sizes.
    q = (q.float() / magnitude).to(torch.bfloat16)
    ref = TorchAttentionBackend(num_heads, head_dim, scale, num_kv_heads).forward(
        q.float().cpu(), quant_dequant(k, k_scale).cpu(), quant_dequant(v, v_scale).cpu(), ref_cache.cpu(),
        _on_cpu(meta))
    out = _triton_backend(num_heads, head_dim, scale, num_kv_heads).forward(q, k, v, kv, meta, kv_scales=scales)
    synchronize()
    assert torch.isfinite(out.float()).all()
    rel = (out.float().cpu() - ref).norm() / ref.norm()
    assert rel < 1.5e-2, f"relative error {rel:.3e}"
    # The write: exactly the reference quantization's codes.
    written = standard_layout(kv).float().cpu().view(2, -1, num_kv_heads, head_dim)[:, meta.slot_mapping.cpu()]
    torch.testing.assert_close(written[0] * k_scale, quant_dequant(k, k_scale).cpu(), rtol=0, atol=0)
    torch.testing.assert_close(written[1] * v_scale, quant_dequant(v, v_scale).cpu(), rtol=0, atol=0)


def _on_cpu(meta):
    from dataclasses import replace

    return replace(meta, slot_mapping=meta.slot_mapping.cpu(), query_start_loc=meta.query_start_loc.cpu(),
                   seq_lens=meta.seq_lens.cpu(), block_table=meta.block_table.cpu())


def test_scales_are_ignored_by_a_16_bit_cache():
    """A bf16 cache holds K/V as they are, whatever the layer's scales."""
    q, k, v, kv, meta = _case([(20, 1), (0, 9)], 4, 2, 64, seed=3)
    backend = _triton_backend(4, 64, 0.125, 2)
    kv2 = kv.clone()
    plain = backend.forward(q.clone(), k, v, kv, meta)
    scales = (torch.tensor(3.0, device=DEVICE), torch.tensor(0.5, device=DEVICE))
    scaled = backend.forward(q.clone(), k, v, kv2, meta, kv_scales=scales)
    synchronize()
    assert torch.equal(plain, scaled) and torch.equal(kv, kv2)


def test_unit_scales_match_the_unscaled_fp8_path():
    """Scales of 1.0 give the same cache bytes and the same outputs as no scales."""
    q, k, v, kv, meta = _case([(40, 1), (BLOCK, 1), (0, 7)], 4, 2, 64, seed=4, cache_dtype=FP8)
    meta.num_decodes = 2
    backend = _triton_backend(4, 64, 0.125, 2)
    kv2 = kv.clone()
    plain = backend.forward(q.clone(), k, v, kv, meta)
    ones = (torch.ones((), device=DEVICE), torch.ones((), device=DEVICE))
    scaled = backend.forward(q.clone(), k, v, kv2, meta, kv_scales=ones)
    synchronize()
    assert torch.equal(kv.view(torch.uint8), kv2.view(torch.uint8))
    torch.testing.assert_close(plain.float(), scaled.float(), rtol=1e-3, atol=1e-3)


def test_fused_rope_write_with_scales_equals_rope_then_write():
    """The fused RoPE + KV write quantizes with the scales bit for bit as the
    rotary kernel followed by the scaled KV write."""
    from ember.kernels.triton_attention import rope_and_store_kv_cache, store_kv_cache
    from ember.kernels.triton_ops import rotary_embedding_
    from ember.layers.rotary import RotaryEmbedding

    g = torch.Generator(device=DEVICE).manual_seed(1)
    n, num_heads, num_kv_heads, head_dim, num_blocks = 13, 4, 2, 64, 4
    rope = RotaryEmbedding(head_dim, head_dim, 4096, 500000.0).to(DEVICE)
    qkv = (torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim, generator=g, device=DEVICE) * 900
           ).to(torch.bfloat16)
    qs, ks = num_heads * head_dim, num_kv_heads * head_dim
    positions = torch.randint(0, 4096, (n,), generator=g, device=DEVICE)
    slots = torch.randperm(num_blocks * BLOCK, generator=g, device=DEVICE)[:n]
    scales = (torch.tensor(7.25, device=DEVICE), torch.tensor(3.5, device=DEVICE))
    caches = []
    for fused in (False, True):
        q, k, v = qkv.clone().split([qs, ks, ks], dim=-1)
        kv = torch.zeros(2, num_blocks, BLOCK, num_kv_heads, head_dim, device=DEVICE).to(FP8)
        q3, k3, v3 = (t.view(n, -1, head_dim) for t in (q, k, v))
        if fused:
            rope_and_store_kv_cache(positions, q3, k3, v3, kv, slots, rope.cos_sin_cache, scales)
        else:
            rotary_embedding_(positions, q, k, rope.cos_sin_cache, head_dim, head_dim)
            store_kv_cache(k3, v3, kv, slots, scales)
            rotated_k, values = k3.clone(), v3.clone()
        caches.append(kv)
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8))
    written = standard_layout(caches[1]).view(2, -1, num_kv_heads, head_dim)[:, slots]
    ref_k = to_cache_dtype(rotated_k.cpu(), FP8, scales[0].cpu())
    ref_v = to_cache_dtype(values.cpu(), FP8, scales[1].cpu())
    assert torch.equal(written[0].cpu().view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(written[1].cpu().view(torch.uint8), ref_v.view(torch.uint8))
