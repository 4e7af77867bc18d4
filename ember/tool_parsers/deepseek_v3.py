"""``deepseek_v3``: DeepSeek-V3, V3-0324 and R1 (with ``--reasoning-parser
deepseek_r1``, calls are read from the answer after ``</think>``).

Format (DeepSeek-V3's chat template and tokenizer)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

The ``<｜tool▁calls▁begin｜>`` / ``<｜tool▁calls▁end｜>`` group markers are
dropped from the content; each ``<｜tool▁call▁begin｜> ... <｜tool▁call▁end｜>``
holds one call: its type (``function``), the separator token, the name, then
the arguments as a fenced JSON block. These are added tokens of DeepSeek's
vocabulary; so that they reach the parser whether or not a tokenizer marks
them special, requests read by this parser keep special tokens in their text
(the EOS token that ends the answer is never part of it).
"""

from __future__ import annotations

import json
from typing import Any

from ember.tool_parsers.base import ParsedToolCall, ToolSpec, arguments_json
from ember.tool_parsers.grammar import wrapped_call_grammar
from ember.tool_parsers.tagged import TaggedToolParser

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"


class DeepSeekV3ToolParser(TaggedToolParser):
    name = "deepseek_v3"
    start_tag = CALL_BEGIN
    end_tag = CALL_END
    markers = (CALLS_BEGIN, CALLS_END)
    calls_begin = CALLS_BEGIN
    call_separator = "\n"
    calls_end = CALLS_END
    keeps_special_tokens = True

    def parse_body(self, body: str) -> ParsedToolCall | None:
        kind, sep, rest = body.partition(TOOL_SEP)
        if not sep or kind.strip() != "function":
            return None
        name, newline, block = rest.partition("\n")
        name = name.strip()
        block = block.strip()
        if not newline or not name or not block.startswith("```") or not block.endswith("```") or len(block) < 6:
            return None
        block = block[3:-3]
        if block.startswith("json"):
            block = block[4:]
        try:
            arguments = arguments_json(json.loads(block))
        except ValueError:
            return None
        return None if arguments is None else ParsedToolCall(name, arguments)

    def call_grammar(self, tool: ToolSpec) -> Any:
        head = f"{CALL_BEGIN}function{TOOL_SEP}{tool.name}\n```json\n"
        return wrapped_call_grammar(tool, head, f"\n```{CALL_END}")
