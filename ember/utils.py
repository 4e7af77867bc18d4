"""Small helpers shared across the package."""

from __future__ import annotations

import importlib
from typing import Any


def resolve_lazy(table: dict[str, str], name: str, what: str) -> Any:
    """The object a registry ``table`` (name -> ``"module:attribute"``) names,
    importing its module only now (so the CPU path never imports GPU kernels).

    Raises:
        ValueError: ``name`` is not registered (the message says ``what`` it is
            and lists the registered names).
    """
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; registered: {sorted(table)}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)
