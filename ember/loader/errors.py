"""What every loader module shares: its error type and Ember's cache folder."""

from __future__ import annotations

import os
from pathlib import Path


class ModelLoadError(ValueError):
    """A model path is missing or its files are not a readable model.

    The message names the path and the problem.
    """


def ember_cache_dir() -> Path:
    """Ember's cache root: ``$EMBER_CACHE_DIR``, default ``~/.cache/ember``."""
    return Path(os.environ.get("EMBER_CACHE_DIR") or "~/.cache/ember").expanduser()
