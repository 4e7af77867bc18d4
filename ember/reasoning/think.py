"""``<think> ... </think>`` parsers for DeepSeek-R1 and Qwen3.

- ``deepseek_r1`` (DeepSeek-R1, R1-0528, R1-Distill-*, QwQ): the output is
  reasoning from its first character until ``</think>``; a leading ``<think>``
  is dropped (R1-0528 emits it, newer R1 chat templates put it in the prompt
  instead). With no ``</think>`` at all (cut off by ``max_tokens``), everything
  is reasoning.
- ``qwen3`` (Qwen3 hybrid models): the output is content until ``<think>``,
  reasoning from there to ``</think>``, content after. With
  ``enable_thinking=False`` the template pre-fills an empty think block, the
  output has no tags and is all content; a missing ``</think>`` leaves the rest
  as reasoning. (Qwen3-*-Thinking-2507 models never emit ``<think>``: serve
  them with ``deepseek_r1``.)

Text between the tags is kept verbatim (no whitespace stripping), as vLLM does.
"""

from __future__ import annotations

from ember.reasoning.base import ReasoningParser

THINK_START = "<think>"
THINK_END = "</think>"


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_after_start(body: str, final: bool) -> tuple[str, str]:
    """``(reasoning, content)`` of the text after the reasoning started: up to
    ``</think>``, then content; without it all reasoning (a partial end tag
    withheld unless ``final``)."""
    end = body.find(THINK_END)
    if end >= 0:
        return body[:end], body[end + len(THINK_END):]
    held = 0 if final else partial_tag_len(body, THINK_END)
    return body[: len(body) - held], ""


class DeepSeekR1ReasoningParser(ReasoningParser):
    """Reasoning from the start (see the module docstring)."""

    name = "deepseek_r1"

    def split(self, text: str, final: bool) -> tuple[str, str]:
        if text.startswith(THINK_START):
            text = text[len(THINK_START):]
        elif not final and THINK_START.startswith(text):
            return "", ""  # may still become the leading <think>
        return split_after_start(text, final)


class Qwen3ReasoningParser(ReasoningParser):
    """Reasoning only inside ``<think>`` (see the module docstring)."""

    name = "qwen3"
    structured_output_reasoning = "optional"

    def split(self, text: str, final: bool) -> tuple[str, str]:
        start = text.find(THINK_START)
        if start < 0:
            held = 0 if final else partial_tag_len(text, THINK_START)
            return "", text[: len(text) - held]
        reasoning, after = split_after_start(text[start + len(THINK_START):], final)
        return reasoning, text[:start] + after
