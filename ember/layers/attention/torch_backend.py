"""Reference attention backend in plain PyTorch (runs anywhere; the CPU path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.layers.attention.backend import (AttentionBackend, AttentionMetadata, as_copyable, from_cache_dtype,
                                            to_cache_dtype, v_token_major)

_Scales = tuple[torch.Tensor, torch.Tensor] | None


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   kv_scales: _Scales = None) -> None:
    """Scatter new K/V ([num_tokens, num_kv_heads, head_dim]) into their slots,
    converted to the cache's dtype (an FP8 cache: divided by ``kv_scales``,
    see :func:`~ember.layers.attention.backend.to_cache_dtype`), in the
    cache's layout (V transposed in an FP8 cache)."""
    block_size = kv_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    for i, (x, rows) in enumerate(((key, as_copyable(kv_cache)[0]), (value, v_token_major(kv_cache)))):
        scale = None if kv_scales is None else kv_scales[i]
        rows[blocks, offsets] = as_copyable(to_cache_dtype(x, kv_cache.dtype, scale))


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int,
              dtype: torch.dtype, kv_scales: _Scales = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one request's first ``seq_len`` tokens, each
    [seq_len, num_kv_heads, head_dim] in ``dtype`` (an FP8 cache's values
    times ``kv_scales``), read through its block table."""
    k, v = (x.reshape(-1, *x.shape[-2:])[:seq_len].view(kv_cache.dtype) for x in _blocks(kv_cache, block_ids))
    if kv_scales is None:
        return k.to(dtype), v.to(dtype)
    return from_cache_dtype(k, dtype, kv_scales[0]), from_cache_dtype(v, dtype, kv_scales[1])


def _blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the blocks ``block_ids`` (any shape ``S``), each
    ``[*S, block_size, num_kv_heads, head_dim]`` token-major whatever the
    cache's layout, as raw bytes for an FP8 cache (see ``as_copyable``)."""
    return as_copyable(kv_cache)[0][block_ids], v_token_major(kv_cache)[block_ids]


class TorchAttentionBackend(AttentionBackend):
    """Loops over requests; each attends with ``scaled_dot_product_attention``
    over K/V gathered from its blocks. Exact, simple, not fast."""

    name = "torch"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, kv_scales: _Scales = None) -> torch.Tensor:
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping, kv_scales)
        out = torch.empty_like(query)
        starts = metadata.query_start_loc_cpu
        decode_rows = [i for i in range(metadata.num_reqs) if starts[i + 1] - starts[i] == 1]
        if len(decode_rows) > 1:
            self._decode_batch(query, kv_cache, metadata, decode_rows, out, kv_scales)
            done = set(decode_rows)
        else:
            done = set()
        for i, seq_len in enumerate(metadata.seq_lens_cpu):
            if i not in done:
                self._one_request(query, kv_cache, metadata, i, seq_len, out, kv_scales)
        return out

    def _one_request(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, i: int,
                     seq_len: int, out: torch.Tensor, kv_scales: _Scales = None) -> None:
        start, end = metadata.query_start_loc_cpu[i], metadata.query_start_loc_cpu[i + 1]
        q = query[start:end]
        q_len = q.shape[0]
        num_blocks = -(-seq_len // kv_cache.shape[2])
        k, v = gather_kv(kv_cache, metadata.block_table[i, :num_blocks], seq_len, q.dtype, kv_scales)
        mask = None
        if 1 < q_len < seq_len:
            # New token j sits at position seq_len - q_len + j and sees keys 0..that position.
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        # A whole prompt (no cached context) is plain causal attention, which SDPA
        # runs without materializing a mask (1.6x faster at 1000 tokens on CPU).
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=1 < q_len == seq_len, scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        out[start:end] = o.squeeze(0).transpose(0, 1)

    def _decode_batch(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                      rows: list[int], out: torch.Tensor, kv_scales: _Scales = None) -> None:
        """All single-token requests in one call: K/V gathered into a padded
        [num_decodes, max_len] batch, padding masked out."""
        block_size, num_kv_heads, head_dim = kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
        seq_lens = [metadata.seq_lens_cpu[i] for i in rows]
        max_blocks = -(-max(seq_lens) // block_size)
        idx = torch.tensor(rows, device=query.device)
        tables = metadata.block_table.index_select(0, idx)[:, :max_blocks]
        b = len(rows)
        k, v = (from_cache_dtype(x.view(kv_cache.dtype), query.dtype, None if kv_scales is None else kv_scales[i])
                .reshape(b, max_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)
                for i, x in enumerate(_blocks(kv_cache, tables)))
        lens = torch.tensor(seq_lens, device=query.device)
        mask = (torch.arange(max_blocks * block_size, device=query.device)[None, :] < lens[:, None])[:, None, None, :]
        token_idx = torch.tensor([metadata.query_start_loc_cpu[i] for i in rows], device=query.device)
        q = query.index_select(0, token_idx).unsqueeze(2)  # [b, num_heads, 1, head_dim]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        out.index_copy_(0, token_idx, o.squeeze(2))
