"""GGUF checkpoints: HF config, dequantized HF-named weights, tokenizer.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. Files are
read with gguf-py's ``gguf.GGUFReader`` (header parse; tensor data stays
memory-mapped). Opening a reader is slow, since it builds numpy views for every
element of the tokenizer's string arrays (~3 s for SmolLM2, ~10 s for Qwen2.5),
so each entry point opens a file once. Dequantization is
``gguf.quants.dequantize`` (the numpy reference of llama.cpp's ggml quant
formats), except for the weights the ``gguf`` quantization method runs as
stored (``keep_quantized``, see :mod:`ember.layers.quantization.gguf`); the
tokenizer is converted by HF transformers' GGUF integration and cached on disk.

Model loading takes 2-D tensors as lazy views (``lazy``, see
:mod:`ember.loader.gguf_tensor`): the layers' weight loaders narrow them to
their rank's slice and only the bytes under it are read and dequantized.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from gguf import GGUFReader, ReaderField, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast, Qwen2Config

from ember.loader.base import FormatLoader, ModelLoadError, UnsupportedArchitectureError, check_gguf_file, ember_cache_dir
from ember.loader.gguf_tensor import LazyGGUFTensor, ReadCounter, StoredTensor, unpermute_rotary

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- reading


class _Metadata(Mapping[str, Any]):
    """GGUF metadata key -> Python value (int, float, bool, str or a list of those),
    converted on access by ``ReaderField.contents()``; the reader's own
    ``GGUF.*`` pseudo-fields (version, counts) are left out."""

    def __init__(self, path: str, fields: Mapping[str, ReaderField]) -> None:
        self._path = path
        self._fields = {k: f for k, f in fields.items() if not k.startswith("GGUF.")}

    def __getitem__(self, key: str) -> Any:
        try:
            return self._fields[key].contents()
        except UnicodeDecodeError as e:
            raise ModelLoadError(f"{self._path}: GGUF metadata {key!r} is not valid UTF-8: {e}") from e

    def __contains__(self, key: object) -> bool:  # without converting the value
        return key in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def n_items(self, key: str) -> int:
        """Length of an array value, without converting its items."""
        return len(self._fields[key].data)


@dataclass(frozen=True)
class GGUFFile:
    """An open GGUF file.

    Attributes:
        path: the file.
        reader: the ``gguf.GGUFReader`` over it (tensor data memory-mapped).
        metadata: key -> value, converted on access.
        tensors: GGUF tensor name -> ``gguf.ReaderTensor``, in file order.
    """

    path: str
    reader: GGUFReader
    metadata: _Metadata
    tensors: dict[str, ReaderTensor]


def read_gguf(path: str) -> GGUFFile:
    """Open a GGUF file with ``gguf.GGUFReader``; tensor data stays mapped.

    The last opened files are kept (keyed by path, size and mtime): start-up
    reads the config, the weights and the tokenizer from one file, and each
    ``GGUFReader`` costs seconds on large tokenizer vocabularies.

    Raises:
        ModelLoadError: not GGUF, an unsupported version, a big-endian file, or
            a truncated/corrupt header or data section (the message names the file).
    """
    st = os.stat(path) if os.path.exists(path) else None
    key = (os.path.abspath(path), st.st_size if st else -1, st.st_mtime_ns if st else -1)
    return _read_gguf_cached(*key)


@functools.lru_cache(maxsize=2)
def _read_gguf_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    try:
        check_gguf_file(Path(path))
        reader = GGUFReader(path)
    except ModelLoadError:
        raise
    # The reader fails on short reads with IndexError/ValueError (reshape), on bad
    # enums with ValueError, on duplicate keys with KeyError.
    except (OSError, ValueError, KeyError, IndexError, OverflowError) as e:
        raise ModelLoadError(f"{path} is truncated or corrupt (gguf cannot read it): {e}") from e
    if reader.byte_order != "I":
        raise ModelLoadError(f"{path}: big-endian GGUF files are not supported")
    return GGUFFile(path=str(path), reader=reader, metadata=_Metadata(str(path), reader.fields),
                    tensors={t.name: t for t in reader.tensors})


def _hf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """Row-major (numpy / HF) shape: GGUF's ``ne`` dims reversed, so a linear
    weight is ``[out_features, in_features]``."""
    return tuple(reversed(tensor.shape.tolist()))


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class _GGUFArch:
    """How one GGUF ``general.architecture`` maps onto HF transformers.

    Attributes:
        config_class: the HF config class to build.
        hf_architecture: HF model class name for ``config.architectures``.
        rotary_permuted: llama.cpp's converter permuted the attn_q/attn_k rows
            (its ``LlamaModel.permute``) for this architecture; undone on load.
    """

    config_class: type[PretrainedConfig]
    hf_architecture: str
    rotary_permuted: bool


_ARCHS = {
    "llama": _GGUFArch(LlamaConfig, "LlamaForCausalLM", rotary_permuted=True),
    # Qwen2 uses NEOX-style rope in llama.cpp, so its q/k are stored unpermuted.
    "qwen2": _GGUFArch(Qwen2Config, "Qwen2ForCausalLM", rotary_permuted=False),
}


def gguf_hf_config(path: str) -> PretrainedConfig:
    """Build the HF config (``LlamaConfig`` / ``Qwen2Config``) from GGUF metadata.

    Field sources: ``{arch}.embedding_length``, ``.feed_forward_length``,
    ``.block_count``, ``.attention.head_count(_kv)``, ``.attention.key_length``
    or ``.rope.dimension_count`` (head_dim), ``.attention.layer_norm_rms_epsilon``,
    ``.rope.freq_base``, ``.context_length``, ``.vocab_size`` (else the number of
    ``tokenizer.ggml.tokens``), ``tokenizer.ggml.{bos,eos,padding}_token_id``;
    ``tie_word_embeddings`` is True iff there is no ``output.weight`` tensor.
    ``gguf_weight_types`` (an extra attribute): HF weight name -> ggml type
    (int) of the weights the ``gguf`` quantization method keeps quantized
    (see :func:`gguf_weight_types`).

    Raises:
        ModelLoadError: unreadable file or a required key missing.
        UnsupportedArchitectureError: ``general.architecture`` is not llama/qwen2.
    """
    return _build_config(read_gguf(path))


def _arch_of(gf: GGUFFile) -> tuple[str, _GGUFArch]:
    arch = gf.metadata.get("general.architecture")
    if arch is None:
        raise ModelLoadError(f"{gf.path}: GGUF metadata has no general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedArchitectureError(f"{gf.path}: GGUF architecture {arch!r} is not supported; "
                                           f"supported GGUF architectures: {sorted(_ARCHS)}")
    return arch, _ARCHS[arch]


def _required(gf: GGUFFile, key: str) -> Any:
    if key not in gf.metadata:
        raise ModelLoadError(f"{gf.path}: GGUF metadata lacks required key {key!r}")
    return gf.metadata[key]


def _build_config(gf: GGUFFile) -> PretrainedConfig:
    arch, spec = _arch_of(gf)
    meta = gf.metadata
    hidden = _required(gf, f"{arch}.embedding_length")
    heads = _required(gf, f"{arch}.attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    if any(k.startswith(f"{arch}.rope.scaling.") for k in meta):
        # NOTE: rope scaling (linear/yarn/llama3 factors) is not mapped yet; the
        # model runs with plain rope, which is only right within the original context.
        logger.warning("%s: GGUF rope scaling metadata is ignored", gf.path)
    kwargs: dict[str, Any] = dict(
        vocab_size=meta.get(f"{arch}.vocab_size") or _vocab_size(gf),
        hidden_size=hidden,
        intermediate_size=_required(gf, f"{arch}.feed_forward_length"),
        num_hidden_layers=_required(gf, f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim or hidden // heads,
        rms_norm_eps=meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0),
        max_position_embeddings=_required(gf, f"{arch}.context_length"),
        tie_word_embeddings="output.weight" not in gf.tensors,
        architectures=[spec.hf_architecture],
    )
    if spec.config_class is LlamaConfig:
        # LlamaConfig.attention_bias puts a bias on q/k/v *and* o. Qwen2's q/k/v
        # bias is implied by the architecture (its config has no such field).
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in gf.tensors
    for field, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            kwargs[field] = meta[f"tokenizer.ggml.{key}"]
    config = spec.config_class(**kwargs)
    config.gguf_weight_types = gguf_weight_types(gf)
    return config


def _vocab_size(gf: GGUFFile) -> int:
    if "tokenizer.ggml.tokens" in gf.metadata:
        return gf.metadata.n_items("tokenizer.ggml.tokens")
    if "token_embd.weight" in gf.tensors:
        return _hf_shape(gf.tensors["token_embd.weight"])[0]
    raise ModelLoadError(f"{gf.path}: cannot tell the vocabulary size (no vocab_size, tokens or token_embd)")


# ---------------------------------------------------------------- weights

# GGUF tensor names: gguf.md "Standardized tensor names" / gguf-py tensor_mapping.py.
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# rope_freqs: llama3 rope-scaling factors; attn_rot_embd: inv_freq from old
# converters. Both are recomputed by the model from the config.
_SKIPPED_TENSORS = {"rope_freqs"}
_SKIPPED_BLOCK_TENSORS = {"attn_rot_embd"}


@dataclass(frozen=True, slots=True)
class _PlannedTensor:
    hf_name: str
    tensor: ReaderTensor
    shape: tuple[int, ...]  # HF shape
    rotary_heads: int | None  # undo llama.cpp's q/k row permutation with this many heads


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF parameter name of a GGUF tensor, or None for tensors Ember does not load.

    ``"blk.3.ffn_down.weight"`` -> ``"model.layers.3.mlp.down_proj.weight"``.

    Raises:
        ModelLoadError: a name outside the llama/qwen2 tensor set.
    """
    parts = gguf_name.split(".")
    suffix = parts[-1]
    if suffix in ("weight", "bias"):
        if len(parts) == 2:
            if parts[0] in _SKIPPED_TENSORS:
                return None
            if parts[0] in _GLOBAL_TENSORS:
                return f"{_GLOBAL_TENSORS[parts[0]]}.{suffix}"
        if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
            if parts[2] in _SKIPPED_BLOCK_TENSORS:
                return None
            if parts[2] in _BLOCK_TENSORS:
                return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{suffix}"
    raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}")


def _weight_plan(gf: GGUFFile, config: PretrainedConfig) -> list[_PlannedTensor]:
    """Map every tensor before dequantizing any, so a bad name fails fast."""
    _, spec = _arch_of(gf)
    plan = []
    for tensor in gf.tensors.values():
        try:
            hf_name = hf_tensor_name(tensor.name)
        except ModelLoadError as e:
            raise ModelLoadError(f"{gf.path}: {e}") from None
        if hf_name is None:
            continue
        heads = None
        if spec.rotary_permuted and ".attn_q." in tensor.name:
            heads = config.num_attention_heads
        elif spec.rotary_permuted and ".attn_k." in tensor.name:
            heads = config.num_key_value_heads
        plan.append(_PlannedTensor(hf_name, tensor, _hf_shape(tensor), heads))
    return plan


# Projections stacked into one Ember layer: kept quantized only all together.
_STACKED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def gguf_weight_types(gf: GGUFFile) -> dict[str, int]:
    """HF weight name -> ggml type of each 2-D weight that the ``gguf``
    quantization method runs as stored: its type is one of
    :data:`ember.layers.quantization.gguf_types.GGUF_KERNEL_TYPES`, and so are the
    types of the projections stacked with it (q/k/v, gate/up). With
    ``keep_quantized``, :func:`iter_gguf_weights` yields exactly these as
    stored blocks and dequantizes the others."""
    from ember.layers.quantization.gguf_types import GGUF_KERNEL_TYPES

    kept: dict[str, int] = {}
    for tensor in gf.tensors.values():
        try:
            hf_name = hf_tensor_name(tensor.name)
        except ModelLoadError:
            continue  # reported by the weight plan
        if (hf_name is not None and hf_name.endswith(".weight") and len(tensor.shape) == 2
                and int(tensor.tensor_type) in GGUF_KERNEL_TYPES):
            kept[hf_name] = int(tensor.tensor_type)
    for name in list(kept):
        parts = name.split(".")
        for group in _STACKED_GROUPS:
            if len(parts) >= 2 and parts[-2] in group:
                siblings = [".".join(parts[:-2] + [p, parts[-1]]) for p in group]
                if not all(s in kept for s in siblings):
                    kept.pop(name)
    return kept


def _stored(gf: GGUFFile, planned: _PlannedTensor, counter: ReadCounter | None = None) -> StoredTensor:
    """A 2-D tensor's bytes as ``[N, row_bytes]`` uint8 (a view of the map)."""
    t = planned.tensor
    data = t.data.reshape(planned.shape[0], -1).view(np.uint8)
    return StoredTensor(gf.path, t.name, t.tensor_type, data, planned.shape, planned.rotary_heads, counter)


def _load_tensor(gf: GGUFFile, planned: _PlannedTensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor, whole, dequantized to float32 then cast to ``dtype`` (q/k un-permuted)."""
    if len(planned.shape) == 2:
        return LazyGGUFTensor(_stored(gf, planned), blocks=False, dtype=dtype).materialize()
    t = planned.tensor
    try:
        # t.data: F32/F16 as such in HF shape; other types as uint8 blocks [*shape[:-1], row_bytes]
        array = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ModelLoadError(f"{gf.path}: tensor {t.name!r} uses ggml type {t.tensor_type.name}, "
                             f"which gguf-py cannot dequantize") from None
    array = array.reshape(planned.shape)
    if not array.flags.writeable:  # F32 is a view of the read-only map
        array = array.copy()
    tensor = torch.from_numpy(array)
    if planned.rotary_heads is not None:
        tensor = unpermute_rotary(tensor, planned.rotary_heads)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def iter_gguf_weights(path: str, dtype: torch.dtype, keep_quantized: bool = False, lazy: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | LazyGGUFTensor]]:
    """Yield ``(hf_name, tensor)`` for each GGUF tensor, in file order.

    Tensors are dequantized to float32 with ``gguf.quants.dequantize`` (F32, F16,
    BF16, Q4_0/1, Q5_0/1, Q8_0, Q2_K..Q6_K, IQ*), reshaped to the HF shape, q/k
    un-permuted for llama, then cast to ``dtype`` on CPU. Peak extra memory is
    about one float32 tensor. Tied checkpoints yield no ``lm_head.weight``.

    With ``keep_quantized`` (the ``gguf`` quantization method), the weights
    :func:`gguf_weight_types` lists come as stored instead: [N, row_bytes]
    uint8 blocks (q/k rows un-permuted for llama); the others are dequantized.

    With ``lazy`` (model loading), each 2-D tensor comes as a
    :class:`~ember.loader.gguf_tensor.LazyGGUFTensor` of the same shape and
    dtype, read and dequantized only where a weight loader narrows and copies
    it: a tensor-parallel rank reads and dequantizes only its slices, and
    tensors that are skipped are never read. 1-D tensors (norms, biases) come
    whole. At the end the bytes read are logged against the file's tensor data.

    Raises:
        ModelLoadError: unreadable file, unknown tensor name, or a ggml type
            gguf-py cannot dequantize.
        UnsupportedArchitectureError: not llama/qwen2.
    """
    gf = read_gguf(path)
    plan = _weight_plan(gf, _build_config(gf))
    kept = gguf_weight_types(gf) if keep_quantized else {}
    counter = ReadCounter() if lazy else None
    for planned in tqdm(plan, desc=f"Loading {Path(path).name}", unit="tensor"):
        blocks = planned.hf_name in kept
        if len(planned.shape) == 2 and (lazy or blocks):
            view = LazyGGUFTensor(_stored(gf, planned, counter), blocks=blocks, dtype=dtype)
            yield planned.hf_name, view if lazy else view.materialize()
        else:
            if counter is not None:
                counter.bytes_read += int(planned.tensor.n_bytes)
            yield planned.hf_name, _load_tensor(gf, planned, dtype)
    if counter is not None:
        total = sum(int(p.tensor.n_bytes) for p in plan)
        logger.info("%s: read %.1f of %.1f MiB of tensor data (%.0f%%: this process's slices)", Path(path).name,
                    counter.bytes_read / 2**20, total / 2**20, 100 * counter.bytes_read / max(total, 1))


# ---------------------------------------------------------------- tokenizer


def gguf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """The tokenizer stored in GGUF metadata (``tokenizer.ggml.*``), with its chat template.

    HF transformers converts it and the chat template is read with one more
    ``GGUFReader`` (transformers opens its own): ~7 s for SmolLM2, ~22 s for
    Qwen2.5. The result is saved under ``$EMBER_CACHE_DIR/tokenizers/<key>``
    and later calls load it from there (<1.5 s). The key hashes the file's absolute path, size,
    mtime and the transformers version.

    Raises:
        ModelLoadError: transformers cannot convert the GGUF tokenizer.
    """
    cache = ember_cache_dir() / "tokenizers" / _tokenizer_cache_key(path)
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cache))
    tokenizer = _convert_gguf_tokenizer(path)
    _save_tokenizer(tokenizer, cache)
    return tokenizer


def _tokenizer_cache_key(path: str) -> str:
    st = os.stat(path)
    ident = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _convert_gguf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    p = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:  # transformers raises many types here; keep the cause chained
        raise ModelLoadError(f"{path}: cannot build the tokenizer from GGUF metadata: {e}") from e
    meta = read_gguf(path).metadata
    if not tokenizer.chat_template and meta.get("tokenizer.chat_template"):
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        if getattr(tokenizer, attr) is None and f"tokenizer.ggml.{key}" in meta:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(meta[f"tokenizer.ggml.{key}"]))
    return tokenizer


def _save_tokenizer(tokenizer: PreTrainedTokenizerFast, cache: Path) -> None:
    """Write to a temp dir then rename, so a crash never leaves a half-written cache."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}.")
    except OSError as e:
        logger.warning("could not cache the converted tokenizer in %s: %s", cache, e)
        return
    try:
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)
    except OSError as e:  # e.g. another process filled the cache first, or a full disk
        if not (cache / "tokenizer.json").is_file():
            logger.warning("could not cache the converted tokenizer in %s: %s", cache, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


LOADER = FormatLoader(read_config=gguf_hf_config, iter_weights=iter_gguf_weights, load_tokenizer=gguf_tokenizer)
