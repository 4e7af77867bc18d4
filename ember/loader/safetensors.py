"""Hugging Face checkpoint directories: ``config.json`` + ``*.safetensors``.

Layout: https://huggingface.co/docs/transformers/main_classes/model (sharded
checkpoints list ``tensor name -> shard file`` in ``model.safetensors.index.json``);
file format: https://huggingface.co/docs/safetensors.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

from ember.config import FP8_DTYPES
from ember.loader.base import FormatLoader, ModelLoadError
from ember.loader.weight_utils import DEFAULT_FP8_BLOCK, SCALE_INV_SUFFIX, dequant_fp8_block, fp8_block_size

INDEX_FILE = "model.safetensors.index.json"


def hf_dir_config(path: str) -> PretrainedConfig:
    """``config.json`` of an HF directory, via ``AutoConfig`` (local files only).

    Raises:
        ModelLoadError: config.json is missing, not JSON, or names an unknown model_type.
    """
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot read config.json: {e}") from e


def safetensors_files(path: str) -> list[Path]:
    """The weight files of an HF directory, in load order.

    With ``model.safetensors.index.json``: the shards it names, in order of first
    appearance; otherwise every ``*.safetensors`` file, sorted by name.

    Raises:
        ModelLoadError: an unreadable index, a shard it names is missing, or no
            safetensors file at all.
    """
    root = Path(path)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: unreadable safetensors index: {e}") from e
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{root}: shards named in {INDEX_FILE} are missing: {missing}")
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{root} has no *.safetensors weight files")
    return files


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (OSError, SafetensorError) as e:
        raise ModelLoadError(f"{file}: unreadable safetensors file: {e}") from e


# safetensors dtype names (https://huggingface.co/docs/safetensors, "Format").
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class _MappedFile:
    """A safetensors file's tensors as views of one copy-on-write memory map:
    nothing is read until used, so a tensor-parallel rank that copies its
    slice of a tensor (``narrow`` then ``copy_``) reads only the pages under
    that slice and never holds the whole tensor.

    File layout: an 8-byte little-endian header length, a JSON header
    ``name -> {dtype, shape, data_offsets: [begin, end]}`` (offsets from the
    end of the header), then the data.
    """

    def __init__(self, file: Path) -> None:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(header_len))
            self.header.pop("__metadata__", None)
            # ACCESS_COPY: writable for torch.frombuffer, never written back to the file.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if f.seek(0, 2) else None
        self._base = 8 + header_len
        self._bytes = (torch.frombuffer(self._map, dtype=torch.uint8) if self._map is not None
                       else torch.empty(0, dtype=torch.uint8))

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor ``name`` as a view of the map (a copy when the file
        stores it misaligned for its dtype, which torch cannot view); None
        for a dtype torch has no name for here.

        Raises:
            KeyError: an unknown name.
        """
        info = self.header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            return None
        begin, end = (self._base + o for o in info["data_offsets"])
        raw = self._bytes[begin:end]
        if begin % dtype.itemsize:
            raw = raw.clone()
        return raw.view(dtype).view(info["shape"])


def iter_safetensors_weights(path: str, dtype: torch.dtype, keep_quantized: bool = False, lazy: bool = False
                             ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every tensor of every shard, file by file.

    Names and shapes are exactly as stored. Floating tensors are cast to
    ``dtype``; integer tensors (e.g. quantized data, indices) keep theirs. An
    FP8 weight with a ``<name>_scale_inv`` companion (DeepSeek-V3's block
    quantization, see :mod:`ember.loader.weight_utils`) is dequantized to
    ``dtype`` and the scale itself is not yielded. Tensors already in
    ``dtype`` are views of a memory map of the file (see :class:`_MappedFile`):
    a tensor-parallel rank reads only its slices; others are materialized one
    at a time. With ``keep_quantized`` every tensor (FP8 weights and their
    ``_scale_inv`` companions included) is yielded as stored, uncast.
    ``lazy`` changes nothing (the views are lazy already).

    Raises:
        ModelLoadError: see :func:`safetensors_files`; a corrupt file; an FP8
            weight without block scales, or scales of the wrong shape.
    """
    files = safetensors_files(path)
    names = {file: _tensor_names(file) for file in files}
    scale_files = {} if keep_quantized else {n: file for file, ns in names.items() for n in ns
                                             if n.endswith(SCALE_INV_SUFFIX)}
    block = fp8_block_size(path) if scale_files else DEFAULT_FP8_BLOCK
    total = sum(map(len, names.values())) - len(scale_files)
    with tqdm(total=total, desc=f"Loading {Path(path).name}", unit="tensor") as bar:
        for file in files:
            mapped = _mapped(file)
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names[file]:
                    if name in scale_files:
                        continue  # consumed with its weight
                    tensor = mapped.get(name)
                    if tensor is None:
                        tensor = f.get_tensor(name)
                    scale_name = name + SCALE_INV_SUFFIX
                    if scale_name in scale_files:
                        tensor = _dequant(name, tensor, _read_scale(f, file, scale_files[scale_name], scale_name),
                                          block, dtype)
                    elif keep_quantized:
                        yield name, tensor
                        bar.update()
                        continue
                    elif tensor.dtype in FP8_DTYPES:
                        raise ModelLoadError(f"{file}: FP8 tensor {name!r} has no {scale_name!r}; only block-scaled "
                                             f"FP8 checkpoints (DeepSeek-V3 layout) are supported")
                    yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor
                    bar.update()


def _mapped(file: Path) -> _MappedFile:
    try:
        return _MappedFile(file)
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise ModelLoadError(f"{file}: unreadable safetensors file: {e}") from e


def _read_scale(f, file: Path, scale_file: Path, scale_name: str) -> torch.Tensor:
    """The scale tensor, from the open shard ``f`` when it holds it (the usual case)."""
    if scale_file == file:
        return f.get_tensor(scale_name)
    with safe_open(str(scale_file), framework="pt", device="cpu") as other:
        return other.get_tensor(scale_name)


def _dequant(name: str, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
             dtype: torch.dtype) -> torch.Tensor:
    try:
        return dequant_fp8_block(weight, scale_inv, block, dtype)
    except ValueError as e:
        raise ModelLoadError(f"{name}: {e}") from e


def hf_dir_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """``AutoTokenizer.from_pretrained(path)`` (local files only).

    Raises:
        ModelLoadError: no usable tokenizer files in the directory.
    """
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot load the tokenizer: {e}") from e


LOADER = FormatLoader(read_config=hf_dir_config, iter_weights=iter_safetensors_weights,
                      load_tokenizer=hf_dir_tokenizer)
