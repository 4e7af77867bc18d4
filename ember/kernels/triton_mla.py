"""Triton kernels for multi-head latent attention (MLA; DeepSeek-AI, 2024,
"DeepSeek-V2", section 2.1) over the paged latent cache (CUDA; CPU tensors
under Triton's interpreter).

Cache layout per layer: ``[num_blocks, block_size, kv_lora_rank +
qk_rope_head_dim]``, one row ``[c_kv | k_pe]`` per token, token ``p`` of a
request at slot ``block_table[p // block_size] * block_size + p % block_size``
(``ember.layers.attention.mla.mla_kv_cache_spec``).

* ``store_latent_cache``: scatter each new token's ``[c_kv | k_pe]`` to its
  slot (negative slot = a CUDA-graph padding row, skipped).
* ``mla_decode_attention``: attention in the absorbed form: queries already
  in the latent space (``q_nope W_UK`` next to the rotated ``q_pe``), keys the
  cached rows, values their first ``kv_lora_rank`` columns (MQA with one
  shared KV head). Split-KV (FlashDecoding, Dao et al., 2023) as
  ``ember.kernels.triton_attention.decode_attention``: each program takes one
  query row, a tile of ``BLOCK_H`` heads (so ``QK^T`` and ``PV`` are
  tensor-core dots of ``BLOCK_H`` rows) and one of ``num_splits`` pieces of
  the row's keys; the split results are merged by the standard decode merge
  kernel. Every query row carries its own request and key count, so the same
  kernel serves decode steps (one row per request), verification steps
  (``q`` rows per request, causal among them) and the short requests of mixed
  steps. The launch depends only on shapes and ``num_splits`` (CUDA-graph
  safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.triton_attention import _decode_merge_kernel, _dot, _query_to, num_decode_splits

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ----------------------------------------------------------------- latent write
@triton.jit
def _store_latent_kernel(KV_c, K_pe, cache, slot_mapping, stride_c, stride_pe,
                         RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t)
    if slot < 0:
        return
    row = RANK + ROPE
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    c = tl.load(KV_c + t * stride_c + offs_r, mask=offs_r < RANK)
    pe = tl.load(K_pe + t * stride_pe + offs_p, mask=offs_p < ROPE)
    dst = cache + slot * row
    tl.store(dst + offs_r, c.to(cache.dtype.element_ty), mask=offs_r < RANK)
    tl.store(dst + RANK + offs_p, pe.to(cache.dtype.element_ty), mask=offs_p < ROPE)


def store_latent_cache(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Write ``[kv_c | k_pe]`` of each new token to its slot.

    Args:
        kv_c: [num_tokens, kv_lora_rank]; k_pe: [num_tokens, qk_rope_head_dim]
            (may be strided views of one projection; copied first unless
            their last dim is contiguous).
        kv_cache: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim].
        slot_mapping: [num_tokens] int64; negative entries are skipped.
    """
    num_tokens, rank = kv_c.shape
    if num_tokens == 0:
        return
    rope = k_pe.shape[-1]
    assert kv_cache.shape[-1] == rank + rope, "cache rows must be kv_lora_rank + qk_rope_head_dim wide"
    if kv_c.stride(-1) != 1:
        kv_c = kv_c.contiguous()
    if k_pe.stride(-1) != 1:
        k_pe = k_pe.contiguous()
    _store_latent_kernel[(num_tokens,)](kv_c, k_pe, kv_cache, slot_mapping, kv_c.stride(0), k_pe.stride(0),
                                        RANK=rank, ROPE=rope, BLOCK_R=triton.next_power_of_2(rank),
                                        BLOCK_P=triton.next_power_of_2(rope))


# ---------------------------------------------------------------------- decode
@triton.jit(do_not_specialize=["stride_bt", "stride_lt", "stride_lh", "stride_pt", "stride_ph"])
def _mla_split_kernel(Q_lat, Q_pe, KV, Mid_O, Mid_LSE, block_table, seq_lens, Row_req, Row_lens, sm_scale,
                      stride_lt, stride_lh, stride_pt, stride_ph, stride_bt, num_heads,
                      RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_H: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                      NUM_SPLITS: tl.constexpr, QUERY_LEN: tl.constexpr, IEEE: tl.constexpr,
                      COMPUTE: tl.constexpr):
    # Head tiles vary fastest over the grid: the programs that read the same
    # latents (one row's split, every head tile) run side by side and share them in L2.
    head_tile = tl.program_id(0)
    t = tl.program_id(1)
    split = tl.program_id(2)
    if QUERY_LEN > 0:
        # Rows r * QUERY_LEN + j: request r's new token j, at position
        # seq_len - QUERY_LEN + j, sees the keys up to it (none for padding rows).
        req = t // QUERY_LEN
        n_keys = tl.maximum(tl.load(seq_lens + req) - QUERY_LEN + t % QUERY_LEN + 1, 0)
    else:
        req = tl.load(Row_req + t)
        n_keys = tl.load(Row_lens + t)
    # Each row cuts its keys into NUM_SPLITS pieces of whole BLOCK_N tiles.
    split_len = tl.cdiv(tl.cdiv(n_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    stop = tl.minimum(start + split_len, n_keys)

    heads = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    mask_h = heads < num_heads
    mask_r = offs_r < RANK
    mask_p = offs_p < ROPE
    q_lat = tl.load(Q_lat + t * stride_lt + heads[:, None] * stride_lh + offs_r[None, :],
                    mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    q_pe = tl.load(Q_pe + t * stride_pt + heads[:, None] * stride_ph + offs_p[None, :],
                   mask=mask_h[:, None] & mask_p[None, :], other=0.0)
    q_lat = _query_to(q_lat, COMPUTE)
    q_pe = _query_to(q_pe, COMPUTE)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 is cheaper than exp
    row = RANK + ROPE
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        page = tl.load(block_table + req * stride_bt + offs_n // PAGE, mask=mask_n, other=0)
        slot = page.to(tl.int64) * PAGE + offs_n % PAGE
        base = KV + slot[:, None] * row
        c = tl.load(base + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(COMPUTE)
        pe = tl.load(base + RANK + offs_p[None, :], mask=mask_n[:, None] & mask_p[None, :], other=0.0).to(COMPUTE)
        s = (_dot(q_lat, tl.trans(c), IEEE) + _dot(q_pe, tl.trans(pe), IEEE)) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # Values are the latents themselves: the same tile serves K and V.
        acc = acc * alpha[:, None] + _dot(p.to(COMPUTE), c, IEEE)
        m_i = m_new
    # An empty split (or a row with no keys) leaves l_i = 0: its LSE is -inf,
    # it drops out of the merge, and a row whose every split is empty comes out zero.
    valid = l_i > 0
    out = acc / tl.where(valid, l_i, 1.0)[:, None]
    lse = tl.where(valid, m_i + tl.log2(tl.where(valid, l_i, 1.0)), float("-inf"))
    # Partial results per (row, head, split), the layout _decode_merge_kernel reads.
    mid = (t * num_heads + heads) * NUM_SPLITS + split
    tl.store(Mid_O + mid[:, None] * RANK + offs_r[None, :], out, mask=mask_h[:, None] & mask_r[None, :])
    tl.store(Mid_LSE + mid, lse, mask=mask_h)


def mla_num_splits(num_rows: int, num_heads: int, num_sms: int, block_h: int = 16) -> int:
    """KV splits per query row for :func:`mla_decode_attention`: about two
    waves of programs over the GPU (``num_rows x ceil(num_heads / block_h)``
    programs per split), a power of two up to 32 (as
    ``ember.kernels.triton_attention.num_decode_splits``). Depends only on
    shapes, so a captured CUDA graph and its warm-up agree."""
    return num_decode_splits(num_rows, triton.cdiv(num_heads, block_h), num_sms)


def mla_decode_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor,
                         block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float, num_splits: int,
                         query_len: int = 1, row_req: torch.Tensor | None = None,
                         row_lens: torch.Tensor | None = None, block_h: int = 16, block_n: int | None = None,
                         num_warps: int = 4, num_stages: int = 2, merge_warps: int = 4) -> None:
    """Absorbed MLA over the paged latent cache; softmax in float32.

    ``out[t, h] = softmax(scale * [q_lat | q_pe][t, h] . K[:n_t]^T) V[:n_t]``
    where ``K`` are the cached rows ``[c_kv | k_pe]`` of row t's request,
    ``V = c_kv`` and ``n_t`` the number of keys row t sees.

    Args:
        q_lat: [num_rows, num_heads, kv_lora_rank], ``q_nope W_UK`` (any
            strides with a contiguous last dim, e.g. the transpose of a
            batched matmul's [num_heads, num_rows, kv_lora_rank] output).
        q_pe: [num_rows, num_heads, qk_rope_head_dim], rotated (last dim contiguous).
        kv_cache: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim],
            the query dtype (the new tokens' latents already stored).
        out: [num_rows, num_heads, kv_lora_rank] (any strides with a
            contiguous last dim), in any float dtype.
        block_table: [num_reqs, max_blocks] int32.
        seq_lens: [num_reqs] int32, keys of each request after this step.
        scale: softmax scale.
        num_splits: KV splits per row (:func:`mla_num_splits`).
        query_len: > 0: rows ``r * query_len + j`` are request r's new tokens
            j = 0..query_len-1, row j seeing ``seq_len - query_len + j + 1``
            keys (1: a decode step, row r is request r); 0: each row's request
            and key count come from ``row_req`` / ``row_lens`` ([num_rows] int32).
        block_h, block_n: heads and keys per tile (block_h >= 16: the dots'
            smallest tile; block_n None: 32, or 16 over a float32 cache, whose
            32-key tiles spill registers at DeepSeek's dims); num_warps,
            num_stages, merge_warps: launch settings.
    Rows with no keys (padding rows, ``seq_len`` 0) come out zero and read no cache.
    """
    num_rows, num_heads, rank = q_lat.shape
    rope = q_pe.shape[-1]
    _, block_size, row = kv_cache.shape
    assert row == rank + rope, "cache rows must be kv_lora_rank + qk_rope_head_dim wide"
    assert q_lat.stride(-1) == 1 and q_pe.stride(-1) == 1 and out.stride(-1) == 1
    if num_rows == 0:
        return
    if query_len == 0:
        assert row_req is not None and row_lens is not None, "query_len 0 needs row_req and row_lens"
    else:
        row_req = row_lens = seq_lens  # placeholders the kernel never reads
    # NOTE: offsets are 32-bit (64-bit ones cost registers: spills on Triton 3.6).
    assert max(q_lat.stride(0) * num_rows, q_lat.stride(1) * num_heads, out.stride(0) * num_rows,
               out.stride(1) * num_heads, num_rows * num_heads * num_splits * rank) < 2 ** 31, "step too large"
    mid_o = torch.empty(num_rows * num_heads * num_splits * rank, dtype=torch.float32, device=q_lat.device)
    mid_lse = torch.empty(num_rows * num_heads * num_splits, dtype=torch.float32, device=q_lat.device)
    block_h = max(16, min(block_h, triton.next_power_of_2(num_heads)))
    block_n = block_n or (16 if kv_cache.element_size() == 4 else 32)
    _mla_split_kernel[(triton.cdiv(num_heads, block_h), num_rows, num_splits)](
        q_lat, q_pe, kv_cache, mid_o, mid_lse, block_table, seq_lens, row_req, row_lens, scale,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), block_table.stride(0), num_heads,
        RANK=rank, ROPE=rope, BLOCK_R=max(16, triton.next_power_of_2(rank)),
        BLOCK_P=max(16, triton.next_power_of_2(rope)), BLOCK_H=block_h, PAGE=block_size, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, QUERY_LEN=query_len, IEEE=q_lat.dtype == torch.float32,
        COMPUTE=_TL_DTYPES[q_lat.dtype], num_warps=num_warps, num_stages=num_stages)
    _decode_merge_kernel[(num_rows, num_heads)](
        mid_o, mid_lse, out, out.stride(0), out.stride(1), num_heads,
        HEAD_DIM=rank, BLOCK_D=triton.next_power_of_2(rank), NUM_SPLITS=num_splits,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), USE_PDL=False, num_warps=merge_warps)
