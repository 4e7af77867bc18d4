"""Triton paged-attention kernels vs the plain-PyTorch backend (float32
reference on the same bf16 data). GPU only."""

from __future__ import annotations

import math

import pytest
import torch

from ember.layers.attention.backend import AttentionMetadata
from ember.layers.attention.torch_backend import TorchAttentionBackend
from tests.layers.test_torch_attention import fp8_round_trip

pytestmark = pytest.mark.gpu
BLOCK = 16


def _case(reqs, num_heads, num_kv_heads, head_dim, seed, cache_dtype=torch.bfloat16):
    """reqs: list of (cached, new). Random cache + queries; returns inputs and metadata."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    blocks_needed = [math.ceil((c + n) / BLOCK) for c, n in reqs]
    num_blocks = sum(blocks_needed) + 3
    kv = torch.randn(2, num_blocks, BLOCK, num_kv_heads, head_dim, generator=g, device=dev).to(cache_dtype)
    perm = torch.randperm(num_blocks, generator=g, device=dev).tolist()
    tables, slots, starts, seq_lens = [], [], [0], []
    for (c, n), nb in zip(reqs, blocks_needed):
        t = [perm.pop() for _ in range(nb)]
        tables.append(t)
        slots += [t[p // BLOCK] * BLOCK + p % BLOCK for p in range(c, c + n)]
        starts.append(starts[-1] + n)
        seq_lens.append(c + n)
    width = max(blocks_needed)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
    T = starts[-1]
    q = torch.randn(T, num_heads, head_dim, generator=g, device=dev).to(torch.bfloat16)
    k = torch.randn(T, num_kv_heads, head_dim, generator=g, device=dev).to(torch.bfloat16)
    v = torch.randn(T, num_kv_heads, head_dim, generator=g, device=dev).to(torch.bfloat16)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev), query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev), block_table=table,
        max_query_len=max(n for _, n in reqs), max_seq_len=max(seq_lens), query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens)
    return q, k, v, kv, meta


def _check(reqs, num_heads, num_kv_heads, head_dim, seed=0, num_decodes=0, cache_dtype=torch.bfloat16):
    """Triton backend (bf16 queries, cache of ``cache_dtype``) vs the torch
    backend in float32 on the same values, its new K/V rounded as the cache
    rounds them."""
    from ember.layers.attention.triton_backend import TritonAttentionBackend

    q, k, v, kv, meta = _case(reqs, num_heads, num_kv_heads, head_dim, seed, cache_dtype)
    meta.num_decodes = num_decodes
    scale = head_dim ** -0.5
    ref_cache = kv.float().clone()
    ref = TorchAttentionBackend(num_heads, head_dim, scale, num_kv_heads).forward(
        q.float(), fp8_round_trip(k, cache_dtype), fp8_round_trip(v, cache_dtype), ref_cache, meta)
    backend = TritonAttentionBackend(num_heads, head_dim, scale, num_kv_heads)
    out = backend.forward(q, k, v, kv, meta)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten or NaN output"
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, f"relative error {rel:.3e}"
    assert torch.equal(kv.float(), ref_cache.to(cache_dtype).float()), "KV cache write differs"


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("group", [1, 4, 7])
def test_fp8_kv_cache(cache_dtype, group):
    """--kv-cache-dtype fp8: mixed prefill/decode, leading decodes, decode only."""
    _check([(0, 1), (BLOCK - 1, 1), (300, 1), (0, BLOCK + 1), (BLOCK + 1, 5), (40, 200)], 2 * group, 2, 128,
           seed=5, num_decodes=3, cache_dtype=cache_dtype)
    _check([(0, 1), (BLOCK * 7 + 3, 1), (1000, 1)], 2 * group, 2, 64, seed=6, cache_dtype=cache_dtype)


def test_fp8_kv_write_saturates():
    from ember.kernels.triton_attention import store_kv_cache

    kv = torch.zeros(2, 2, BLOCK, 1, 64, dtype=torch.float8_e5m2, device="cuda")
    k = torch.full((1, 1, 64), 1e6, dtype=torch.bfloat16, device="cuda")
    store_kv_cache(k, -k, kv, torch.tensor([3], device="cuda"))
    assert (kv[0, 0, 3].float() == 57344.0).all() and (kv[1, 0, 3].float() == -57344.0).all()


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 7, 8])
def test_mixed_prefill_decode(head_dim, group):
    num_kv_heads = 2
    reqs = [(0, 1), (0, BLOCK - 1), (0, BLOCK), (0, BLOCK + 1), (BLOCK - 1, 1), (BLOCK + 1, 5), (300, 1), (40, 200)]
    _check(reqs, num_kv_heads * group, num_kv_heads, head_dim)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_mixed_batch_with_leading_decodes(group):
    # The runner's order: single-token requests first, then the rest.
    reqs = [(0, 1), (BLOCK - 1, 1), (300, 1), (0, BLOCK + 1), (BLOCK + 1, 5), (40, 200)]
    _check(reqs, 2 * group, 2, 128, seed=4, num_decodes=3)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 7, 8])
def test_decode_only(head_dim, group):
    reqs = [(0, 1), (BLOCK - 2, 1), (BLOCK, 1), (BLOCK * 7 + 3, 1), (1000, 1)]
    _check(reqs, 2 * group, 2, head_dim, seed=1)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_long_context_32k(mode):
    reqs = [(32768 - 1, 1)] if mode == "decode" else [(32768 - 512, 512)]
    _check(reqs, 32, 8, 128, seed=2)


def test_padded_decode_rows_are_zero_and_skip_kv_write():
    from ember.kernels.triton_attention import decode_attention, store_kv_cache

    q, k, v, kv, meta = _case([(10, 1), (20, 1)], 8, 2, 64, seed=3)
    before = kv.clone()
    store_kv_cache(k, v, kv, torch.tensor([-1, -1], device="cuda"))
    assert torch.equal(kv, before)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kv, out, meta.block_table, torch.tensor([0, 21], dtype=torch.int32, device="cuda"),
                     0.125, num_splits=4)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert not out[1].isnan().any()


@pytest.mark.parametrize("num_splits", [1, 2, 8, 32])
def test_decode_every_split_count_in_a_replayed_graph(num_splits):
    """Split-KV decode with every split count the graph ladder uses, against
    the torch backend, replayed in a CUDA graph on new queries."""
    from ember.kernels.triton_attention import decode_attention

    reqs = [(0, 1), (5, 1), (BLOCK * 3, 1), (700, 1), (2049, 1)]
    q, k, v, kv, meta = _case(reqs, 28, 4, 128, seed=num_splits)
    store = TorchAttentionBackend(28, 128, 0.09, 4)

    def reference():
        return store.forward(q.float(), k.float(), v.float(), kv.float().clone(), meta)

    kv[0].view(-1, 4, 128)[meta.slot_mapping] = k  # the new K/V as the KV write leaves them
    kv[1].view(-1, 4, 128)[meta.slot_mapping] = v
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kv, out, meta.block_table, meta.seq_lens, 0.09, num_splits)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, kv, out, meta.block_table, meta.seq_lens, 0.09, num_splits)
    g = torch.Generator(device="cuda").manual_seed(99)
    for _ in range(3):
        q.copy_(torch.randn(q.shape, generator=g, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference()
        assert not out.isnan().any()
        assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_block_table_width_compiles_no_new_variant():
    """An eager step's block table is as wide as its longest request; its row
    stride must not make Triton compile a new kernel variant (1 or a multiple
    of 16 would, by default: a half-second stall mid-serving)."""
    from ember.kernels import triton_attention as ta

    def variants(kernel):
        return len(kernel.device_caches[torch.cuda.current_device()][0])

    counts = None
    for ctx in (2 * BLOCK + 3, BLOCK - 2, 16 * BLOCK - 2, 32 * BLOCK - 2):  # widths 3, 1, 16, 32 blocks
        _check([(ctx, 1), (ctx, 2)], 8, 2, 64, seed=ctx, num_decodes=1)
        now = (variants(ta._extend_kernel), variants(ta._decode_split_kernel))
        assert counts is None or now == counts, f"compiled again at context {ctx}"
        counts = now


def test_decode_split_counts_are_powers_of_two_compiled_by_the_graph_ladder():
    """Any number of decodes (also in a mixed batch) uses a split count that the
    decode CUDA-graph capture has already compiled: no kernel compiles mid-serving."""
    pytest.importorskip("triton")
    from ember.kernels.triton_attention import num_decode_splits
    from ember.worker.cuda_graph import capture_sizes

    for num_kv_heads in (1, 2, 4, 8):
        for num_sms in (78, 114, 132, 144):
            for max_num_seqs in (8, 20, 64, 256):
                captured = {num_decode_splits(b, num_kv_heads, num_sms) for b in capture_sizes(max_num_seqs)}
                every = {num_decode_splits(n, num_kv_heads, num_sms) for n in range(1, max_num_seqs + 1)}
                assert every <= captured
                assert all(v & (v - 1) == 0 for v in every)


def test_fp8_decode_query_beyond_fp16_range_stays_finite():
    """Decode dots over an FP8 cache run in float16: a bf16 query element past
    65504 saturates instead of turning the output into NaN."""
    from ember.kernels.triton_attention import decode_attention

    q, k, v, kv, meta = _case([(40, 1), (300, 1)], 8, 2, 64, seed=7, cache_dtype=torch.float8_e4m3fn)
    q[0, 0, 0] = 1e5
    out = torch.empty_like(q)
    decode_attention(q, kv, out, meta.block_table, meta.seq_lens, 0.125, num_splits=2)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(128, 32, 8), (64, 14, 2)])
def test_rope_and_kv_write_in_one_kernel(cache_dtype, head_dim, num_heads, num_kv_heads):
    """The fused RoPE + KV write equals the rotary kernel followed by the KV
    write, bit for bit, on strided views of one qkv output (as the models
    pass them), with padding slots (-1) that rotate the query but write nothing."""
    from ember.kernels.triton_attention import rope_and_store_kv_cache, store_kv_cache
    from ember.layers.rotary import RotaryEmbedding

    g = torch.Generator(device="cuda").manual_seed(head_dim + num_heads)
    n, num_blocks = 37, 8
    rope = RotaryEmbedding(head_dim, head_dim, 4096, 500000.0).cuda()
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim, generator=g, device="cuda").to(torch.bfloat16)
    qs, ks = num_heads * head_dim, num_kv_heads * head_dim
    positions = torch.randint(0, 4096, (n,), generator=g, device="cuda")
    slots = torch.randperm(num_blocks * BLOCK, generator=g, device="cuda")[:n]
    slots[[0, 5, 36]] = -1
    results = []
    for fused in (False, True):
        q, k, v = qkv.clone().split([qs, ks, ks], dim=-1)
        kv = torch.zeros(2, num_blocks, BLOCK, num_kv_heads, head_dim, device="cuda").to(cache_dtype)
        q3, k3, v3 = (t.view(n, -1, head_dim) for t in (q, k, v))
        if fused:
            rope_and_store_kv_cache(positions, q3, k3, v3, kv, slots, rope.cos_sin_cache)
        else:
            rope(positions, q, k)  # in place on CUDA
            store_kv_cache(k3, v3, kv, slots)
        results.append((q.clone(), kv.view(torch.uint8).clone()))
    assert torch.equal(results[0][0], results[1][0]), "rotated query differs"
    assert torch.equal(results[0][1], results[1][1]), "KV cache differs"
