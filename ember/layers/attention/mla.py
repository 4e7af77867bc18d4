"""Multi-head latent attention (MLA; DeepSeek-AI, 2024, "DeepSeek-V2", section
2.1) over a paged cache of compressed latents.

Per token only ``c_kv`` (the ``kv_lora_rank`` latent, after ``kv_a_layernorm``)
and ``k_pe`` (the ``qk_rope_head_dim`` rotary key shared by all heads) are
cached: one tensor per layer ``[num_blocks, block_size, kv_lora_rank +
qk_rope_head_dim]``, addressed by the same slot mapping / block tables as the
standard K/V cache. ``kv_b_proj`` (``W_kv_b``: ``[num_heads * (qk_nope_head_dim
+ v_head_dim), kv_lora_rank]``) turns latents into per-head keys and values.

Two equivalent ways to attend (DeepSeek-V2 paper, "absorbed" weights):

- decompressed (prefill and chunked prefill): ``k_nope, v = W_kv_b c_kv`` for
  every context token, then ordinary attention with ``k = [k_nope, k_pe]``;
- absorbed (decode): fold ``W_UK`` into the query (``q_lat = q_nope W_UK``) and
  ``W_UV`` into the output, so attention runs directly on the latents as MQA
  with one KV head of size ``kv_lora_rank + qk_rope_head_dim``, and values are
  the latents themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.attention.backend import AttentionBackend, AttentionMetadata, KVCacheSpec
from ember.layers.attention.layer import ForwardContext
from ember.utils import resolve_lazy


def mla_kv_cache_spec(num_layers: int, block_size: int, kv_lora_rank: int, qk_rope_head_dim: int,
                      dtype: torch.dtype) -> KVCacheSpec:
    """MLA's cache: ``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`` per layer."""
    return KVCacheSpec(num_layers, (), (block_size, kv_lora_rank + qk_rope_head_dim), dtype)


class MLABackend(ABC):
    """Computes MLA of new tokens over the paged latent cache.

    Args:
        num_heads: query heads of this rank.
        qk_nope_head_dim, qk_rope_head_dim: the non-rotary and rotary parts of
            a query/key head.
        v_head_dim: size of a value head.
        kv_lora_rank: size of the cached latent ``c_kv``.
        scale: softmax scale.
    """

    name: str = ""
    # Whether a decode step can be captured in a CUDA graph (no host reads of metadata).
    cuda_graph_safe: bool = False

    def __init__(self, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                 kv_lora_rank: int, scale: float) -> None:
        self.num_heads, self.scale = num_heads, scale
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = v_head_dim, kv_lora_rank

    @abstractmethod
    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor,
                kv_b_weight: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Write ``[kv_c, k_pe]`` into ``kv_cache`` at ``metadata.slot_mapping``, then attend.

        Args:
            q_nope: [num_tokens, num_heads, qk_nope_head_dim].
            q_pe: [num_tokens, num_heads, qk_rope_head_dim], already rotated.
            kv_c: [num_tokens, kv_lora_rank], normalized latents.
            k_pe: [num_tokens, qk_rope_head_dim], already rotated.
            kv_b_weight: [num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank].
            kv_cache: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim].
        Returns:
            [num_tokens, num_heads, v_head_dim], same dtype as ``q_nope``.
        """

    def _split_kv_b(self, kv_b_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK`` [num_heads, qk_nope_head_dim, kv_lora_rank] and ``W_UV``
        [num_heads, v_head_dim, kv_lora_rank] (views of ``kv_b_weight``)."""
        w = kv_b_weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def _prefill_decompressed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor,
                              kv_cache: torch.Tensor, metadata: AttentionMetadata, i: int, out: torch.Tensor) -> None:
        """Request ``i``'s new tokens in the decompressed form (reads its
        lengths on the host): rows of ``out`` at its query offsets."""
        start, end = metadata.query_start_loc_cpu[i], metadata.query_start_loc_cpu[i + 1]
        seq_len, q_len = metadata.seq_lens_cpu[i], end - start
        num_blocks = -(-seq_len // kv_cache.shape[1])
        latents = gather_latents(kv_cache, metadata.block_table[i, :num_blocks], seq_len)
        kv_c, k_pe = latents.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = F.linear(kv_c, kv_b_weight).view(seq_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.num_heads, -1)], dim=-1)
        q = torch.cat([q_nope[start:end], q_pe[start:end]], dim=-1)
        # New token j sits at position seq_len - q_len + j and sees keys 0..that position.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=self.scale)
        out[start:end] = o.transpose(0, 1)


def write_latent_cache(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Scatter ``[kv_c | k_pe]`` of each new token into its slot."""
    kv_cache.view(-1, kv_cache.shape[-1]).index_copy_(0, slot_mapping, torch.cat([kv_c, k_pe], dim=-1))


def gather_latents(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The cached ``[kv_c | k_pe]`` of one request's first ``seq_len`` tokens,
    ``[seq_len, kv_lora_rank + qk_rope_head_dim]``, read through its block table."""
    return kv_cache.index_select(0, block_ids).view(-1, kv_cache.shape[-1])[:seq_len]


class TorchMLABackend(MLABackend):
    """Plain PyTorch MLA: requests with several new tokens attend one at a time
    on decompressed K/V; all single-token (decode) requests attend together in
    the absorbed form on a padded batch of latents."""

    name = "torch"

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor,
                kv_b_weight: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        write_latent_cache(kv_c, k_pe, kv_cache, metadata.slot_mapping)
        out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_head_dim)
        starts = metadata.query_start_loc_cpu
        decode_rows = [i for i in range(metadata.num_reqs) if starts[i + 1] - starts[i] == 1]
        if decode_rows:
            self._decode_absorbed(q_nope, q_pe, kv_b_weight, kv_cache, metadata, decode_rows, out)
        for i in sorted(set(range(metadata.num_reqs)) - set(decode_rows)):
            self._prefill_decompressed(q_nope, q_pe, kv_b_weight, kv_cache, metadata, i, out)
        return out

    def _decode_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor,
                         kv_cache: torch.Tensor, metadata: AttentionMetadata, rows: list[int],
                         out: torch.Tensor) -> None:
        """Single-token requests: ``softmax([q_nope W_UK, q_pe] . [c_kv, k_pe]) c_kv W_UV``
        on a padded [num_decodes, max_len] batch of latents, padding masked out."""
        block_size = kv_cache.shape[1]
        seq_lens = [metadata.seq_lens_cpu[i] for i in rows]
        max_blocks = -(-max(seq_lens) // block_size)
        idx = torch.tensor(rows, device=q_nope.device)
        tables = metadata.block_table.index_select(0, idx)[:, :max_blocks]
        b = len(rows)
        latents = kv_cache[tables].view(b, max_blocks * block_size, -1)  # [b, L, rank + rope]
        token_idx = torch.tensor([metadata.query_start_loc_cpu[i] for i in rows], device=q_nope.device)
        w_uk, w_uv = self._split_kv_b(kv_b_weight)
        q_lat = torch.einsum("bhn,hnr->bhr", q_nope.index_select(0, token_idx), w_uk)
        q = torch.cat([q_lat, q_pe.index_select(0, token_idx)], dim=-1)  # [b, heads, rank + rope]
        scores = torch.einsum("bhd,bld->bhl", q, latents).float() * self.scale
        lens = torch.tensor(seq_lens, device=q.device)
        pad = torch.arange(latents.shape[1], device=q.device)[None, :] >= lens[:, None]
        probs = scores.masked_fill(pad[:, None, :], float("-inf")).softmax(dim=-1).to(q.dtype)
        o_lat = torch.einsum("bhl,blr->bhr", probs, latents[..., : self.kv_lora_rank])
        out.index_copy_(0, token_idx, torch.einsum("bhr,hvr->bhv", o_lat, w_uv))


_MLA_BACKENDS: dict[str, str] = {
    # Keyed by the name of the attention backend chosen at start-up, so one
    # choice ("torch" on CPU) picks both the standard and the MLA implementation.
    "torch": "ember.layers.attention.mla:TorchMLABackend",
    "triton": "ember.layers.attention.triton_mla_backend:TritonMLABackend",
}


def get_mla_backend(attn_backend: type[AttentionBackend]) -> type[MLABackend]:
    """The MLA implementation that goes with the attention backend ``attn_backend``.

    Raises:
        ValueError: the backend has no MLA implementation registered.
    """
    return resolve_lazy(_MLA_BACKENDS, attn_backend.name, "attention backend with an MLA implementation")


class MLAAttention(nn.Module):
    """The attention step of MLA over the paged latent cache; the model keeps
    the projections (q, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``) and
    the rotary embedding.

    Args:
        num_heads: query heads of this rank.
        qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank: MLA dims.
        scale: softmax scale.
        layer_idx: which cache in ``ForwardContext.kv_caches`` is this layer's.
        attn_backend: the attention backend chosen at start-up (its MLA sibling runs).
    """

    def __init__(self, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                 kv_lora_rank: int, scale: float, layer_idx: int, attn_backend: type[AttentionBackend]) -> None:
        super().__init__()
        self.num_heads, self.v_head_dim, self.layer_idx = num_heads, v_head_dim, layer_idx
        self.impl = get_mla_backend(attn_backend)(num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
                                                  kv_lora_rank, scale)
        self.cuda_graph_safe = self.impl.cuda_graph_safe

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor,
                kv_b_weight: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Shapes as :meth:`MLABackend.forward`. Returns [n, num_heads * v_head_dim]."""
        out = self.impl.forward(q_nope, q_pe, kv_c, k_pe, kv_b_weight, ctx.kv_caches[self.layer_idx],
                                ctx.attn_metadata)
        return out.reshape(out.shape[0], self.num_heads * self.v_head_dim)
