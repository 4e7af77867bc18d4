"""Ember's logger: INFO and above to stderr, so start-up reports never mix
with generated text on stdout. Set ``EMBER_LOG_LEVEL`` to change the level
(read once, at import)."""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "ember"


def _configure() -> None:
    root = logging.getLogger(_ROOT)
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[ember] %(message)s"))
    root.addHandler(handler)
    root.setLevel(os.environ.get("EMBER_LOG_LEVEL", "INFO").upper())
    root.propagate = False


def init_logger(name: str) -> logging.Logger:
    """A logger under the ``ember`` namespace (configured on first use)."""
    _configure()
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")
