"""Triton paged-attention kernels vs the plain-PyTorch backend (float32
reference on the same bf16 data): on CUDA at full shapes, without it on CPU in
Triton's interpreter at small ones (tests/kernels/interpret.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from ember.layers.attention.backend import AttentionMetadata, standard_layout
from ember.layers.attention.torch_backend import TorchAttentionBackend, write_kv_cache
from tests.kernels.interpret import DEVICE, ON_GPU, by_device, synchronize
from tests.layers.test_torch_attention import fp8_round_trip

pytest.importorskip("triton")
BLOCK = 16


def _case(reqs, num_heads, num_kv_heads, head_dim, seed, cache_dtype=torch.bfloat16, dtype=torch.bfloat16):
    """reqs: list of (cached, new). Random cache + queries; returns inputs and metadata."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = DEVICE
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
    q = torch.randn(T, num_heads, head_dim, generator=g, device=dev).to(dtype)
    k = torch.randn(T, num_kv_heads, head_dim, generator=g, device=dev).to(dtype)
    v = torch.randn(T, num_kv_heads, head_dim, generator=g, device=dev).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev), query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev), block_table=table,
        max_query_len=max(n for _, n in reqs), max_seq_len=max(seq_lens), query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens)
    return q, k, v, kv, meta


def _triton_backend(num_heads, head_dim, scale, num_kv_heads):
    from ember.layers.attention.triton_backend import TritonAttentionBackend

    if ON_GPU:
        return TritonAttentionBackend(num_heads, head_dim, scale, num_kv_heads)
    # Without CUDA the backend cannot ask the device for its SM count (which
    # only sets the decode split count): give it a small GPU's.
    small_gpu = SimpleNamespace(multi_processor_count=8)
    with mock.patch.object(torch.cuda, "current_device", return_value=0), \
            mock.patch.object(torch.cuda, "get_device_properties", return_value=small_gpu):
        return TritonAttentionBackend(num_heads, head_dim, scale, num_kv_heads)


def _check(reqs, num_heads, num_kv_heads, head_dim, seed=0, num_decodes=0, cache_dtype=torch.bfloat16,
           dtype=torch.bfloat16, tol=1e-2, poison=False):
    """Triton backend (queries of ``dtype``, cache of ``cache_dtype``) vs the
    torch backend in float32 on the same values, its new K/V rounded as the
    cache rounds them. ``poison``: every slot no request reads (the tails of
    the last blocks included) holds NaN for the Triton run."""
    q, k, v, kv, meta = _case(reqs, num_heads, num_kv_heads, head_dim, seed, cache_dtype, dtype)
    meta.num_decodes = num_decodes
    scale = head_dim ** -0.5
    ref_cache = standard_layout(kv).float().clone()
    ref = TorchAttentionBackend(num_heads, head_dim, scale, num_kv_heads).forward(
        q.float(), fp8_round_trip(k, cache_dtype), fp8_round_trip(v, cache_dtype), ref_cache, meta)
    if poison:
        read = {int(meta.block_table[i, p // BLOCK]) * BLOCK + p % BLOCK
                for i, seq_len in enumerate(meta.seq_lens_cpu) for p in range(seq_len)}
        unread = torch.tensor(sorted(set(range(kv.shape[1] * BLOCK)) - read), device=DEVICE)
        nan = torch.full((len(unread), num_kv_heads, head_dim), float("nan"), device=DEVICE)
        write_kv_cache(nan, nan, kv, unread)
    out = _triton_backend(num_heads, head_dim, scale, num_kv_heads).forward(q, k, v, kv, meta)
    synchronize()
    assert not out.isnan().any(), "unwritten or NaN output"
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < tol, f"relative error {rel:.3e}"
    if not poison:
        assert torch.equal(standard_layout(kv).float(), ref_cache.to(cache_dtype).float()), "KV cache write differs"


# Context lengths of the interpreter's cases: past two 64-key tiles, and past
# one 128-key tile (an FP8 cache's decode tile).
_LONG = by_device(300, 150)
_PREFILL = by_device((40, 200), (40, 70))  # two 64-row query blocks over two key tiles on CPU


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("group", by_device([1, 4, 7], [1, 7]))
def test_fp8_kv_cache(cache_dtype, group):
    """--kv-cache-dtype fp8: mixed prefill/decode, leading decodes, decode only."""
    _check([(0, 1), (BLOCK - 1, 1), (_LONG, 1), (0, BLOCK + 1), (BLOCK + 1, 5), _PREFILL], 2 * group, 2,
           by_device(128, 64), seed=5, num_decodes=3, cache_dtype=cache_dtype)
    _check([(0, 1), (BLOCK * 7 + 3, 1), (by_device(1000, 300), 1)], 2 * group, 2, 64, seed=6,
           cache_dtype=cache_dtype)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_unread_slots_never_reach_the_output(cache_dtype):
    """NaN in every slot no request owns a position of (the stale tails of the
    last blocks, which an FP8 cache's V tiles read whole) leaves the output
    as it is: decode, verify-sized and prefill rows."""
    _check([(0, 1), (BLOCK - 1, 1), (_LONG, 1), (0, BLOCK + 1), (BLOCK + 1, 5), _PREFILL], 4, 2,
           by_device(128, 64), seed=8, num_decodes=3, cache_dtype=cache_dtype, poison=True)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_kv_write_equals_torch_backend_write(cache_dtype):
    """The Triton KV write leaves the cache bit for bit as the torch backend's
    (same layout: V transposed in an FP8 cache); slots over several blocks,
    one negative (skipped)."""
    from ember.kernels.triton_attention import store_kv_cache

    g = torch.Generator(device=DEVICE).manual_seed(3)
    k, v = (torch.randn(6, 2, 64, generator=g, device=DEVICE).to(torch.bfloat16) for _ in range(2))
    slots = torch.tensor([5, 16, 47, 3 * BLOCK + 15, -1, 2], device=DEVICE)
    caches = [torch.zeros(2, 4, BLOCK, 2, 64, device=DEVICE).to(cache_dtype) for _ in range(2)]
    store_kv_cache(k, v, caches[0], slots)
    keep = slots >= 0
    write_kv_cache(k[keep], v[keep], caches[1], slots[keep])
    synchronize()
    assert torch.equal(*(c.view(torch.uint8) if c.element_size() == 1 else c for c in caches))


def test_fp8_kv_write_saturates():
    from ember.kernels.triton_attention import store_kv_cache

    kv = torch.zeros(2, 2, BLOCK, 1, 64, dtype=torch.float8_e5m2, device=DEVICE)
    k = torch.full((1, 1, 64), 1e6, dtype=torch.bfloat16, device=DEVICE)
    store_kv_cache(k, -k, kv, torch.tensor([3], device=DEVICE))
    kv = standard_layout(kv)
    assert (kv[0, 0, 3].float() == 57344.0).all() and (kv[1, 0, 3].float() == -57344.0).all()


@pytest.mark.parametrize("head_dim", by_device([64, 128], [64]))
@pytest.mark.parametrize("group", by_device([1, 4, 7, 8], [1, 7]))
def test_mixed_prefill_decode(head_dim, group):
    num_kv_heads = 2
    reqs = [(0, 1), (0, BLOCK - 1), (0, BLOCK), (0, BLOCK + 1), (BLOCK - 1, 1), (BLOCK + 1, 5), (_LONG, 1), _PREFILL]
    _check(reqs, num_kv_heads * group, num_kv_heads, head_dim)


@pytest.mark.parametrize("group", by_device([1, 4, 8], [4]))
def test_mixed_batch_with_leading_decodes(group):
    # The runner's order: single-token requests first, then the rest.
    reqs = [(0, 1), (BLOCK - 1, 1), (_LONG, 1), (0, BLOCK + 1), (BLOCK + 1, 5), _PREFILL]
    _check(reqs, 2 * group, 2, by_device(128, 64), seed=4, num_decodes=3)


@pytest.mark.parametrize("head_dim", by_device([64, 128], [64]))
@pytest.mark.parametrize("group", by_device([1, 4, 7, 8], [1, 7]))
def test_decode_only(head_dim, group):
    reqs = [(0, 1), (BLOCK - 2, 1), (BLOCK, 1), (BLOCK * 7 + 3, 1), (by_device(1000, 300), 1)]
    _check(reqs, 2 * group, 2, head_dim, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_float16_and_float32_models(dtype):
    # Dots in the model's dtype; float32 ones in true float32 (not TF32).
    reqs = [(0, 1), (BLOCK - 1, 1), (_LONG, 1), (0, BLOCK + 1), (BLOCK + 1, 5), _PREFILL]
    _check(reqs, 8, 2, 64, seed=8, num_decodes=3, cache_dtype=dtype, dtype=dtype,
           tol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_long_context_32k(mode):
    reqs = [(32768 - 1, 1)] if mode == "decode" else [(32768 - 512, 512)]
    _check(reqs, 32, 8, 128, seed=2)


def test_padded_decode_rows_are_zero_and_skip_kv_write():
    from ember.kernels.triton_attention import decode_attention, store_kv_cache

    q, k, v, kv, meta = _case([(10, 1), (20, 1)], 8, 2, 64, seed=3)
    before = kv.clone()
    store_kv_cache(k, v, kv, torch.tensor([-1, -1], device=DEVICE))
    assert torch.equal(kv, before)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kv, out, meta.block_table, torch.tensor([0, 21], dtype=torch.int32, device=DEVICE),
                     0.125, num_splits=4)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert not out[1].isnan().any()


@pytest.mark.parametrize("num_splits", [1, 2, 8, 32])
def test_decode_every_split_count_in_a_replayed_graph(num_splits):
    """Split-KV decode with every split count the graph ladder uses, against
    the torch backend (more splits than a request has key tiles leave empty
    splits); on CUDA also replayed in a CUDA graph on new queries."""
    from ember.kernels.triton_attention import decode_attention

    num_heads, num_kv_heads, head_dim = by_device((28, 4, 128), (6, 2, 64))
    reqs = [(0, 1), (5, 1), (BLOCK * 3, 1), (by_device(700, 200), 1), (by_device(2049, 600), 1)]
    q, k, v, kv, meta = _case(reqs, num_heads, num_kv_heads, head_dim, seed=num_splits)
    store = TorchAttentionBackend(num_heads, head_dim, 0.09, num_kv_heads)

    def reference():
        return store.forward(q.float(), k.float(), v.float(), kv.float().clone(), meta)

    kv[0].view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = k  # the new K/V as the KV write leaves them
    kv[1].view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = v
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kv, out, meta.block_table, meta.seq_lens, 0.09, num_splits)  # compile outside the capture
    ref = reference()
    assert not out.isnan().any()
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2
    if not ON_GPU:
        return
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


@pytest.mark.gpu
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
    pass them), with padding slots (-1) that rotate the query but write
    nothing; and both equal the plain-PyTorch rotation and cache write to a
    rounding of the 16-bit values."""
    from ember.kernels.triton_attention import rope_and_store_kv_cache, store_kv_cache
    from ember.kernels.triton_ops import rotary_embedding_
    from ember.layers.rotary import RotaryEmbedding

    g = torch.Generator(device=DEVICE).manual_seed(head_dim + num_heads)
    n, num_blocks = by_device(37, 13), 8
    rope = RotaryEmbedding(head_dim, head_dim, 4096, 500000.0).to(DEVICE)
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim, generator=g, device=DEVICE).to(torch.bfloat16)
    qs, ks = num_heads * head_dim, num_kv_heads * head_dim
    positions = torch.randint(0, 4096, (n,), generator=g, device=DEVICE)
    slots = torch.randperm(num_blocks * BLOCK, generator=g, device=DEVICE)[:n]
    slots[[0, 5, n - 1]] = -1
    results = []
    for fused in (False, True):
        q, k, v = qkv.clone().split([qs, ks, ks], dim=-1)
        kv = torch.zeros(2, num_blocks, BLOCK, num_kv_heads, head_dim, device=DEVICE).to(cache_dtype)
        q3, k3, v3 = (t.view(n, -1, head_dim) for t in (q, k, v))
        if fused:
            rope_and_store_kv_cache(positions, q3, k3, v3, kv, slots, rope.cos_sin_cache)
        else:
            rotary_embedding_(positions, q, k, rope.cos_sin_cache, head_dim, head_dim)  # what rope() runs on CUDA
            store_kv_cache(k3, v3, kv, slots)
        results.append((q.clone(), kv))
    assert torch.equal(results[0][0], results[1][0]), "rotated query differs"
    assert torch.equal(results[0][1].view(torch.uint8), results[1][1].view(torch.uint8)), "KV cache differs"
    # Against plain PyTorch in float32: the rotation, and the written rows (rotated keys, values).
    q, k, v = qkv.float().split([qs, ks, ks], dim=-1)
    ref_q, ref_k = RotaryEmbedding(head_dim, head_dim, 4096, 500000.0)(positions.cpu(), q.cpu(), k.cpu())
    torch.testing.assert_close(results[1][0].cpu().float(), ref_q, rtol=1e-2, atol=1e-2)
    kv = standard_layout(results[1][1]).cpu().float().view(2, -1, num_kv_heads * head_dim)
    written = slots.cpu() >= 0
    fp8 = cache_dtype != torch.bfloat16
    tol = dict(rtol=0.13, atol=2e-2) if fp8 else dict(rtol=1e-2, atol=1e-2)  # e4m3: 3 mantissa bits
    torch.testing.assert_close(kv[0][slots.cpu()[written]], ref_k[written], **tol)
    torch.testing.assert_close(kv[1][slots.cpu()[written]], v.cpu()[written], **tol)
    untouched = torch.ones(kv.shape[1], dtype=torch.bool)
    untouched[slots.cpu()[written]] = False
    assert not kv[:, untouched].any(), "a padding slot was written"
