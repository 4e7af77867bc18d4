"""MLA over the paged latent cache vs dense float32 attention on decompressed K/V.

A mixed batch (a fresh prefill, a chunk after cached tokens, several decodes)
checks both paths of the torch MLA backend: decompressed (multi-token) and
absorbed (single-token), and that the absorbed form equals the decompressed
one on the same decode rows.
"""

from __future__ import annotations

import math

import torch

from ember.layers.attention.backend import AttentionMetadata
from ember.layers.attention.mla import TorchMLABackend, mla_kv_cache_spec

H, NOPE, ROPE, V, RANK = 4, 16, 8, 12, 24
BLOCK_SIZE, NUM_BLOCKS = 4, 64


def dense_mla(q_nope, q_pe, kv_c, k_pe, w_kv_b, scale):
    """q_*: [Lq, H, *] for the last Lq of L positions; kv_c: [L, RANK]; k_pe: [L, ROPE]."""
    L, lq = kv_c.shape[0], q_nope.shape[0]
    kv = (kv_c @ w_kv_b.T).view(L, H, NOPE + V)
    k = torch.cat([kv[..., :NOPE], k_pe[:, None, :].expand(L, H, ROPE)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos_q = torch.arange(L - lq, L)[:, None]
    scores = scores.masked_fill(torch.arange(L)[None, :] > pos_q, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), kv[..., NOPE:])


def test_mixed_batch_matches_dense():
    torch.manual_seed(0)
    scale = 1 / math.sqrt(NOPE + ROPE)
    w_kv_b = torch.randn(H * (NOPE + V), RANK) / math.sqrt(RANK)
    spec = mla_kv_cache_spec(1, BLOCK_SIZE, RANK, ROPE, torch.float32)
    kv_cache = torch.zeros(spec.layer_shape(NUM_BLOCKS))
    assert kv_cache.shape == (NUM_BLOCKS, BLOCK_SIZE, RANK + ROPE)
    # (tokens already cached, new tokens): fresh prefill, chunked prefill, three decodes.
    reqs = [(0, 7), (9, 6), (12, 1), (3, 1), (21, 1)]
    free = list(range(NUM_BLOCKS))[::-1]
    tables, slots, starts, lens, refs = [], [], [0], [], []
    q_nopes, q_pes, kv_cs, k_pes = [], [], [], []
    for cached, new in reqs:
        L = cached + new
        blocks = [free.pop() for _ in range(-(-L // BLOCK_SIZE))]
        ctx_c, ctx_pe = torch.randn(L, RANK), torch.randn(L, ROPE)
        for p in range(cached):  # earlier steps' latents
            kv_cache[blocks[p // BLOCK_SIZE], p % BLOCK_SIZE] = torch.cat([ctx_c[p], ctx_pe[p]])
        q_nope, q_pe = torch.randn(new, H, NOPE), torch.randn(new, H, ROPE)
        refs.append(dense_mla(q_nope, q_pe, ctx_c, ctx_pe, w_kv_b, scale))
        q_nopes.append(q_nope), q_pes.append(q_pe), kv_cs.append(ctx_c[cached:]), k_pes.append(ctx_pe[cached:])
        slots += [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(cached, L)]
        tables.append(blocks), starts.append(starts[-1] + new), lens.append(L)
    width = max(map(len, tables))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=7, max_seq_len=max(lens), query_start_loc_cpu=starts, seq_lens_cpu=lens)
    backend = TorchMLABackend(H, NOPE, ROPE, V, RANK, scale)
    q_nope, q_pe = torch.cat(q_nopes), torch.cat(q_pes)
    out = backend.forward(q_nope, q_pe, torch.cat(kv_cs), torch.cat(k_pes), w_kv_b, kv_cache, meta)
    torch.testing.assert_close(out, torch.cat(refs), rtol=1e-5, atol=1e-5)
    # The absorbed form on the decode rows equals the decompressed form on the same rows.
    decompressed = torch.empty_like(out)
    for i in (2, 3, 4):
        backend._prefill_decompressed(q_nope, q_pe, w_kv_b, kv_cache, meta, i, decompressed)
    rows = [starts[i] for i in (2, 3, 4)]
    torch.testing.assert_close(out[rows], decompressed[rows], rtol=1e-5, atol=1e-6)
