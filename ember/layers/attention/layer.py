"""The Attention layer models use, and the per-forward context it reads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ember.config import FP8_DTYPES
from ember.layers.attention.backend import AttentionBackend, AttentionMetadata
from ember.layers.attention.kv_scales import calibrate_kv_scales


@dataclass(slots=True)
class ForwardContext:
    """What one forward pass needs besides the token ids and positions; built
    by the model runner for each step and passed down explicitly.

    Attributes:
        attn_metadata: the step's attention metadata.
        kv_caches: one cache tensor per layer (see ``AttentionBackend``).
        piecewise: set only while piecewise CUDA graphs are captured: each
            :class:`Attention` hands its inputs to it (``piecewise.split``) instead
            of attending (see :mod:`ember.worker.cuda_graph`).
        positions: [num_tokens] int64, each new token's position (set by the
            model's forward; read by attention layers that apply RoPE).
        stream_sumsq: ``(stream, sumsq)``: the residual stream the last
            fused decoder layer returned and its rows' partial sums of squares,
            which the GEMM that wrote it returned, for the next layer's fused
            qkv projection (decode rows on CUDA; set and read only by the
            decode fusions, see :mod:`ember.layers.fusion`), or None.
        calibrate_kv_scales: each attention layer over an FP8 cache sets its
            ``k_scale`` / ``v_scale`` from this step's keys and values before
            writing them (``--calculate-kv-scales``: the first prefill step,
            run eagerly).
        dp_attention: with data-parallel attention, which rows of the step
            this rank attends (a :class:`~ember.distributed.dp_attention.DPAttentionLayout`;
            ``attn_metadata`` then describes only those rows, None when there
            are none); None otherwise.
        aux_hidden: where the decoder stack also writes the residual stream
            entering chosen layers (an
            :class:`~ember.models.utils.AuxHiddenStates`, for a speculative
            proposer conditioned on the target's hidden states), or None.
    """

    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]
    piecewise: Any = None
    positions: torch.Tensor | None = None
    stream_sumsq: tuple[torch.Tensor, torch.Tensor] | None = None
    calibrate_kv_scales: bool = False
    dp_attention: Any = None
    aux_hidden: Any = None


class QKVAttention(nn.Module, ABC):
    """Base of a dense self-attention module in three steps: a fused
    ``qkv_proj``, :meth:`attend` (split, per-head norms, RoPE, attention over
    the cache) and ``o_proj``. Subclasses set ``qkv_proj`` and ``o_proj``
    (linear layers) and implement :meth:`attend`; the decode fusions
    (:mod:`ember.layers.fusion`) rely on nothing else."""

    qkv_proj: nn.Module
    o_proj: nn.Module

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``hidden_states``: [num_tokens, hidden] (normalized) -> [num_tokens, hidden].
        ``positions`` are read from ``ctx.positions`` by the attention layer's RoPE."""
        return self.o_proj(self.attend(self.qkv_proj(hidden_states), ctx))

    @abstractmethod
    def attend(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``qkv``: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim] ->
        attention output [num_tokens, num_heads * head_dim] (before o_proj)."""


class Attention(nn.Module):
    """Causal self-attention over the paged KV cache, through the backend
    chosen at start-up.

    Args:
        num_heads, head_dim, num_kv_heads: head layout of this rank.
        scale: softmax scale.
        layer_idx: which KV cache in ``ForwardContext.kv_caches`` is this layer's.
        backend_cls: the attention backend class.
        rotary_emb: RoPE to apply to q and k first (at ``ctx.positions``), or
            None. A backend with ``fuses_rope`` applies a neox-style RoPE over
            whole heads on CUDA in its KV-write kernel (one kernel per layer
            less); otherwise the rotary module runs first.

    Buffers ``k_scale`` / ``v_scale`` (float32 scalars, 1.0 until a checkpoint
    or calibration sets them, see :mod:`ember.layers.attention.kv_scales`):
    the dequantization scales of this layer's K and V in an FP8 cache, read by
    the kernels on the device.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int, layer_idx: int,
                 backend_cls: type[AttentionBackend], rotary_emb: nn.Module | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.layer_idx = num_heads, head_dim, num_kv_heads, layer_idx
        self.impl = backend_cls(num_heads, head_dim, scale, num_kv_heads)
        self.rotary_emb = rotary_emb
        self._fused_rope = (rotary_emb is not None and backend_cls.fuses_rope and rotary_emb.is_neox_style
                            and rotary_emb.rotary_dim == head_dim)
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``q``: [n, num_heads * head_dim]; ``k``, ``v``: [n, num_kv_heads * head_dim]
        (before RoPE, when the layer has ``rotary_emb``). Returns [n, num_heads * head_dim]."""
        if ctx.piecewise is not None:
            return ctx.piecewise.split(self, q, k, v)
        return self.attend(q, k, v, ctx)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Apply RoPE, write ``k``/``v`` to the cache and attend (as
        :meth:`forward`, never split). ``q`` may be rotated in place."""
        n = q.shape[0]
        kv_cache = ctx.kv_caches[self.layer_idx]
        # NOTE: calibration sees the keys after RoPE, so the rotation is not fused then.
        calibrate = ctx.calibrate_kv_scales and kv_cache.dtype in FP8_DTYPES
        rope = None
        if self.rotary_emb is not None:
            if self._fused_rope and q.is_cuda and not calibrate:
                rope = (ctx.positions, self.rotary_emb.cos_sin_cache)
            else:
                q, k = self.rotary_emb(ctx.positions, q, k)
        if calibrate:
            calibrate_kv_scales(self, k, v, torch.finfo(kv_cache.dtype).max)
        args = (q.view(n, self.num_heads, self.head_dim), k.view(n, self.num_kv_heads, self.head_dim),
                v.view(n, self.num_kv_heads, self.head_dim), kv_cache, ctx.attn_metadata, (self.k_scale, self.v_scale))
        out = self.impl.forward(*args) if rope is None else self.impl.forward(*args, rope=rope)
        return out.reshape(n, self.num_heads * self.head_dim)
