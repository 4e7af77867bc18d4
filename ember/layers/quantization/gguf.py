"""GGUF weights kept quantized: llama.cpp's ggml block formats run as stored.

A GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) stores
each 2-D weight ``[N, K]`` as N rows of ``K / block_elems`` blocks; a block is
``block_bytes`` bytes holding the quants of ``block_elems`` consecutive
input features and their scales (layouts: ggml's ``ggml-common.h``, the
``block_q*`` structs; the reference dequantizer is gguf-py's
``gguf.quants.dequantize``). The ``gguf`` method keeps those bytes on the
device, one row of blocks per output channel, and dequantizes them inside the
matmul:

- CUDA: :mod:`ember.kernels.triton_gguf` (at most 16 rows of x: one kernel
  streams the blocks once and decodes them in registers; more rows:
  the weight is dequantized to x's dtype by a Triton kernel, then ``F.linear``);
- CPU and other devices: :func:`dequantize_gguf` (plain PyTorch, bit-identical
  to ``gguf.quants.dequantize``), then ``F.linear``.

Which layers: every linear layer, the LM head and the token embedding whose
GGUF tensors all have a type in
:data:`~ember.layers.quantization.gguf_types.GGUF_KERNEL_TYPES` (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q4_K, Q5_K, Q6_K). The GGUF loader decides this once per file
(``gguf_weight_types`` on the model's HF config, see
:func:`ember.loader.gguf.gguf_hf_config`) and dequantizes every other tensor
at load as before (F32/F16/BF16, other ggml types), so those layers stay plain.
A merged layer (q/k/v, gate/up) whose projections have different types keeps
one block buffer per projection and runs one kernel per projection into its
slice of the output. The token embedding gathers the rows of its ids and
dequantizes only those; a tied LM head shares the embedding's blocks.

Choice: on CUDA devices a GGUF file runs with this method unless
``--quantization`` names another; on CPU the weights are dequantized at load
unless ``--quantization gguf`` is given (see
:func:`ember.engine.arg_utils.EngineArgs.create_engine_config`).

Tensor parallelism: column-parallel layers and the vocabulary split whole
rows; a row-parallel layer splits each row's blocks where its input features
per rank are a multiple of ``block_elems``, else (e.g. a Q4_K down projection
of 4864 inputs over 2 ranks: 9.5 blocks per rank) the layer runs dequantized
(:class:`GGUFDequantizeAtLoadMethod`, with a warning naming the layer, its
type's block size and the split), as a plain layer of the model dtype. At
load (:mod:`ember.loader.gguf_tensor`) each rank reads only its rows and, for
a row-parallel layer, only the blocks covering its input features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig
from ember.layers.quantization.gguf_types import GGML_TYPE_NAMES, GGUF_BLOCK_SIZES, GT, gguf_row_bytes
from ember.layers.quantization.gguf_types import type_name as _type_name
from ember.logger import init_logger

logger = init_logger(__name__)

# More rows of x than this: dequantize the weight, then one dense GEMM.
GGUF_GEMV_MAX_M = 16


# ---------------------------------------------------------------- dequantization (plain PyTorch)


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    """[nb, bytes] uint8 -> [nb, 1] float32 of the float16 at byte ``start``."""
    return b[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 -> [..., 2n]: the low nibbles, then the high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor, nbits: int) -> torch.Tensor:
    """[..., n] uint8 -> [..., n, nbits] uint8: bit i of each byte at index i."""
    shifts = torch.arange(nbits, dtype=torch.uint8, device=b.device)
    return (b.unsqueeze(-1) >> shifts) & 1


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 packed bytes -> the 8 six-bit scales and mins ([nb, 8] uint8)."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _dequant_blocks(b: torch.Tensor, qtype: int) -> torch.Tensor:
    """[nb, block_bytes] uint8 -> [nb, block_elems] float32, each operation as
    gguf-py's ``dequantize_blocks`` does it (same order, float32 rounding)."""
    nb = b.shape[0]
    if qtype == GT.Q8_0:
        return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _f16(b, 0)
    if qtype in (GT.Q4_0, GT.Q4_1):
        has_min = qtype == GT.Q4_1
        q = _nibbles(b[:, 4 if has_min else 2:])
        if not has_min:
            return _f16(b, 0) * (q.to(torch.int8) - 8).to(torch.float32)
        return _f16(b, 0) * q.to(torch.float32) + _f16(b, 2)
    if qtype in (GT.Q5_0, GT.Q5_1):
        has_min = qtype == GT.Q5_1
        qh_start = 4 if has_min else 2
        qh = _bits(b[:, qh_start:qh_start + 4], 8).reshape(nb, 32)
        q = _nibbles(b[:, qh_start + 4:]) | (qh << 4)
        if not has_min:
            return _f16(b, 0) * (q.to(torch.int8) - 16).to(torch.float32)
        return _f16(b, 0) * q.to(torch.float32) + _f16(b, 2)
    if qtype in (GT.Q4_K, GT.Q5_K):
        sc, mn = _scale_min_k4(b[:, 4:16])
        d = (_f16(b, 0) * sc.to(torch.float32)).reshape(nb, 8, 1)
        dm = (_f16(b, 2) * mn.to(torch.float32)).reshape(nb, 8, 1)
        qs_start = 16 if qtype == GT.Q4_K else 48
        q = _nibbles(b[:, qs_start:qs_start + 128].reshape(nb, 4, 32)).reshape(nb, 8, 32)
        if qtype == GT.Q5_K:  # bit s of qh[l] is the fifth bit of sub-block s's element l
            q = q | (_bits(b[:, 16:48], 8).transpose(1, 2) << 4)
        return (d * q.to(torch.float32) - dm).reshape(nb, 256)
    if qtype == GT.Q6_K:
        d = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)).reshape(nb, 16, 1)
        ql = _nibbles(b[:, 0:128].reshape(nb, 2, 64)).reshape(nb, 8, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
        qh = ((b[:, 128:192].reshape(nb, 2, 1, 32) >> shifts) & 3).reshape(nb, 8, 32)
        q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(nb, 16, 16)
        return (d * q.to(torch.float32)).reshape(nb, 256)
    raise ValueError(f"{_type_name(qtype)} has no GGUF dequantizer here; "
                     f"supported: {sorted(GGML_TYPE_NAMES.values())}")


def dequantize_gguf(data: torch.Tensor, qtype: int) -> torch.Tensor:
    """Dequantize GGUF rows in plain PyTorch (any device).

    Bit-identical to gguf-py's ``gguf.quants.dequantize`` (the same float32
    operations in the same order).

    Args:
        data: [..., row_bytes] uint8, rows of whole blocks.
        qtype: a ggml type of :data:`GGUF_KERNEL_TYPES`.
    Returns:
        [..., row_bytes / block_bytes * block_elems] float32.
    Raises:
        ValueError: an unsupported type, or a row that is not whole blocks.
    """
    if qtype not in GGUF_BLOCK_SIZES:
        _dequant_blocks(data, qtype)  # raises
    elems, nbytes = GGUF_BLOCK_SIZES[qtype]
    if data.dtype != torch.uint8 or data.shape[-1] % nbytes:
        raise ValueError(f"{_type_name(qtype)} rows must be uint8 multiples of {nbytes} bytes, "
                         f"got {data.dtype} {tuple(data.shape)}")
    lead = data.shape[:-1]
    blocks = data.reshape(-1, nbytes)
    return _dequant_blocks(blocks, qtype).reshape(*lead, data.shape[-1] // nbytes * elems)


# ---------------------------------------------------------------- the method


@dataclass(frozen=True, slots=True)
class GGUFShard:
    """One stacked projection of a layer, as stored.

    Attributes:
        qtype: its ggml type.
        rows: its output features on this rank.
        row_bytes: bytes of one row (this rank's input features).
        out_offset: its first output feature in the layer's output.
        byte_offset: its first byte in a mixed-type layer's flat buffer.
    """

    qtype: int
    rows: int
    row_bytes: int
    out_offset: int
    byte_offset: int


class GGUFLinearMethod(LinearMethodBase):
    """A layer's weight as GGUF blocks (see the module docstring).

    One type for all of the layer's projections: ``weight`` uint8
    [N, row_bytes] (loaded by the layer's own sharded loaders). Several types
    (a merged layer): ``weight`` is a flat uint8 buffer, each projection's
    rows in turn ([rows_i, row_bytes_i] each), loaded by its own
    ``weight_loader``. ``layer.gguf_shards`` describes them (:class:`GGUFShard`).

    Args:
        qtypes: the ggml type of each stacked projection, in order.
        out_float32: write float32 (the LM head's logits).
    """

    def __init__(self, qtypes: list[int], out_float32: bool = False) -> None:
        self.qtypes = list(qtypes)
        self.out_float32 = out_float32
        self.uniform = len(set(self.qtypes)) == 1

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        if len(self.qtypes) != len(output_partition_sizes):
            raise ValueError(f"{getattr(layer, 'prefix', '')}: {len(self.qtypes)} GGUF tensor types for "
                             f"{len(output_partition_sizes)} stacked projections")
        shards, out_offset, byte_offset = [], 0, 0
        for qtype, rows in zip(self.qtypes, output_partition_sizes):
            try:
                row_bytes = gguf_row_bytes(qtype, input_size_per_partition)
            except ValueError as e:
                raise ValueError(f"{getattr(layer, 'prefix', '')}: {e} (input features per rank)") from None
            shards.append(GGUFShard(qtype, rows, row_bytes, out_offset, byte_offset))
            out_offset += rows
            byte_offset += rows * row_bytes
        layer.gguf_shards = shards
        self.out_features = out_offset
        if self.uniform:
            weight = torch.zeros(out_offset, shards[0].row_bytes, dtype=torch.uint8)
            layer.weight = nn.Parameter(weight, requires_grad=False)
            return
        weight = nn.Parameter(torch.zeros(byte_offset, dtype=torch.uint8), requires_grad=False)
        weight.weight_loader = lambda param, loaded, shard_id=None: self._load_shard(layer, param, loaded, shard_id)
        layer.weight = weight

    @staticmethod
    def _load_shard(layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor,
                    shard_id: str | int | None) -> None:
        """Copy one projection's checkpoint rows [rows_total, row_bytes] (this
        rank's slice of them) into its part of the flat buffer.

        Raises:
            ValueError: no shard id, or a shape that does not match.
        """
        if shard_id is None:
            raise ValueError(f"{layer.prefix}: GGUF projections of different types load one at a time")
        out_offset, rows, src_start = layer._shard(shard_id)
        shard = next(s for s in layer.gguf_shards if s.out_offset == out_offset)
        if loaded.dtype != torch.uint8 or tuple(loaded.shape[1:]) != (shard.row_bytes,):
            raise ValueError(f"{layer.prefix}: GGUF shard {shard_id!r} is {loaded.dtype} {tuple(loaded.shape)}, "
                             f"expected uint8 rows of {shard.row_bytes} bytes")
        dst = param.data.narrow(0, shard.byte_offset, rows * shard.row_bytes).view(rows, shard.row_bytes)
        dst.copy_(loaded.narrow(0, src_start, rows))

    def _segments(self, layer: nn.Module) -> list[tuple[int, torch.Tensor, int]]:
        """``(qtype, blocks [rows, row_bytes], out_offset)`` per kernel call."""
        if self.uniform:
            return [(self.qtypes[0], layer.weight, 0)]
        return [(s.qtype, layer.weight.narrow(0, s.byte_offset, s.rows * s.row_bytes).view(s.rows, s.row_bytes),
                 s.out_offset) for s in layer.gguf_shards]

    def dequantized_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The layer's weight [N, K] dequantized to ``dtype`` (Triton on CUDA,
        :func:`dequantize_gguf` elsewhere)."""
        parts = [_dequantize(w, qtype, dtype) for qtype, w, _ in self._segments(layer)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [num_tokens, K] -> ``x @ W.T + bias`` [num_tokens, N] in x's
        dtype (float32 for an LM head)."""
        out_dtype = torch.float32 if self.out_float32 else x.dtype
        if x.is_cuda and x.dim() == 2 and x.shape[0] <= GGUF_GEMV_MAX_M and x.stride(1) == 1:
            return self.apply_gemv(layer, x, bias, out_dtype)
        y = F.linear(x, self.dequantized_weight(layer, x.dtype), bias)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def apply_gemv(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
        """The Triton GEMV path of :meth:`apply` (one kernel per projection
        type, each writing its slice of the output): [num_tokens, N] ``out_dtype``."""
        from ember.kernels.triton_gguf import gguf_gemv

        out = torch.empty(x.shape[0], self.out_features, dtype=out_dtype, device=x.device)
        for qtype, w, offset in self._segments(layer):
            rows = w.shape[0]
            gguf_gemv(x, w, qtype, out=out.narrow(1, offset, rows),
                      bias=None if bias is None else bias.narrow(0, offset, rows))
        return out

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` [num_tokens] int64 of the table, dequantized ->
        [num_tokens, K] in the layer's ``params_dtype``."""
        (qtype, w, _), = self._segments(layer)
        if w.is_cuda:
            from ember.kernels.triton_gguf import gguf_dequantize

            return gguf_dequantize(w, qtype, layer.params_dtype, rows=ids)
        return dequantize_gguf(w[ids], qtype).to(layer.params_dtype)

    def tie_weights(self, head: nn.Module, embedding: nn.Module) -> None:
        """Share ``embedding``'s blocks with the LM head ``head``.

        Raises:
            ValueError: the embedding is not stored in the same GGUF type.
        """
        method = getattr(embedding, "quant_method", None)
        if not isinstance(method, GGUFLinearMethod) or method.qtypes != self.qtypes:
            raise ValueError(f"{head.prefix}: a GGUF LM head ties only to an embedding of the same GGUF type")
        head.weight = embedding.weight


class GGUFDequantizeAtLoadMethod(LinearMethodBase):
    """A layer whose GGUF blocks this rank cannot hold whole (a row-parallel
    shard of K that is not a multiple of the block size): the checkpoint's
    blocks are dequantized at load and the layer runs as a plain one.

    Args:
        qtypes: the ggml type of each stacked projection, in order.
    """

    def __init__(self, qtypes: list[int]) -> None:
        from ember.layers.linear import UnquantizedLinearMethod

        self.qtypes = list(qtypes)
        self.plain = UnquantizedLinearMethod()

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        self.plain.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                  output_size, params_dtype)
        layer.weight.weight_loader = lambda param, loaded, *shard: self._load(layer, param, loaded, *shard)

    def _load(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, *shard: str | int | None) -> None:
        """Load the checkpoint blocks [N, row_bytes] as the layer loads a
        dense tensor (its own sharding): a lazy view of them
        (:class:`~ember.loader.gguf_tensor.LazyGGUFTensor`) is dequantized
        where the layer narrows it (only the blocks covering this rank's
        input features), a tensor of blocks is dequantized whole first."""
        from ember.loader.gguf_tensor import LazyGGUFTensor

        if isinstance(loaded, LazyGGUFTensor) and loaded.blocks:
            loaded = loaded.dequantized(param.dtype)
        elif loaded.dtype == torch.uint8:
            index = 0
            if shard and shard[0] is not None and len(self.qtypes) > 1:
                out_offset = layer._shard(shard[0])[0]
                index = [sum(layer.output_partition_sizes[:i]) for i in range(len(self.qtypes))].index(out_offset)
            loaded = dequantize_gguf(loaded, self.qtypes[index]).to(param.dtype)
        layer.weight_loader(param, loaded, *shard)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.plain.apply(layer, x, bias)


def _dequantize(w: torch.Tensor, qtype: int, dtype: torch.dtype) -> torch.Tensor:
    if w.is_cuda:
        from ember.kernels.triton_gguf import gguf_dequantize

        return gguf_dequantize(w, qtype, dtype)
    return dequantize_gguf(w, qtype).to(dtype)


# Merged layers (their checkpoint name's last part) -> the GGUF/HF projections
# stacked in them, in order (llama/qwen2 stacked_params_mapping).
_STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class GGUFConfig(QuantizationConfig):
    """``gguf``: a GGUF file's quantized weights run as stored.

    Args:
        weight_types: HF weight name (``model.layers.0.mlp.down_proj.weight``)
            -> ggml type, for the weights the loader keeps quantized.
        tie_word_embeddings: the LM head is the embedding.
    """

    raw_checkpoint = True

    def __init__(self, weight_types: dict[str, int], tie_word_embeddings: bool = False) -> None:
        self.weight_types = dict(weight_types)
        self.tie_word_embeddings = tie_word_embeddings
        self._warned: set[tuple[tuple[int, ...], int]] = set()

    @classmethod
    def get_name(cls) -> str:
        return "gguf"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GGUFConfig:
        """Raises:
            ValueError: always: the method reads the tensor types of a GGUF
                file (:meth:`from_hf_config`), not a ``quantization_config``.
        """
        raise ValueError("gguf quantization runs GGUF files only (it reads their tensor types)")

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> GGUFConfig:
        """From the HF config the GGUF loader built (its ``gguf_weight_types``).

        Raises:
            ValueError: the model is not a GGUF file.
        """
        types = getattr(hf_config, "gguf_weight_types", None)
        if types is None:
            raise ValueError("gguf quantization runs GGUF files only; this model is not one")
        return cls(types, bool(getattr(hf_config, "tie_word_embeddings", False)))

    def _types_of(self, prefix: str) -> list[int] | None:
        if prefix == "lm_head" and self.tie_word_embeddings:
            prefix = "model.embed_tokens"
        parent, _, last = prefix.rpartition(".")
        names = [f"{parent}.{p}" for p in _STACKED[last]] if last in _STACKED else [prefix]
        types = [self.weight_types.get(f"{n}.weight") for n in names]
        return None if None in types else types

    def _warn_dequantized(self, layer: nn.Module, prefix: str, types: list[int]) -> None:
        """Warn once per split (type, input features per rank) that such layers run dequantized."""
        split = (tuple(types), layer.input_size_per_partition)
        if split in self._warned:
            return
        self._warned.add(split)
        elems = max(GGUF_BLOCK_SIZES[t][0] for t in types)
        names = "/".join(dict.fromkeys(_type_name(t) for t in types))
        logger.warning(f"{prefix} (and the other layers split alike): {names} blocks hold {elems} input "
                       f"features, and its {layer.input_size} over {layer.tp_size} tensor-parallel ranks are "
                       f"{layer.input_size_per_partition} per rank, not whole blocks: it runs dequantized to "
                       f"{layer.params_dtype} (each rank dequantizes the blocks covering its features at load)")

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        from ember.layers.linear import LinearBase
        from ember.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

        if not isinstance(layer, (LinearBase, VocabParallelEmbedding)):
            return None
        types = self._types_of(prefix)
        if types is None:
            return None
        if isinstance(layer, LinearBase) and any(layer.input_size_per_partition % GGUF_BLOCK_SIZES[t][0]
                                                 for t in types):
            self._warn_dequantized(layer, prefix, types)
            return GGUFDequantizeAtLoadMethod(types)
        return GGUFLinearMethod(types, out_float32=isinstance(layer, ParallelLMHead))
