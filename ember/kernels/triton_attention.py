"""Triton kernels for attention over the paged KV cache (CUDA only).

Cache layout per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``;
token ``p`` of a request is at slot ``block_table[p // block_size] *
block_size + p % block_size``. An FP8 cache stores each V block transposed,
``[num_kv_heads, head_dim, block_size]`` (``ember.layers.attention.backend``
says why): its PV operand is then loaded in runs of a block's tokens, with no
byte-wise transpose on chip.

* ``store_kv_cache``: scatter new K/V rows to their slots (negative slot = padding, skipped);
  ``rope_and_store_kv_cache`` first applies RoPE to the query (in place) and the key.
  The cache may be FP8 (``--kv-cache-dtype fp8``): K/V are narrowed when stored
  and widened to the query's dtype when the attention kernels load them. With
  per-layer scales (``kv_scales``: ``k_scale``/``v_scale``, float32 device
  scalars) the cache holds ``x / scale`` saturated at the format's largest
  finite value, and reads mean ``fp8 * scale``.
* ``extend_attention``: packed variable-length queries (prefill, chunked prefill,
  prefix hits, decode), causal, GQA; keys are read from the cache (new ones
  included, written first). Online softmax as in FlashAttention-2 (Dao, 2023).
* ``decode_attention``: one query per request, split-KV (FlashDecoding, Dao et
  al., 2023): the context is cut into ``num_splits`` pieces processed by separate
  programs that write partial outputs and log-sum-exps, merged by a second kernel,
  so a single long sequence still fills the GPU. All query heads of one KV head
  are processed together (GQA packing) so K/V are read once per group.
* ``verify_attention``: the same split-KV scheme for a fixed number of new
  tokens per request (a speculative verification step: the last token and its
  drafts), causal among them; its launch depends only on the shapes, so the
  verification steps run inside CUDA graphs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ember.config import FP8_DTYPES
from ember.kernels.pdl import pdl_release, use_pdl
from ember.kernels.triton_ops import rope_cos_sin, rope_rotate_heads
from ember.layers.attention.backend import v_transposed


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 caches get true float32 products (not TF32), so the GPU path can be
    # checked token for token against float32 references.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _query_to(q, COMPUTE: tl.constexpr):
    # Into float16 a query element saturates at its largest finite value rather than becoming inf.
    if COMPUTE == tl.float16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0)
    return q.to(COMPUTE)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _compute_dtype(query_dtype: torch.dtype, cache_dtype: torch.dtype, fp8_compute: torch.dtype):
    """Element type the attention dots take their operands in: the query's, or
    ``fp8_compute`` for a 16-bit query over an FP8 cache, whose tiles are
    widened to it once per tile. On Hopper float16 decodes faster and bfloat16
    extends faster (``benchmarks/tune_decode_attention.py``), so each kernel
    defaults to its faster type. A query element beyond float16's range
    saturates at 65504 (``_query_to``)."""
    if cache_dtype in FP8_DTYPES and query_dtype != torch.float32:
        return _TL_DTYPES[fp8_compute]
    return _TL_DTYPES[query_dtype]


# --------------------------------------------------------------------- KV write
@triton.jit
def _to_cache(x, scale, FP8_MAX: tl.constexpr, SCALED: tl.constexpr, dtype: tl.constexpr):
    """``x`` as the cache stores it: into FP8 (``FP8_MAX`` > 0) divided by
    ``scale`` (when ``SCALED``; IEEE division, as torch's), saturated at the
    format's largest finite value, then rounded to nearest even (as
    ``to_cache_dtype``)."""
    if FP8_MAX > 0:
        x = x.to(tl.float32)
        if SCALED:
            x = tl.div_rn(x, scale)
        x = tl.clamp(x, -FP8_MAX, FP8_MAX)
    return x.to(dtype)


@triton.jit
def _load_scales(K_scale, V_scale, SCALED: tl.constexpr):
    """The layer's K and V scales (float32 scalars), or 1.0 when unscaled."""
    if SCALED:
        k_scale = tl.load(K_scale)
        v_scale = tl.load(V_scale)
    else:
        k_scale = 1.0
        v_scale = 1.0
    return k_scale, v_scale


def _scale_args(kv_cache: torch.Tensor, kv_scales: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Kernel arguments of the KV scales: the two scalar tensors and True for
    an FP8 cache with scales; otherwise placeholders the kernels never read.
    A 16-bit cache holds K/V as they are: its scales are ignored."""
    if kv_scales is None or kv_cache.dtype not in FP8_DTYPES:
        return kv_cache, kv_cache, False
    return kv_scales[0], kv_scales[1], True


@triton.jit
def _v_offsets(slot, offs, ROW: tl.constexpr, PAGE: tl.constexpr, V_T: tl.constexpr):
    """Offsets from the V half's start of the V elements ``offs`` (within a
    token's ``ROW`` = heads x head_dim) of ``slot``: token-major, or in a
    transposed-V cache (``V_T``) at ``[block, offs, slot % PAGE]``."""
    if V_T:
        return (slot // PAGE) * (PAGE * ROW) + offs * PAGE + slot % PAGE
    else:
        return slot * ROW + offs


def _v_layout(kv_cache: torch.Tensor, block_n: int) -> dict:
    """The attention kernels' V-layout constants: ``V_T`` (V blocks stored
    transposed, see ``ember.layers.attention.backend``) and ``V_RUN``, the
    tokens in each aligned run of a tile that lie in one block (contiguous in
    a transposed V): tiles start at multiples of ``block_n`` and blocks at
    multiples of the block size, so their gcd."""
    return dict(V_T=v_transposed(kv_cache.dtype), V_RUN=math.gcd(kv_cache.shape[2], block_n))


@triton.jit
def _kv_tile(KV, pages, offs_n, limit, kv_head, offs_d, mask_d, v_base, ROW: tl.constexpr,
             HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, COMPUTE: tl.constexpr, V_T: tl.constexpr,
             V_RUN: tl.constexpr):
    """K and V of one KV head for the context positions ``offs_n`` ([BLOCK_N],
    from a multiple of BLOCK_N), each [BLOCK_N, BLOCK_D] in ``COMPUTE`` (an
    FP8 cache widened here); positions at or past ``limit`` read as zeros.
    ``pages``: the request's block-table row; ``v_base``: offset of the V half
    (int64); ``V_RUN``: see :func:`_v_layout`."""
    mask_n = offs_n < limit
    # Every page holding a position below limit is allocated; its other slots hold stale but finite values.
    in_page = (offs_n // PAGE * PAGE) < limit
    page = tl.load(pages + offs_n // PAGE, mask=in_page, other=0).to(tl.int64)
    kv_off = (page * PAGE + offs_n % PAGE)[:, None] * ROW + kv_head * HEAD_DIM + offs_d[None, :]
    k = tl.load(KV + kv_off, mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(COMPUTE)
    if V_T:
        # V^T [BLOCK_D, BLOCK_N]: runs of V_RUN contiguous tokens, read whole pages (a mask that
        # changes within a run would split its wide loads into bytes); positions past limit zeroed after.
        vt_off = (page * (PAGE * ROW) + kv_head * (HEAD_DIM * PAGE))[None, :] + offs_d[:, None] * PAGE \
            + (offs_n % PAGE)[None, :]
        vt_off = tl.max_contiguous(tl.multiple_of(vt_off, [1, V_RUN]), [1, V_RUN])
        vt = tl.load(KV + v_base + vt_off, mask=in_page[None, :] & mask_d[:, None], other=0.0)
        v = tl.where(mask_n[:, None], tl.trans(vt).to(COMPUTE), 0.0)
    else:
        v = tl.load(KV + v_base + kv_off, mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(COMPUTE)
    return k, v


@triton.jit
def _store_kv_kernel(key, value, cache, slot_mapping, K_scale, V_scale, num_slots, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr, PAGE: tl.constexpr, FP8_MAX: tl.constexpr,
                     SCALED: tl.constexpr, V_T: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t)
    if slot < 0:
        return
    k_scale, v_scale = _load_scales(K_scale, V_scale, SCALED)
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    k = tl.load(key + t * stride_k + offs, mask=mask)
    v = tl.load(value + t * stride_v + offs, mask=mask)
    dtype = cache.dtype.element_ty
    tl.store(cache + slot * ROW + offs, _to_cache(k, k_scale, FP8_MAX, SCALED, dtype), mask=mask)
    v_dst = cache + num_slots.to(tl.int64) * ROW + _v_offsets(slot, offs, ROW, PAGE, V_T)
    tl.store(v_dst, _to_cache(v, v_scale, FP8_MAX, SCALED, dtype), mask=mask)


def store_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``key``/``value``: [num_tokens, num_kv_heads, head_dim] (rows contiguous);
    ``slot_mapping``: [num_tokens] int64 (negative entries are skipped). An FP8
    ``kv_cache`` gets ``x / scale`` (``kv_scales``: (k_scale, v_scale), float32
    one-element device tensors; None: unscaled), saturated at the format's
    largest finite value (as ``ember.layers.attention.backend.to_cache_dtype``),
    its V into the transposed blocks (the module docstring)."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    row = num_kv_heads * head_dim
    key = key.reshape(num_tokens, row)
    value = value.reshape(num_tokens, row)
    k_scale, v_scale, scaled = _scale_args(kv_cache, kv_scales)
    _store_kv_kernel[(num_tokens,)](key, value, kv_cache, slot_mapping, k_scale, v_scale, num_blocks * block_size,
                                    key.stride(0), value.stride(0), ROW=row, BLOCK=triton.next_power_of_2(row),
                                    PAGE=block_size,
                                    FP8_MAX=torch.finfo(kv_cache.dtype).max if kv_cache.dtype in FP8_DTYPES else 0.0,
                                    SCALED=scaled, V_T=v_transposed(kv_cache.dtype))


@triton.jit
def _rope_store_kv_kernel(Q, K, V, cache, slot_mapping, Pos, CosSin, K_scale, V_scale, num_slots, stride_q,
                          stride_k, stride_v, stride_cs, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_HALF: tl.constexpr, BLOCK_ROW: tl.constexpr, PAGE: tl.constexpr,
                          FP8_MAX: tl.constexpr, SCALED: tl.constexpr, V_T: tl.constexpr):
    t = tl.program_id(0)
    cos, sin = rope_cos_sin(CosSin, Pos, t, stride_cs, HALF, BLOCK_HALF)
    # Query heads: rotated in place (as ember.kernels.triton_ops.rotary_embedding_).
    q = Q + t * stride_q
    offs, mask, r1, r2 = rope_rotate_heads(q, NUM_Q_HEADS, cos, sin, HEAD_DIM, HALF, BLOCK_H, BLOCK_HALF)
    tl.store(q + offs, r1.to(Q.dtype.element_ty), mask=mask)
    tl.store(q + offs + HALF, r2.to(Q.dtype.element_ty), mask=mask)
    slot = tl.load(slot_mapping + t)
    if slot < 0:
        return
    # Key heads: rotated, rounded to the key's dtype, then written to the cache
    # as _store_kv_kernel writes them; the key tensor itself is left as it was.
    row = NUM_KV_HEADS * HEAD_DIM
    k_scale, v_scale = _load_scales(K_scale, V_scale, SCALED)
    dtype = cache.dtype.element_ty
    offs, mask, r1, r2 = rope_rotate_heads(K + t * stride_k, NUM_KV_HEADS, cos, sin, HEAD_DIM, HALF, BLOCK_H,
                                           BLOCK_HALF)
    dst = cache + slot * row + offs
    tl.store(dst, _to_cache(r1.to(K.dtype.element_ty), k_scale, FP8_MAX, SCALED, dtype), mask=mask)
    tl.store(dst + HALF, _to_cache(r2.to(K.dtype.element_ty), k_scale, FP8_MAX, SCALED, dtype), mask=mask)
    offs_r = tl.arange(0, BLOCK_ROW)
    mask_r = offs_r < row
    v = tl.load(V + t * stride_v + offs_r, mask=mask_r)
    v_dst = cache + num_slots.to(tl.int64) * row + _v_offsets(slot, offs_r, row, PAGE, V_T)
    tl.store(v_dst, _to_cache(v, v_scale, FP8_MAX, SCALED, dtype), mask=mask_r)


def rope_and_store_kv_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            kv_cache: torch.Tensor, slot_mapping: torch.Tensor, cos_sin_cache: torch.Tensor,
                            kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """RoPE and the KV write in one kernel: rotate ``query`` in place and write
    the rotated ``key`` and ``value`` to their slots, with the same rounding as
    ``rotary_embedding_`` followed by :func:`store_kv_cache` (``key`` itself is
    not modified). Neox "rotate half" over the whole head.

    Args:
        positions: [num_tokens] int64.
        query: [num_tokens, num_heads, head_dim]; key, value: [num_tokens,
            num_kv_heads, head_dim] (heads contiguous, rows may be strided views).
        kv_cache, slot_mapping: as :func:`store_kv_cache` (negative slots: the
            query is still rotated, nothing is written).
        cos_sin_cache: [max_position, head_dim] float32 (cos halves | sin halves).
        kv_scales: as :func:`store_kv_cache`.
    """
    num_tokens, num_heads, head_dim = query.shape
    if num_tokens == 0:
        return
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    half = head_dim // 2
    k_scale, v_scale, scaled = _scale_args(kv_cache, kv_scales)
    _rope_store_kv_kernel[(num_tokens,)](
        query, key, value, kv_cache, slot_mapping, positions, cos_sin_cache, k_scale, v_scale,
        num_blocks * block_size,
        query.stride(0), key.stride(0), value.stride(0), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_H=triton.next_power_of_2(max(num_heads, num_kv_heads)), BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_ROW=triton.next_power_of_2(num_kv_heads * head_dim), PAGE=block_size,
        FP8_MAX=torch.finfo(kv_cache.dtype).max if kv_cache.dtype in FP8_DTYPES else 0.0,
        SCALED=scaled, V_T=v_transposed(kv_cache.dtype), num_warps=8)  # faster than 4 warps at decode row counts


# ------------------------------------------------------------ extend / prefill
# NOTE: Triton compiles a new variant of a kernel for an integer argument
# that is 1 or a multiple of 16 the first time it sees one (about 0.5 s,
# mid-serving). The block table of an eager step is as wide as its longest
# request, so its row stride takes any value: not specialized.
@triton.jit(do_not_specialize=["first_req", "stride_bt"])
def _extend_kernel(Q, KV, Out, block_table, query_start_loc, seq_lens, sm_scale, first_req, K_scale, V_scale,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, num_slots,
                   NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IEEE: tl.constexpr, COMPUTE: tl.constexpr, SCALED: tl.constexpr, V_T: tl.constexpr,
                   V_RUN: tl.constexpr):
    req = first_req + tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    q_start = tl.load(query_start_loc + req)
    q_len = tl.load(query_start_loc + req + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens + req)
    ctx_len = seq_len - q_len
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q = _query_to(q, COMPUTE)
    q_pos = ctx_len + offs_m  # absolute position of each query row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # NOTE: dequantizing K (fp8 * k_scale) is folded into the softmax scale
    # and V's (fp8 * v_scale) into the final normalization: nothing per tile.
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 is cheaper than exp
    if SCALED:
        qk_scale = qk_scale * tl.load(K_scale)
    row = NUM_KV_HEADS * HEAD_DIM
    end = tl.minimum(seq_len, ctx_len + (m_block + 1) * BLOCK_M)
    v_base = num_slots.to(tl.int64) * row
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k, v = _kv_tile(KV, block_table + req * stride_bt, offs_n, end, kv_head, offs_d, mask_d, v_base, row,
                        HEAD_DIM, PAGE, COMPUTE, V_T, V_RUN)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        causal = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with no visible key yet keep m = -inf; guard the exp2 against NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(COMPUTE), v, IEEE)
        m_i = m_new
    if SCALED:
        acc = acc * tl.load(V_scale)
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_attention(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, block_table: torch.Tensor,
                     query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, scale: float,
                     fp8_compute: torch.dtype = torch.bfloat16, first_req: int = 0,
                     kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Causal attention of packed new tokens over their cached context.

    Args:
        query, out: [num_tokens, num_heads, head_dim].
        kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (new K/V already stored).
        block_table: [num_reqs, max_blocks] int32. query_start_loc: [num_reqs + 1] int32.
        seq_lens: [num_reqs] int32 (context + new tokens).
        fp8_compute: operand dtype of the dots over an FP8 cache (see ``_compute_dtype``).
        first_req: attend for requests ``first_req..num_reqs-1`` only (rows of
            ``query_start_loc`` index the whole ``query``), so a mixed batch's
            extend rows need no sliced or shifted copies of the metadata.
        kv_scales: (k_scale, v_scale) of an FP8 cache (see :func:`store_kv_cache`),
            or None (unscaled).
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = query.shape[1]
    num_reqs = seq_lens.shape[0] - first_req
    block_m = 64 if max_query_len > 16 else 16
    block_n = 64
    grid = (num_reqs, num_heads, triton.cdiv(max_query_len, block_m))
    k_scale, v_scale, scaled = _scale_args(kv_cache, kv_scales)
    _extend_kernel[grid](
        query, kv_cache, out, block_table, query_start_loc, seq_lens, scale, first_req, k_scale, v_scale,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        num_blocks * block_size,
        NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), PAGE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=query.dtype == torch.float32, COMPUTE=_compute_dtype(query.dtype, kv_cache.dtype, fp8_compute),
        SCALED=scaled, **_v_layout(kv_cache, block_n), num_warps=4 if head_dim <= 64 else 8, num_stages=2)


# ---------------------------------------------------------------------- decode
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_split_kernel(Q, KV, Mid_O, Mid_LSE, block_table, seq_lens, sm_scale, K_scale, V_scale,
                         stride_qt, stride_qh, stride_bt, num_slots,
                         NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, COMPUTE: tl.constexpr,
                         SCALED: tl.constexpr, V_T: tl.constexpr, V_RUN: tl.constexpr):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + req)
    # Each request cuts its own context into NUM_SPLITS pieces of whole BLOCK_N tiles.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    stop = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h
    q = tl.load(Q + req * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    q = _query_to(q, COMPUTE)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    # NOTE: K's and V's dequantization scales are applied once, outside the
    # loop (softmax scale, final normalization), as in _extend_kernel.
    qk_scale = sm_scale * 1.4426950408889634
    if SCALED:
        qk_scale = qk_scale * tl.load(K_scale)
    row = NUM_KV_HEADS * HEAD_DIM
    v_base = num_slots.to(tl.int64) * row
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        k, v = _kv_tile(KV, block_table + req * stride_bt, offs_n, stop, kv_head, offs_d, mask_d, v_base, row,
                        HEAD_DIM, PAGE, COMPUTE, V_T, V_RUN)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(COMPUTE), v, IEEE)
        m_i = m_new
    # An empty split (start >= seq_len) leaves l_i = 0: its LSE is -inf and it drops out of the merge.
    valid = l_i > 0
    if SCALED:
        acc = acc * tl.load(V_scale)
    out = acc / tl.where(valid, l_i, 1.0)[:, None]
    lse = tl.where(valid, m_i + tl.log2(tl.where(valid, l_i, 1.0)), float("-inf"))
    base = (req * NUM_KV_HEADS * GROUP + heads) * NUM_SPLITS + split
    tl.store(Mid_O + base[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_h[:, None] & mask_d[None, :])
    tl.store(Mid_LSE + base, lse, mask=mask_h)


@triton.jit
def _decode_merge_kernel(Mid_O, Mid_LSE, Out, stride_ot, stride_oh, num_heads,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_release(USE_PDL)
    req = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    base = (req * num_heads + head) * NUM_SPLITS
    lse = tl.load(Mid_LSE + base + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(Mid_O + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + req * stride_ot + head * stride_oh + offs_d, res.to(Out.dtype.element_ty), mask=mask_d)


def num_decode_splits(num_reqs: int, num_kv_heads: int, num_sms: int, max_splits: int = 32) -> int:
    """KV splits per request so that about two waves of programs cover the GPU,
    rounded down to a power of two.

    NOTE: the split count is a compile-time constant of the kernels, so every
    distinct value compiles them anew (about a second, mid-serving, when a
    mixed batch first has an unusual number of decodes). Powers of two leave
    six values, all compiled while the decode CUDA graphs are captured.
    """
    want = max(1, min(max_splits, triton.cdiv(2 * num_sms, num_reqs * num_kv_heads)))
    return 1 << (want.bit_length() - 1)


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, num_splits: int,
                     workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
                     block_n: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                     fp8_compute: torch.dtype = torch.float16,
                     kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One query token per request (``query``, ``out``: [num_reqs, num_heads, head_dim]).

    Args:
        num_splits: KV splits per request (see :func:`num_decode_splits`); the
            launch shape does not depend on the data, so it is CUDA-graph safe.
        workspace: optional preallocated (partial outputs [num_reqs * num_heads *
            num_splits * head_dim] float32, LSEs [num_reqs * num_heads * num_splits] float32).
        block_n, num_warps, num_stages: tile size over the context and launch
            settings (tuning knobs; see benchmarks/tune_decode_attention.py).
            None: 64-token tiles (128 over an FP8 cache), 3 stages.
        fp8_compute: operand dtype of the dots over an FP8 cache (see ``_compute_dtype``).
        kv_scales: (k_scale, v_scale) of an FP8 cache (see :func:`store_kv_cache`),
            or None (unscaled); read on the device, so a graph captured before
            the scales change (calibration) uses their new values.
    Rows with ``seq_lens == 0`` (padding) produce zeros.
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_reqs, num_heads, _ = query.shape
    group = num_heads // num_kv_heads
    # NOTE (sweeps of benchmarks/tune_decode_attention.py): 3 stages beat 2 on
    # a 16-bit cache at every batch x context swept. Over FP8, 128-token tiles
    # were the fastest while V was stored token-major (its PV operand then read
    # from shared memory byte by byte, BENCHMARKS.md "Known limits"); they have
    # not been re-swept over the transposed V blocks.
    block_n = block_n or (128 if kv_cache.dtype in FP8_DTYPES else 64)
    num_stages = num_stages or 3
    pdl = use_pdl(query.device)
    if workspace is None:
        mid_o = torch.empty(num_reqs * num_heads * num_splits * head_dim, dtype=torch.float32, device=query.device)
        mid_lse = torch.empty(num_reqs * num_heads * num_splits, dtype=torch.float32, device=query.device)
    else:
        mid_o, mid_lse = workspace
    k_scale, v_scale, scaled = _scale_args(kv_cache, kv_scales)
    _decode_split_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, kv_cache, mid_o, mid_lse, block_table, seq_lens, scale, k_scale, v_scale,
        query.stride(0), query.stride(1), block_table.stride(0), num_blocks * block_size,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_H=max(16, triton.next_power_of_2(group)), PAGE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        IEEE=query.dtype == torch.float32, COMPUTE=_compute_dtype(query.dtype, kv_cache.dtype, fp8_compute),
        SCALED=scaled, **_v_layout(kv_cache, block_n), num_warps=num_warps, num_stages=num_stages)
    _decode_merge_kernel[(num_reqs, num_heads)](
        mid_o, mid_lse, out, out.stride(0), out.stride(1), num_heads,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), NUM_SPLITS=num_splits,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), USE_PDL=pdl,
        num_warps=1)  # faster than 4 warps up to 32 splits: the merge is latency-bound


# ---------------------------------------------------------------------- verify
@triton.jit(do_not_specialize=["stride_bt"])
def _verify_split_kernel(Q, KV, Mid_O, Mid_LSE, block_table, seq_lens, sm_scale, K_scale, V_scale,
                         stride_qt, stride_qh, stride_bt, num_slots,
                         NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, QUERY_LEN: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                         PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         IEEE: tl.constexpr, COMPUTE: tl.constexpr, SCALED: tl.constexpr, V_T: tl.constexpr,
                         V_RUN: tl.constexpr):
    # One program: one request's QUERY_LEN new tokens x the GROUP query heads of
    # one KV head (rows r = j * GROUP + g), over one split of its context.
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + req)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    stop = tl.minimum(start + split_len, seq_len)

    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < QUERY_LEN * GROUP
    mask_d = offs_d < HEAD_DIM
    j = offs_r // GROUP  # the row's new token
    heads = kv_head * GROUP + offs_r % GROUP
    tokens = req * QUERY_LEN + j
    q = tl.load(Q + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    q = _query_to(q, COMPUTE)
    # New token j sits at position seq_len - QUERY_LEN + j and sees the keys up to it.
    last_key = seq_len - QUERY_LEN + j
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if SCALED:
        qk_scale = qk_scale * tl.load(K_scale)
    row = NUM_KV_HEADS * HEAD_DIM
    v_base = num_slots.to(tl.int64) * row
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        k, v = _kv_tile(KV, block_table + req * stride_bt, offs_n, stop, kv_head, offs_d, mask_d, v_base, row,
                        HEAD_DIM, PAGE, COMPUTE, V_T, V_RUN)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        s = tl.where(mask_n[None, :] & (offs_n[None, :] <= last_key[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A tile among the last new tokens may hide every key from the earlier rows.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(COMPUTE), v, IEEE)
        m_i = m_new
    valid = l_i > 0
    if SCALED:
        acc = acc * tl.load(V_scale)
    out = acc / tl.where(valid, l_i, 1.0)[:, None]
    lse = tl.where(valid, m_i + tl.log2(tl.where(valid, l_i, 1.0)), float("-inf"))
    # Partial results per (token, head, split), the layout _decode_merge_kernel reads.
    base = (tokens * NUM_KV_HEADS * GROUP + heads) * NUM_SPLITS + split
    tl.store(Mid_O + base[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_r[:, None] & mask_d[None, :])
    tl.store(Mid_LSE + base, lse, mask=mask_r)


def verify_attention(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, query_len: int, scale: float, num_splits: int,
                     block_n: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                     fp8_compute: torch.dtype = torch.float16,
                     kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Exactly ``query_len`` new tokens per request (a decode step with
    ``query_len - 1`` draft tokens each), causal among them: split-KV decode
    attention (FlashDecoding, as :func:`decode_attention`) whose programs take
    a request's ``query_len`` tokens times the query heads of one KV head
    together, so K/V are read once per request and KV head. The launch depends
    only on the shapes and ``num_splits`` (CUDA-graph safe).

    Args:
        query, out: [num_reqs * query_len, num_heads, head_dim], request r's
            tokens at rows ``r * query_len ..`` in order.
        kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (the new
            K/V already stored).
        block_table: [num_reqs, max_blocks] int32.
        seq_lens: [num_reqs] int32, context + new tokens (the new tokens are
            positions ``seq_len - query_len .. seq_len - 1``); 0: a padding
            request, whose rows come out zero.
        query_len: new tokens per request (>= 1).
        num_splits: KV splits per request (see :func:`num_decode_splits`).
        block_n, num_warps, num_stages, fp8_compute, kv_scales: as
            :func:`decode_attention`.
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_tokens, num_heads, _ = query.shape
    num_reqs = seq_lens.shape[0]
    assert num_tokens == num_reqs * query_len, "query rows must be num_reqs * query_len"
    group = num_heads // num_kv_heads
    block_n = block_n or (128 if kv_cache.dtype in FP8_DTYPES else 64)
    # NOTE: float32 tiles are twice as large: 2 stages keep them within shared memory.
    num_stages = num_stages or (2 if kv_cache.element_size() == 4 else 3)
    mid_o = torch.empty(num_tokens * num_heads * num_splits * head_dim, dtype=torch.float32, device=query.device)
    mid_lse = torch.empty(num_tokens * num_heads * num_splits, dtype=torch.float32, device=query.device)
    k_scale, v_scale, scaled = _scale_args(kv_cache, kv_scales)
    _verify_split_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, kv_cache, mid_o, mid_lse, block_table, seq_lens, scale, k_scale, v_scale,
        query.stride(0), query.stride(1), block_table.stride(0), num_blocks * block_size,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, QUERY_LEN=query_len, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_R=max(16, triton.next_power_of_2(group * query_len)),
        PAGE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, IEEE=query.dtype == torch.float32,
        COMPUTE=_compute_dtype(query.dtype, kv_cache.dtype, fp8_compute), SCALED=scaled,
        **_v_layout(kv_cache, block_n), num_warps=num_warps, num_stages=num_stages)
    _decode_merge_kernel[(num_tokens, num_heads)](
        mid_o, mid_lse, out, out.stride(0), out.stride(1), num_heads,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), NUM_SPLITS=num_splits,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), USE_PDL=use_pdl(query.device), num_warps=1)
