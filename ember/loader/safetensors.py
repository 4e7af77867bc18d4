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

from ember.loader.source import FormatLoader, ModelLoadError

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
    ``dtype``; integer tensors (e.g. quantized data, indices) keep theirs. Only
    one tensor at a time is materialized (safetensors reads lazily from an mmap).

    Raises:
        ModelLoadError: see :func:`safetensors_files`; a corrupt file.
    """
    files = safetensors_files(path)
    names = {file: _tensor_names(file) for file in files}
    with tqdm(total=sum(map(len, names.values())), desc=f"Loading {Path(path).name}", unit="tensor") as bar:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names[file]:
                    tensor = f.get_tensor(name)
                    yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor
                    bar.update()


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
