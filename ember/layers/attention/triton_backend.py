"""Attention backend on Triton kernels (CUDA): paged KV write, extend/prefill
attention for batches with any multi-token request, split-KV decode attention
for all-decode batches and for verification steps of a fixed number of new
tokens per request (``AttentionMetadata.uniform_query_len``). Kernels:
``ember.kernels.triton_attention``."""

from __future__ import annotations

import torch

from ember.kernels.triton_attention import (decode_attention, extend_attention, num_decode_splits,
                                            rope_and_store_kv_cache, store_kv_cache, verify_attention)
from ember.layers.attention.backend import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    fuses_rope = True

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        super().__init__(num_heads, head_dim, scale, num_kv_heads)
        self.num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if rope is None:
            store_kv_cache(key, value, kv_cache, metadata.slot_mapping, kv_scales)
        else:  # one kernel rotates the query in place and writes the rotated key
            rope_and_store_kv_cache(rope[0], query, key, value, kv_cache, metadata.slot_mapping, rope[1], kv_scales)
        out = torch.empty_like(query)
        if metadata.max_query_len == 1:
            self._decode(query, kv_cache, out, metadata.block_table, metadata.seq_lens, metadata.num_kv_splits,
                         kv_scales)
            return out
        q_len = metadata.uniform_query_len
        if q_len > 1:  # a verification step: the split-KV kernel, query_len tokens per request
            splits = metadata.num_kv_splits or num_decode_splits(metadata.seq_lens.shape[0], self.num_kv_heads,
                                                                 self.num_sms)
            verify_attention(query, kv_cache, out, metadata.block_table, metadata.seq_lens, q_len, self.scale,
                             splits, kv_scales=kv_scales)
            return out
        # Mixed batch: the leading decode rows take the GQA-packed decode kernel
        # (K/V read once per KV head, not once per query head).
        nd = metadata.num_decodes
        if nd:
            self._decode(query[:nd], kv_cache, out[:nd], metadata.block_table[:nd], metadata.seq_lens[:nd], 0,
                         kv_scales)
        extend_attention(query, kv_cache, out, metadata.block_table, metadata.query_start_loc, metadata.seq_lens,
                         metadata.max_query_len, self.scale, first_req=nd, kv_scales=kv_scales)
        return out

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor, num_splits: int,
                kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        splits = num_splits or num_decode_splits(query.shape[0], self.num_kv_heads, self.num_sms)
        decode_attention(query, kv_cache, out, block_table, seq_lens, self.scale, splits, kv_scales=kv_scales)
