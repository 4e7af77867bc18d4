"""Architecture presets: shipped HF-style ``config.json`` files without weights
(``ember/presets/*.json``), for ``--load-format dummy`` benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

from ember.loader.base import FormatLoader, ModelLoadError

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_path(name: str) -> Path | None:
    """The preset file for ``name`` (case-insensitive), or None."""
    for p in PRESET_DIR.glob("*.json"):
        if p.stem.lower() == name.lower():
            return p
    return None


def preset_config(path: str):
    """A ``transformers.PretrainedConfig`` built from a preset file.

    Raises:
        ModelLoadError: unreadable JSON or an unknown ``model_type``.
    """
    from transformers import CONFIG_MAPPING

    try:
        fields = json.loads(Path(path).read_text())
        config_cls = CONFIG_MAPPING[fields.pop("model_type")]
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: not a usable preset: {e!r}") from e
    return config_cls(**fields)


def _no_weights(path: str, dtype, keep_quantized: bool = False, lazy: bool = False):
    raise ModelLoadError(f"{path} is an architecture preset without weights: use --load-format dummy")


def _no_tokenizer(path: str):
    return None


LOADER = FormatLoader(read_config=preset_config, iter_weights=_no_weights, load_tokenizer=_no_tokenizer)
