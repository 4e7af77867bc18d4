"""The verification attention kernel (``verify_attention``: a fixed number of
new tokens per request, causal among them) against a plain-PyTorch float32
paged-attention reference: on CUDA at full shapes, on CPU in Triton's
interpreter at small ones."""

from __future__ import annotations

import math

import pytest
import torch

from ember.layers.attention.backend import standard_layout
from tests.kernels.interpret import DEVICE, by_device, synchronize

pytest.importorskip("triton")


def reference(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: list[int],
              query_len: int, scale: float, kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """float32 attention, request by request: K/V gathered slot by slot through
    the block table (times ``kv_scales``), each query head against its KV head
    (head // group), new token j of a request at position ``seq_len -
    query_len + j`` seeing keys ``0 ..`` that position. Padding requests
    (``seq_len`` 0) give zeros."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros(query.shape, dtype=torch.float32)
    cache = standard_layout(kv_cache).float().cpu()
    cache[0] *= kv_scales[0]
    cache[1] *= kv_scales[1]
    table = block_table.cpu()
    for r, seq_len in enumerate(seq_lens):
        if seq_len == 0:
            continue
        slots = [(int(table[r, p // block_size]), p % block_size) for p in range(seq_len)]
        k = torch.stack([cache[0, b, o] for b, o in slots])  # [seq_len, kv_heads, head_dim]
        v = torch.stack([cache[1, b, o] for b, o in slots])
        for j in range(query_len):
            pos = seq_len - query_len + j
            t = r * query_len + j
            for h in range(num_heads):
                qv = query[t, h].float().cpu()
                s = (k[: pos + 1, h // group] @ qv) * scale
                out[t, h] = torch.softmax(s, dim=0) @ v[: pos + 1, h // group]
    return out


def _case(seq_lens, query_len, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 2
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(max(blocks), 1)
    table = torch.zeros(len(seq_lens), width + 1, dtype=torch.int32)  # a spare column, as graph buffers have
    for r, nb in enumerate(blocks):
        table[r, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
    q = torch.randn(len(seq_lens) * query_len, num_heads, head_dim, generator=g).to(dtype)
    return q.to(DEVICE), kv.to(DEVICE), table.to(DEVICE)


def _check(seq_lens, query_len, num_heads, num_kv_heads, head_dim=64, block_size=16, num_splits=1,
           dtype=torch.float32, seed=0, tol=1e-5, cache_dtype=None, kv_scales=None):
    from ember.kernels.triton_attention import verify_attention

    q, kv, table = _case(seq_lens, query_len, num_heads, num_kv_heads, head_dim, block_size, dtype, seed)
    if cache_dtype is not None:
        kv = kv.to(cache_dtype)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scales = None if kv_scales is None else tuple(torch.tensor(x, device=DEVICE) for x in kv_scales)
    verify_attention(q, kv, out, table, lens, query_len, scale, num_splits, kv_scales=scales)
    synchronize()
    ref = reference(q, kv, table, seq_lens, query_len, scale, kv_scales or (1.0, 1.0))
    assert not out.isnan().any(), "unwritten or NaN output"
    err = (out.float().cpu() - ref).abs().max().item()
    assert err < tol, f"max abs error {err:.3e}"


# Sequence lengths: shorter than a block, not multiples of the block size, past
# a 64-key tile, and a padding request (0).
@pytest.mark.parametrize("query_len", [1, 2, 3, 5])
@pytest.mark.parametrize("group", [1, 4])
def test_causal_new_tokens_float32(query_len, group):
    _check([query_len + 2, 37, by_device(300, 70), 0], query_len, 2 * group, 2)


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_block_sizes_and_splits(block_size, num_splits):
    # Splits of 64-key tiles: with 4 splits, some splits are empty and the last
    # tile of a split may hold only keys the earlier new tokens must not see.
    _check([by_device(260, 131), 66, 5], 4, 8, 2, block_size=block_size, num_splits=num_splits, seed=3)


def test_group_not_a_power_of_two_and_head_dim_80():
    # 7 query heads per KV head x 3 tokens = 21 rows of a 32-row tile; head_dim padded to 128.
    _check([45, 19], 3, 7, 1, head_dim=80, num_splits=2, seed=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit(dtype):
    _check([by_device(500, 90), 23], 4, 8, 2, num_splits=2, dtype=dtype, seed=7, tol=2e-2)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_cache_with_scales(cache_dtype):
    # The reference dequantizes the cache's FP8 values (times the scales) in float32.
    _check([by_device(300, 70), 9], 3, 8, 2, num_splits=2, dtype=torch.bfloat16, seed=11, tol=3e-2,
           cache_dtype=cache_dtype, kv_scales=(0.5, 2.0))


def test_matches_decode_kernel_at_one_token():
    """query_len 1 is the decode kernel's problem: same values, to rounding."""
    from ember.kernels.triton_attention import decode_attention, verify_attention

    q, kv, table = _case([40, 77, 3], 1, 8, 2, 64, 16, torch.float32, 9)
    lens = torch.tensor([40, 77, 3], dtype=torch.int32, device=DEVICE)
    a, b = torch.empty_like(q), torch.empty_like(q)
    verify_attention(q, kv, a, table, lens, 1, 0.125, 2)
    decode_attention(q, kv, b, table, lens, 0.125, 2)
    synchronize()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_llama_8b_shapes_gpu():
    # 32 query heads over 8 KV heads, head_dim 128, k = 4 drafts, batch 8, long contexts.
    _check([1000, 6, 5, 129, 2047, 4096, 77, 0], 5, 32, 8, head_dim=128, num_splits=4, dtype=torch.bfloat16,
           tol=2e-2)
