"""``hermes``: Qwen2.5, Qwen3 (and Hermes-2-Pro, whose format they share).

Format, as these models' chat templates teach it and render calls in history::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, several separated by a newline. ``<tool_call>`` and
``</tool_call>`` are ordinary (non-special) tokens in Qwen's vocabulary, so
they survive ``skip_special_tokens``. A body is one JSON object with a string
``name`` and an object ``arguments`` (``parameters`` is read too, and
arguments given as a JSON string are decoded).
"""

from __future__ import annotations

import json
from typing import Any

from ember.tool_parsers.base import ParsedToolCall, ToolSpec, json_call
from ember.tool_parsers.grammar import wrapped_call_grammar
from ember.tool_parsers.tagged import TaggedToolParser


class HermesToolParser(TaggedToolParser):
    name = "hermes"
    start_tag = "<tool_call>"
    end_tag = "</tool_call>"
    call_separator = "\n"

    def parse_body(self, body: str) -> ParsedToolCall | None:
        return json_call(body, ("arguments", "parameters"))

    def call_grammar(self, tool: ToolSpec) -> Any:
        head = f'<tool_call>\n{{"name": {json.dumps(tool.name, ensure_ascii=False)}, "arguments": '
        return wrapped_call_grammar(tool, head, "}\n</tool_call>")
