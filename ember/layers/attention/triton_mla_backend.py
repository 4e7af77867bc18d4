"""MLA on Triton kernels (CUDA; CPU tensors under Triton's interpreter): the
latent-cache write and the absorbed-form split-KV kernel of
``ember.kernels.triton_mla``, with ``W_UK`` / ``W_UV`` applied as batched
matmuls around it.

- Decode steps (one new token per request) and uniform verification steps
  (``AttentionMetadata.uniform_query_len``): every row through the kernel,
  nothing read on the host, so the steps run inside CUDA graphs.
- Other steps (eager, host lists read): a step whose requests all have the
  same number q <= ``MAX_ABSORBED_QUERY_LEN`` of new tokens (verification
  outside the graphs) as a uniform step; otherwise the leading decodes
  (``AttentionMetadata.num_decodes``) as a decode step, the other requests
  with at most ``MAX_ABSORBED_QUERY_LEN`` new tokens through the kernel's
  row-indexed mode in one launch, and longer ones (prompt chunks) in the
  decompressed form, request by request
  (:meth:`MLABackend._prefill_decompressed`). The decode and uniform launches
  are those the CUDA graphs compiled at capture.

The kernel's split count is a function of the step's row and head counts
(:func:`~ember.kernels.triton_mla.mla_num_splits`), so a CUDA graph's warm-up
and capture launch the same kernels; ``AttentionMetadata.num_kv_splits`` (sized
for standard attention's KV heads) is not used. The latent write skips the
slots -1 of the graphs' padding rows.
"""

from __future__ import annotations

import numpy as np
import torch

from ember.kernels.triton_mla import mla_decode_attention, mla_num_splits, store_latent_cache
from ember.layers.attention.backend import AttentionMetadata
from ember.layers.attention.mla import MLABackend

# Requests with more new tokens attend in the decompressed form: the kernel
# runs one program per new token and head tile, each reading the request's keys
# anew, which suits a few rows per request; a prompt chunk is better served by
# decompressing its context once and attending with fused SDPA.
MAX_ABSORBED_QUERY_LEN = 16


class TritonMLABackend(MLABackend):
    name = "triton"
    cuda_graph_safe = True

    def __init__(self, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                 kv_lora_rank: int, scale: float) -> None:
        super().__init__(num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank, scale)
        # The SM count sets the split count only; without CUDA (the interpreter) a small GPU's.
        self.num_sms = (torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                        if torch.cuda.is_available() else 8)

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor,
                kv_b_weight: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        n = q_nope.shape[0]
        if n == 0:
            return q_nope.new_empty(0, self.num_heads, self.v_head_dim)
        store_latent_cache(kv_c, k_pe.reshape(n, self.qk_rope_head_dim), kv_cache, metadata.slot_mapping)
        q_len = metadata.uniform_query_len
        if metadata.max_query_len == 1 or q_len > 1:  # decode or uniform verification: device metadata only
            return self.absorbed(q_nope, q_pe, kv_b_weight, kv_cache, metadata.block_table, metadata.seq_lens,
                                 max(q_len, 1))
        q_lens = np.diff(np.asarray(metadata.query_start_loc_cpu, dtype=np.int64))
        if q_lens.max() <= MAX_ABSORBED_QUERY_LEN and q_lens.min() == q_lens.max():
            return self.absorbed(q_nope, q_pe, kv_b_weight, kv_cache, metadata.block_table, metadata.seq_lens,
                                 int(q_lens[0]))
        out = q_nope.new_empty(n, self.num_heads, self.v_head_dim)
        nd = metadata.num_decodes  # the leading single-token requests: rows 0..nd-1
        if nd:
            out[:nd] = self.absorbed(q_nope[:nd], q_pe[:nd], kv_b_weight, kv_cache, metadata.block_table[:nd],
                                     metadata.seq_lens[:nd], 1)
        rows, row_req, row_lens, long_reqs = _short_rows(metadata, q_lens, nd, q_nope.device)
        if rows is not None:
            out.index_copy_(0, rows, self.absorbed(q_nope.index_select(0, rows), q_pe.index_select(0, rows),
                                                   kv_b_weight, kv_cache, metadata.block_table, metadata.seq_lens,
                                                   0, row_req, row_lens))
        for i in long_reqs:
            self._prefill_decompressed(q_nope, q_pe, kv_b_weight, kv_cache, metadata, i, out)
        return out

    def absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor, kv_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, query_len: int,
                 row_req: torch.Tensor | None = None, row_lens: torch.Tensor | None = None) -> torch.Tensor:
        """``softmax([q_nope W_UK | q_pe] . [c_kv | k_pe]) c_kv W_UV`` for
        every row of ``q_nope`` ([rows, num_heads, qk_nope_head_dim]; ``q_pe``
        [rows, num_heads, qk_rope_head_dim]); rows and their key counts as
        :func:`~ember.kernels.triton_mla.mla_decode_attention`'s ``query_len``
        / ``row_req`` / ``row_lens``. Returns [rows, num_heads, v_head_dim]
        (a transposed view)."""
        rows = q_nope.shape[0]
        w_uk, w_uv = self._split_kv_b(kv_b_weight)  # [heads, nope, rank], [heads, v, rank]
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk)  # [heads, rows, rank]
        if q_pe.stride(-1) != 1:
            q_pe = q_pe.contiguous()
        o_lat = torch.empty_like(q_lat)
        splits = mla_num_splits(rows, self.num_heads, self.num_sms)
        mla_decode_attention(q_lat.transpose(0, 1), q_pe, kv_cache, o_lat.transpose(0, 1), block_table, seq_lens,
                             self.scale, splits, query_len=query_len, row_req=row_req, row_lens=row_lens)
        return torch.bmm(o_lat, w_uv.transpose(1, 2)).transpose(0, 1)  # [rows, heads, v]


def _short_rows(metadata: AttentionMetadata, q_lens: np.ndarray, first: int, device: torch.device
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, list[int]]:
    """For an eager step, over requests ``first..``: the token rows of those
    with at most ``MAX_ABSORBED_QUERY_LEN`` new tokens ([rows] int64, None
    when there are none), each row's request and key count ([rows] int32; row
    j of a request with q new tokens sees ``seq_len - q + j + 1`` keys), and
    the other requests' indices. Computed once per step (the first layer) and
    reused by the others (``metadata.step_cache``)."""
    cached = metadata.step_cache.get("mla_short_rows")
    if cached is not None:
        return cached
    starts = np.asarray(metadata.query_start_loc_cpu, dtype=np.int64)
    short = q_lens <= MAX_ABSORBED_QUERY_LEN
    short[:first] = False
    long_reqs = np.flatnonzero(q_lens > MAX_ABSORBED_QUERY_LEN).tolist()
    if not short.any():
        result = (None, None, None, long_reqs)
    else:
        reqs = np.flatnonzero(short)
        row_req = np.repeat(reqs, q_lens[reqs])
        rows = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in reqs])
        seq_lens = np.asarray(metadata.seq_lens_cpu, dtype=np.int64)
        row_lens = seq_lens[row_req] - q_lens[row_req] + (rows - starts[row_req]) + 1
        packed = torch.from_numpy(np.stack([rows, row_req, row_lens])).to(device)
        result = (packed[0], packed[1].int(), packed[2].int(), long_reqs)
    metadata.step_cache["mla_short_rows"] = result
    return result
