"""Attention backend on Triton kernels (CUDA): paged KV write, extend/prefill
attention for batches with any multi-token request, split-KV decode attention
for all-decode batches. Kernels: ``ember.kernels.triton_attention``."""

from __future__ import annotations

import torch

from ember.kernels.triton_attention import decode_attention, extend_attention, num_decode_splits, store_kv_cache
from ember.layers.attention.backend import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        super().__init__(num_heads, head_dim, scale, num_kv_heads)
        self.num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        store_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        out = torch.empty_like(query)
        if metadata.max_query_len == 1:
            splits = metadata.num_kv_splits or num_decode_splits(query.shape[0], self.num_kv_heads, self.num_sms)
            decode_attention(query, kv_cache, out, metadata.block_table, metadata.seq_lens, self.scale, splits)
        else:
            extend_attention(query, kv_cache, out, metadata.block_table, metadata.query_start_loc,
                             metadata.seq_lens, metadata.max_query_len, self.scale)
        return out
