"""Small helpers shared across the package."""

from __future__ import annotations

import importlib
import re
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


# The range of a signed 64-bit integer: every integer a request carries to the
# engine core must fit it (the msgpack wire format and torch's int64 tensors).
INT64_MIN = -(2 ** 63)
INT64_MAX = 2 ** 63 - 1


def is_int(value: Any, lo: int = INT64_MIN, hi: int = INT64_MAX) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) in ``[lo, hi]`` (default: int64)."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def wrap_int64(value: int) -> int:
    """``value`` modulo 2**64, as a signed 64-bit integer (two's complement), e.g.
    ``wrap_int64(2**63) == -2**63``."""
    return (value - INT64_MIN) % 2 ** 64 + INT64_MIN


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: str, name: str) -> str:
    """``value``, if it is Unicode text (UTF-8 can encode it).

    A Python ``str`` can hold UTF-16 surrogate code points (U+D800..U+DFFF), e.g.
    from the JSON escape ``"\\ud800"`` without its pair; they are not characters,
    and tokenizers, msgpack and UTF-8 all refuse them.

    Raises:
        ValueError: ``value`` holds a surrogate (the message starts with ``name``
            and gives the code point and its index).
    """
    if not value.isascii() and (m := _SURROGATE.search(value)) is not None:
        raise ValueError(f"{name} is not valid Unicode text: it holds the lone surrogate U+{ord(m.group()):04X} at "
                         f"index {m.start()} (surrogates are not characters; JSON \\u escapes of them must come "
                         "in high-low pairs)")
    return value
