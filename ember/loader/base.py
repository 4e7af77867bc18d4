"""What every loader module shares: the error types, the interface a model
format implements (:class:`FormatLoader`), the GGUF magic check and Ember's
cache folder. Format modules import from here, never from ``source``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

GGUF_MAGIC = b"GGUF"


class ModelLoadError(ValueError):
    """A model path is missing or its files are not a readable model.

    The message names the path and the problem.
    """


def ember_cache_dir() -> Path:
    """Ember's cache root: ``$EMBER_CACHE_DIR``, default ``~/.cache/ember``."""
    return Path(os.environ.get("EMBER_CACHE_DIR") or "~/.cache/ember").expanduser()


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one Ember can load.

    The message names the architecture and lists the supported ones.
    """


@dataclass(frozen=True)
class FormatLoader:
    """The three readers one model format provides (each takes ``ModelSource.path``).

    ``iter_weights(path, dtype, keep_quantized, lazy)``: with ``keep_quantized``
    False, quantized tensors are dequantized and floating ones cast to
    ``dtype``; with True, tensors come as the checkpoint stores them, for a
    quantization method that runs the stored format (see
    :attr:`ember.layers.quantization.base.QuantizationConfig.raw_checkpoint`).
    With ``lazy`` (model loading through weight loaders), a tensor may come
    as a tensor-like view that reads only the slices the loaders narrow it
    to (GGUF: :class:`ember.loader.gguf_tensor.LazyGGUFTensor`; safetensors
    tensors are memory-map views either way).
    """

    read_config: Callable[[str], PretrainedConfig]
    iter_weights: Callable[[str, torch.dtype, bool, bool], Iterator[tuple[str, torch.Tensor]]]
    load_tokenizer: Callable[[str], PreTrainedTokenizerFast]


def check_gguf_file(path: Path) -> Path:
    """``path``, after checking that it starts with the GGUF magic.

    Raises:
        ModelLoadError: it does not (the message names the file).
        OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        hint = " (pass the model's directory instead)" if path.suffix in (".safetensors", ".json") else ""
        raise ModelLoadError(f"{path} is not a GGUF file: it starts with {magic!r}, "
                             f"expected {GGUF_MAGIC!r}{hint}")
    return path
