"""The attention backend interface and its registry.

A backend reads and writes the paged KV cache. The cache of one layer is one
tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V); a
token at position ``p`` of a request lives in block ``block_table[p //
block_size]`` at offset ``p % block_size``, i.e. in slot ``block_id *
block_size + offset`` (the slot mapping). Layout and naming follow vLLM's
paged attention (Kwon et al., 2023, "PagedAttention").

An FP8 cache stores each V block transposed (:func:`v_transposed`): the
block's bytes are ``[num_kv_heads, head_dim, block_size]``, a block's tokens
contiguous for each channel (the value-cache layout of vLLM's original
PagedAttention kernels), while the tensor keeps the shape above. The PV
product of attention reduces over tokens, so V must reach the tensor cores'
operand fragments with tokens adjacent; ``ldmatrix`` transposes on chip for
16-bit elements only, and a token-major FP8 V was read from shared memory a
byte at a time (128 ``LDS.U8`` per thread and tile in the sm_90 decode kernel;
none with the transposed layout, ``tests/kernels/test_triton_attention_compile.py``).
K and every 16-bit or float32 cache keep the token-major layout.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.config import FP8_DTYPES
from ember.utils import resolve_lazy


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step inputs of every attention layer, for a packed batch of
    ``num_reqs`` requests and ``num_tokens`` new tokens (no padding).

    Attributes:
        slot_mapping: [num_tokens] int64, KV-cache slot of each new token.
        query_start_loc: [num_reqs + 1] int32, offsets of each request's new
            tokens in the packed batch.
        seq_lens: [num_reqs] int32, tokens in context after this step (cached +
            new) for each request.
        block_table: [num_reqs, max_num_blocks] int32, block ids per request
            (rows padded with 0).
        max_query_len: longest run of new tokens of one request.
        max_seq_len: longest ``seq_lens`` entry.
        query_start_loc_cpu / seq_lens_cpu: the same as host lists, for backends
            that loop over requests on the host.
        num_kv_splits: split-KV decode: splits per request, fixed when a CUDA
            graph is captured (0: the backend chooses).
        num_decodes: the first ``num_decodes`` requests have one new token each
            (the runner puts decodes first), so backends may run them apart.
        uniform_query_len: when > 1, every request has exactly this many new
            tokens (a speculative verification step, captured in a CUDA graph:
            ``ember.worker.cuda_graph.VerifyCUDAGraphRunner``), and backends
            may attend with a kernel whose launch depends only on the shapes
            (padding requests have ``seq_lens`` 0); 0: no such promise.
        step_cache: values a backend derives from this metadata once per
            step and shares between its layers (e.g. row index tensors read
            from the host lists), keyed by the backend; empty when built.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    num_kv_splits: int = 0
    num_decodes: int = 0
    uniform_query_len: int = 0
    step_cache: dict[str, Any] = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Layout of the paged KV cache a model needs: one tensor per layer of
    shape ``(*leading_shape, num_blocks, *block_shape)``.

    Attributes:
        num_layers: layers that own a cache tensor.
        leading_shape: dims before the block dim: ``(2,)`` for separate K and
            V, ``()`` for MLA's single latent.
        block_shape: dims of one block, ``block_size`` first:
            ``(block_size, num_kv_heads, head_dim)`` for K/V (an FP8 V block
            holds the same bytes transposed, see the module docstring),
            ``(block_size, kv_lora_rank + qk_rope_head_dim)`` for MLA.
        dtype: element type (the model dtype, or FP8 with ``--kv-cache-dtype``).
    """

    num_layers: int
    leading_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    dtype: torch.dtype

    def layer_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's cache tensor holding ``num_blocks`` blocks."""
        return (*self.leading_shape, num_blocks, *self.block_shape)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across all layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * math.prod(self.leading_shape) * math.prod(self.block_shape) * elem


def standard_kv_cache_spec(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                           dtype: torch.dtype) -> KVCacheSpec:
    """The K/V layout of :class:`AttentionBackend`:
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` per layer."""
    return KVCacheSpec(num_layers, (2,), (block_size, num_kv_heads, head_dim), dtype)


def v_transposed(dtype: torch.dtype) -> bool:
    """Whether a KV cache of ``dtype`` stores its V blocks transposed (FP8
    caches; see the module docstring)."""
    return dtype in FP8_DTYPES


def v_token_major(kv_cache: torch.Tensor) -> torch.Tensor:
    """The V half of ``kv_cache`` (``[2, num_blocks, block_size, num_kv_heads,
    head_dim]``, contiguous) indexed ``[block, offset, head, dim]`` whatever
    its layout, as :func:`as_copyable` gives it (an FP8 cache's bytes): its
    ``[1]``, or for a transposed-V cache a permuted view of its ``[num_blocks,
    num_kv_heads, head_dim, block_size]`` memory. Writes through it land in
    the cache."""
    raw = as_copyable(kv_cache)
    if not v_transposed(kv_cache.dtype):
        return raw[1]
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    return raw[1].view(num_blocks, num_kv_heads, head_dim, block_size).permute(0, 3, 1, 2)


def standard_layout(kv_cache: torch.Tensor) -> torch.Tensor:
    """``kv_cache`` with V token-major whatever its dtype: the cache itself,
    or for a transposed-V cache a copy whose ``[1, block, offset]`` is that
    slot's V, as in K. Values and dtype unchanged (tests and tools that read
    the cache through plain indexing)."""
    if not v_transposed(kv_cache.dtype):
        return kv_cache
    out = kv_cache.clone()
    as_copyable(out)[1].copy_(v_token_major(kv_cache))
    return out


def as_copyable(cache: torch.Tensor) -> torch.Tensor:
    """``cache`` itself, or for an FP8 cache its bytes viewed as uint8 (same
    shape): PyTorch's CPU index_copy_/index_select have no FP8 kernels, and
    moving the bytes is the same copy."""
    return cache.view(torch.uint8) if cache.dtype in FP8_DTYPES else cache


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` converted to a KV cache's dtype; into FP8 as ``x / scale`` (in
    float32; ``scale`` a float32 one-element tensor, None: 1) with
    round-to-nearest-even after clamping to the format's largest finite value
    (an out-of-range value saturates rather than becoming inf/NaN). A 16-bit
    or float32 cache holds ``x`` itself (``scale`` ignored)."""
    if dtype in FP8_DTYPES:
        fmax = torch.finfo(dtype).max
        if scale is not None:
            x = x.float() / scale
        return x.clamp(-fmax, fmax).to(dtype)
    return x.to(dtype)


def from_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Cache contents ``x`` as values in ``dtype``: an FP8 ``x`` times ``scale``
    (in float32; None: 1), anything else converted as is."""
    if x.dtype in FP8_DTYPES and scale is not None:
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


class AttentionBackend(ABC):
    """Computes causal attention of new tokens over the paged KV cache.

    Args:
        num_heads: query heads.
        head_dim: size of one head.
        scale: softmax scale (usually ``head_dim ** -0.5``).
        num_kv_heads: key/value heads (GQA/MQA when fewer than num_heads).
    """

    name: str = ""
    # True: ``forward`` also takes ``rope=(positions [num_tokens] int64,
    # cos_sin_cache [max_position, head_dim] float32)`` and applies neox-style
    # RoPE to the query (in place) and the key itself, fused with the KV write.
    fuses_rope: bool = False

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        self.num_heads, self.head_dim, self.scale, self.num_kv_heads = num_heads, head_dim, scale, num_kv_heads

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Write the new K/V into ``kv_cache`` at ``metadata.slot_mapping``, then
        attend.

        Args:
            query: [num_tokens, num_heads, head_dim].
            key, value: [num_tokens, num_kv_heads, head_dim].
            kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim], in
                the model dtype or FP8 (K/V converted with :func:`to_cache_dtype`
                when written and back with :func:`from_cache_dtype` when read).
            kv_scales: the layer's ``(k_scale, v_scale)``, float32 one-element
                tensors on the device, used by an FP8 cache only; None: 1.
        Returns:
            [num_tokens, num_heads, head_dim], same dtype as ``query``.
        """


_BACKENDS: dict[str, str] = {
    # name -> "module:Class", imported lazily so the CPU path never imports GPU kernels.
    "torch": "ember.layers.attention.torch_backend:TorchAttentionBackend",
    "triton": "ember.layers.attention.triton_backend:TritonAttentionBackend",
}


def get_attention_backend(name: str) -> type[AttentionBackend]:
    """The backend class registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    return resolve_lazy(_BACKENDS, name, "attention backend")


def default_backend_name(device: str) -> str:
    """The backend chosen for a device: Triton kernels on CUDA, plain PyTorch elsewhere."""
    return "triton" if device == "cuda" else "torch"
