"""Reasoning parser registry: ``--reasoning-parser NAME`` -> parser class."""

from __future__ import annotations

from ember.reasoning.base import ReasoningParser
from ember.reasoning.think import DeepSeekR1ReasoningParser, Qwen3ReasoningParser

_PARSERS: dict[str, type[ReasoningParser]] = {
    DeepSeekR1ReasoningParser.name: DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser.name: Qwen3ReasoningParser,
}


def reasoning_parser_names() -> list[str]:
    return sorted(_PARSERS)


def get_reasoning_parser(name: str) -> ReasoningParser:
    """A parser instance for ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name not in _PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; available: {reasoning_parser_names()}")
    return _PARSERS[name]()
