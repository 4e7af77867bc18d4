"""Hugging Face checkpoint directories: ``config.json`` + ``*.safetensors``.

Layout: https://huggingface.co/docs/transformers/main_classes/model (sharded
checkpoints list ``tensor name -> shard file`` in ``model.safetensors.index.json``);
file format: https://huggingface.co/docs/safetensors.
"""

from __future__ import annotations

import json
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


def iter_safetensors_weights(path: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every tensor of every shard, file by file.

    Names and shapes are exactly as stored. Floating tensors are cast to
    ``dtype``; integer tensors (e.g. quantized data, indices) keep theirs. An
    FP8 weight with a ``<name>_scale_inv`` companion (DeepSeek-V3's block
    quantization, see :mod:`ember.loader.weight_utils`) is dequantized to
    ``dtype`` and the scale itself is not yielded. Only one tensor at a time is
    materialized (safetensors reads lazily from an mmap).

    Raises:
        ModelLoadError: see :func:`safetensors_files`; a corrupt file; an FP8
            weight without block scales, or scales of the wrong shape.
    """
    files = safetensors_files(path)
    names = {file: _tensor_names(file) for file in files}
    scale_files = {n: file for file, ns in names.items() for n in ns if n.endswith(SCALE_INV_SUFFIX)}
    block = fp8_block_size(path) if scale_files else DEFAULT_FP8_BLOCK
    total = sum(map(len, names.values())) - len(scale_files)
    with tqdm(total=total, desc=f"Loading {Path(path).name}", unit="tensor") as bar:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names[file]:
                    if name in scale_files:
                        continue  # consumed with its weight
                    tensor = f.get_tensor(name)
                    scale_name = name + SCALE_INV_SUFFIX
                    if scale_name in scale_files:
                        tensor = _dequant(name, tensor, _read_scale(f, file, scale_files[scale_name], scale_name),
                                          block, dtype)
                    elif tensor.dtype in FP8_DTYPES:
                        raise ModelLoadError(f"{file}: FP8 tensor {name!r} has no {scale_name!r}; only block-scaled "
                                             f"FP8 checkpoints (DeepSeek-V3 layout) are supported")
                    yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor
                    bar.update()


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
