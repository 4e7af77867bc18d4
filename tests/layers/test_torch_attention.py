"""The paged torch attention backend vs dense float32 causal attention."""

import math
import random

import pytest
import torch

from ember.layers.attention.backend import AttentionMetadata
from ember.layers.attention.torch_backend import TorchAttentionBackend, write_kv_cache


def dense_reference(q, k, v, scale):
    """q: [Lq, Hq, D] for the last Lq positions of k/v: [L, Hk, D]."""
    lq, hq, d = q.shape
    L, hk, _ = k.shape
    rep = hq // hk
    k = k.repeat_interleave(rep, 1)
    v = v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos_q = torch.arange(L - lq, L)[:, None]
    scores = scores.masked_fill(torch.arange(L)[None, :] > pos_q, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def fp8_round_trip(x, dtype):
    """What a cache of ``dtype`` holds of ``x``, as float32 (FP8: saturated at
    the format's largest finite value, rounded to nearest even)."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        fmax = torch.finfo(dtype).max
        x = x.float().clamp(-fmax, fmax).to(dtype)
    return x.float()


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,cache_dtype", [
    (4, 4, 64, torch.float32), (8, 2, 64, torch.float32), (7, 1, 128, torch.float32), (16, 2, 128, torch.float32),
    (8, 2, 64, torch.float8_e4m3fn), (7, 1, 128, torch.float8_e5m2),
])
def test_mixed_batch_matches_dense(num_heads, num_kv_heads, head_dim, cache_dtype):
    """An FP8 cache is checked against dense attention over the FP8-rounded K/V."""
    torch.manual_seed(0)
    rng = random.Random(0)
    block_size, num_blocks = 16, 64
    # (cached tokens, new tokens): prefill, chunk after context, decodes, block_size +- 1.
    reqs = [(0, 17), (15, 1), (16, 1), (33, 4), (0, 1), (47, 1), (100, 30)]
    scale = 1 / math.sqrt(head_dim)
    kv_cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=cache_dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)  # block tables point anywhere
    full_k, full_v, tables, qs, ks, vs, slots = [], [], [], [], [], [], []
    for cached, new in reqs:
        L = cached + new
        k = torch.randn(L, num_kv_heads, head_dim)
        v = torch.randn(L, num_kv_heads, head_dim)
        k[-1, 0, 0] = 1e6  # saturates in FP8 (finite, unlike a plain cast to e5m2)
        blocks = [free.pop() for _ in range(-(-L // block_size))]
        # Put the cached part straight into the cache (in its layout: V transposed in FP8).
        cached_slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(cached)],
                                    dtype=torch.long)
        write_kv_cache(k[:cached], v[:cached], kv_cache, cached_slots)
        full_k.append(fp8_round_trip(k, cache_dtype)), full_v.append(fp8_round_trip(v, cache_dtype))
        tables.append(blocks)
        qs.append(torch.randn(new, num_heads, head_dim))
        ks.append(k[cached:]), vs.append(v[cached:])
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(cached, L)]
    max_blocks = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
    starts = [0]
    for _, new in reqs:
        starts.append(starts[-1] + new)
    seq_lens = [c + n for c, n in reqs]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=table,
        max_query_len=max(n for _, n in reqs), max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    backend = TorchAttentionBackend(num_heads, head_dim, scale, num_kv_heads)
    out = backend.forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), kv_cache, meta)
    assert not out.isnan().any()
    for i in range(len(reqs)):
        ref = dense_reference(qs[i], full_k[i], full_v[i], scale)
        torch.testing.assert_close(out[starts[i]: starts[i + 1]], ref, rtol=1e-5, atol=1e-5)
    # The new K/V landed in their slots.
    for i, (cached, new) in enumerate(reqs):
        p = cached + new - 1
        torch.testing.assert_close(kv_cache[0, tables[i][p // block_size], p % block_size].float(), full_k[i][p])


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_cache_layout(cache_dtype):
    """A block's K is token-major ([block_size, heads, dim]); so is its V in a
    16-bit cache, while an FP8 cache stores V transposed ([heads, dim,
    block_size]); ``standard_layout`` gives V token-major in both."""
    from ember.layers.attention.backend import standard_layout, v_transposed

    block_size, heads, dim = 16, 2, 8
    kv = torch.zeros(2, 3, block_size, heads, dim, dtype=cache_dtype)
    slots = torch.tensor([0, 17, 31, 40])
    k, v = torch.randn(4, heads, dim), torch.randn(4, heads, dim)
    write_kv_cache(k, v, kv, slots)
    std = standard_layout(kv)

    def stored_as(x):
        return fp8_round_trip(x, cache_dtype).to(cache_dtype).float()

    for i, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, block_size)
        assert torch.equal(kv[0, block, offset].float(), stored_as(k[i]))
        stored = kv[1, block].reshape(-1)
        v_bytes = (stored.view(heads, dim, block_size)[:, :, offset] if v_transposed(cache_dtype)
                   else stored.view(block_size, heads, dim)[offset])
        assert torch.equal(v_bytes.float(), stored_as(v[i]))
        assert torch.equal(std[1, block, offset].float(), stored_as(v[i]))
