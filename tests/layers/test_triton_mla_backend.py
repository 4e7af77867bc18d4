"""The Triton MLA backend (absorbed form in ``ember.kernels.triton_mla``; on
CPU in Triton's interpreter) against the plain-PyTorch MLA backend and dense
float32 attention on decompressed K/V, on the steps it serves: a mixed step
(a prompt chunk longer than the absorbed path takes, a short chunk, decodes),
a decode step as the CUDA-graph runner pads it (slots -1, seq_len 0, no host
lists), and a uniform verification step with a padding request."""

from __future__ import annotations

import math

import pytest
import torch

from ember.layers.attention.backend import AttentionMetadata
from ember.layers.attention.mla import TorchMLABackend, mla_kv_cache_spec
from tests.kernels.interpret import DEVICE
from tests.layers.test_mla import BLOCK_SIZE, H, NOPE, NUM_BLOCKS, RANK, ROPE, V, dense_mla

pytest.importorskip("triton")


def _step(reqs: list[tuple[int, int]], seed: int = 0):
    """Inputs of one step (float32, CPU): request i has ``reqs[i] = (cached,
    new)`` tokens. Returns (q_nope, q_pe, kv_c, k_pe, w_kv_b, kv_cache, meta,
    dense references per request, softmax scale)."""
    g = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(NOPE + ROPE)
    w_kv_b = torch.randn(H * (NOPE + V), RANK, generator=g) / math.sqrt(RANK)
    kv_cache = torch.zeros(mla_kv_cache_spec(1, BLOCK_SIZE, RANK, ROPE, torch.float32).layer_shape(NUM_BLOCKS))
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables, slots, starts, lens, refs = [], [], [0], [], []
    q_nopes, q_pes, kv_cs, k_pes = [], [], [], []
    for cached, new in reqs:
        L = cached + new
        blocks = [free.pop() for _ in range(-(-L // BLOCK_SIZE))]
        ctx_c, ctx_pe = torch.randn(L, RANK, generator=g), torch.randn(L, ROPE, generator=g)
        for p in range(cached):
            kv_cache[blocks[p // BLOCK_SIZE], p % BLOCK_SIZE] = torch.cat([ctx_c[p], ctx_pe[p]])
        q_nope, q_pe = torch.randn(new, H, NOPE, generator=g), torch.randn(new, H, ROPE, generator=g)
        refs.append(dense_mla(q_nope, q_pe, ctx_c, ctx_pe, w_kv_b, scale))
        q_nopes.append(q_nope), q_pes.append(q_pe), kv_cs.append(ctx_c[cached:]), k_pes.append(ctx_pe[cached:])
        slots += [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(cached, L)]
        tables.append(blocks), starts.append(starts[-1] + new), lens.append(L)
    width = max(map(len, tables)) + 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(n for _, n in reqs), max_seq_len=max(lens), query_start_loc_cpu=starts,
        seq_lens_cpu=lens, num_decodes=next((i for i, (_, n) in enumerate(reqs) if n != 1), len(reqs)))
    return (torch.cat(q_nopes), torch.cat(q_pes), torch.cat(kv_cs), torch.cat(k_pes), w_kv_b, kv_cache, meta,
            refs, scale)


def _to(meta: AttentionMetadata, dev) -> AttentionMetadata:
    for f in ("slot_mapping", "query_start_loc", "seq_lens", "block_table"):
        setattr(meta, f, getattr(meta, f).to(dev))
    return meta


def _triton(scale):
    from ember.layers.attention.triton_mla_backend import TritonMLABackend

    return TritonMLABackend(H, NOPE, ROPE, V, RANK, scale)


def test_registered_as_triton():
    from ember.layers.attention.backend import get_attention_backend
    from ember.layers.attention.mla import get_mla_backend
    from ember.layers.attention.triton_mla_backend import TritonMLABackend

    cls = get_mla_backend(get_attention_backend("triton"))
    assert cls is TritonMLABackend and cls.cuda_graph_safe
    assert get_mla_backend(get_attention_backend("torch")) is TorchMLABackend


@pytest.mark.parametrize("reqs", [
    # Three leading decodes (the decode launch), a 20-token prompt chunk
    # (decompressed), a 6-token chunk after 9 cached tokens and a 2-token one
    # (absorbed, row-indexed), and a decode after them (row-indexed).
    [(12, 1), (3, 1), (21, 1), (0, 20), (9, 6), (30, 2), (5, 1)],
    # An eager verification step: three new tokens each (the uniform launch).
    [(12, 3), (0, 3), (40, 3)],
    # Verification with different draft counts (row-indexed only).
    [(12, 3), (7, 2), (40, 4)],
], ids=["mixed", "uniform", "verify-ragged"])
def test_eager_step_matches_torch_backend(reqs):
    q_nope, q_pe, kv_c, k_pe, w, cache, meta, refs, scale = _step(reqs)
    ref_cache = cache.clone()
    ref = TorchMLABackend(H, NOPE, ROPE, V, RANK, scale).forward(q_nope, q_pe, kv_c, k_pe, w, ref_cache, meta)
    torch.testing.assert_close(ref, torch.cat(refs), rtol=1e-5, atol=1e-5)
    args = [x.to(DEVICE) for x in (q_nope, q_pe, kv_c, k_pe, w, cache)]
    out = _triton(scale).forward(*args, _to(meta, DEVICE))
    torch.testing.assert_close(args[-1].cpu(), ref_cache)  # the same latent writes
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


def _pad(meta: AttentionMetadata, pad_rows: int, q: int) -> AttentionMetadata:
    """``meta`` as a CUDA-graph buffer holds it: ``pad_rows`` padding requests
    of ``q`` rows (slot -1, seq_len 0, block-table rows 0), no host lists."""
    n = meta.seq_lens.shape[0] + pad_rows
    return AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, torch.full((pad_rows * q,), -1)]),
        query_start_loc=torch.arange(0, (n + 1) * q, q, dtype=torch.int32),
        seq_lens=torch.cat([meta.seq_lens, torch.zeros(pad_rows, dtype=torch.int32)]),
        block_table=torch.cat([meta.block_table, torch.zeros(pad_rows, meta.block_table.shape[1],
                                                             dtype=torch.int32)]),
        max_query_len=q, max_seq_len=meta.block_table.shape[1], query_start_loc_cpu=[], seq_lens_cpu=[],
        num_kv_splits=4, uniform_query_len=q if q > 1 else 0)


@pytest.mark.parametrize("q", [1, 3])
def test_graph_step_with_padding_rows(q):
    """A decode (q = 1) or uniform verification (q = 3) step with two padding
    requests, metadata as the graph runners fill it: real rows equal the
    dense reference, padding rows are zeros and write nothing."""
    reqs = [(17, q), (0, q), (40, q)]
    q_nope, q_pe, kv_c, k_pe, w, cache, meta, refs, scale = _step(reqs, seed=1)
    pad = 2 * q
    q_nope = torch.cat([q_nope, torch.randn(pad, H, NOPE)])
    q_pe = torch.cat([q_pe, torch.randn(pad, H, ROPE)])
    kv_c, k_pe = torch.cat([kv_c, torch.randn(pad, RANK)]), torch.cat([k_pe, torch.randn(pad, ROPE)])
    ref_cache = cache.clone()
    real = meta.slot_mapping
    ref_cache.view(-1, RANK + ROPE)[real] = torch.cat([kv_c, k_pe], -1)[: len(real)]
    args = [x.to(DEVICE) for x in (q_nope, q_pe, kv_c, k_pe, w, cache)]
    out = _triton(scale).forward(*args, _to(_pad(meta, 2, q), DEVICE)).cpu()
    torch.testing.assert_close(args[-1].cpu(), ref_cache)
    n = len(reqs) * q
    torch.testing.assert_close(out[:n], torch.cat(refs), rtol=1e-4, atol=1e-4)
    assert torch.equal(out[n:], torch.zeros_like(out[n:]))
