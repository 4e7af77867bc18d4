"""``llama3_json``: Llama 3.1, 3.2 and 3.3 JSON tool calls.

Format, as Llama 3.1's chat template asks for it (JSON-based tool calling)::

    {"name": "get_weather", "parameters": {"city": "Paris"}}

optionally after ``<|python_tag|>``, several calls separated by ``;``. A
special token, ``<|python_tag|>`` is normally dropped from the text
(``skip_special_tokens``); with it kept, the text before it is content.
Without it, calls are recognized only at the start of the output (after
whitespace): a JSON object later in a prose answer is content. Each call is
one JSON object with a string ``name`` and an object ``parameters``
(``arguments`` is read too); the text after the last call is content. An
output that starts like a call but is not one (not an object of that shape,
malformed, unfinished) is content.
"""

from __future__ import annotations

import json
from typing import Any

from ember.tool_parsers.base import ContentBuilder, ParsedToolCall, ToolParse, ToolParser, ToolSpec, json_call, \
    partial_suffix_len
from ember.tool_parsers.grammar import wrapped_call_grammar

PYTHON_TAG = "<|python_tag|>"
_WHITESPACE = " \t\r\n"


def json_object_end(text: str, start: int) -> int | None:
    """The index just past the ``}`` closing the JSON object that opens at
    ``text[start]`` (brackets counted outside strings), or None when the text
    ends first. Does not check that the object is valid JSON."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    call_separator = "; "

    def split(self, text: str, final: bool) -> ToolParse:
        content = ContentBuilder()
        tag = text.find(PYTHON_TAG)
        if tag >= 0:
            head, start = text[:tag], tag + len(PYTHON_TAG)
        elif text.lstrip(_WHITESPACE).startswith("{"):
            head, start = "", 0
        else:  # plain content, unless a <|python_tag|> is still coming
            if not final:
                text = text[:len(text) - partial_suffix_len(text, (PYTHON_TAG,))].rstrip()
            content.add(text, before_call=False)
            return ToolParse(content.text(), ())
        calls: list[ParsedToolCall] = []
        pos = _skip_whitespace(text, start)
        rest_start = start  # where the content after the calls begins
        while pos < len(text) and text[pos] == "{":
            end = json_object_end(text, pos)
            if end is None and not final:  # an unfinished call: withheld
                rest_start = None
                break
            call = json_call(text[pos:end], ("parameters", "arguments")) if end is not None else None
            if call is None:
                break
            calls.append(call)
            rest_start = end
            nxt = _skip_whitespace(text, end)
            if nxt == len(text) and not final:
                break  # a separator may follow
            if nxt < len(text) and text[nxt] == ";":
                after = _skip_whitespace(text, nxt + 1)
                if after == len(text) and not final:
                    rest_start = None  # the next call may follow
                    break
                if after < len(text) and text[after] == "{":
                    pos = after
                    continue
            break
        content.add(head, before_call=bool(calls) or rest_start is None)
        if rest_start is not None:
            rest = text[rest_start:]
            if not final:
                rest = rest.rstrip()
            if calls:
                content.add(rest, before_call=False)
            else:  # not a call after all: the tag goes, its text stays content
                content.pieces.append(rest)
        return ToolParse(content.text(), tuple(calls))

    def call_grammar(self, tool: ToolSpec) -> Any:
        return wrapped_call_grammar(tool, f'{{"name": {json.dumps(tool.name, ensure_ascii=False)}, "parameters": ', "}")
