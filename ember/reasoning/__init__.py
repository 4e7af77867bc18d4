"""Reasoning parsers: split a reasoning model's output into its reasoning
(``<think> ... </think>``) and its answer, for ``reasoning_content`` in chat
completions (``--reasoning-parser``), as vLLM and SGLang do."""

from ember.reasoning.base import ReasoningParser
from ember.reasoning.registry import get_reasoning_parser, reasoning_parser_names

__all__ = ["ReasoningParser", "get_reasoning_parser", "reasoning_parser_names"]
