"""Grammars that force tool calls in a parser's format (``tool_choice``
``required`` or a named function), built with xgrammar and handed to the
engine as EBNF text (``StructuredOutputsParams(grammar=...)``).

The output is exactly what the model would write for a call in its own format
(e.g. ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``), so
the same parser reads forced and free calls, and the model is steered along
the format it was trained on. Each tool's arguments follow its own parameters
schema, converted by xgrammar (compact JSON: ``", "`` and ``": "`` separators,
no other whitespace, which keeps a small model from padding forever), each
schema converted on its own so that its ``$ref`` s resolve inside it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ember.tool_parsers.base import ToolParser, ToolSpec

_ROOT_RULE = re.compile(r"^root ::= ", re.MULTILINE)


def literal_grammar(text: str) -> Any:
    """An ``xgrammar.Grammar`` of exactly ``text``."""
    import xgrammar

    return xgrammar.Grammar.from_ebnf("root ::= " + json.dumps(text, ensure_ascii=False))


def arguments_grammar(tool: ToolSpec) -> Any:
    """An ``xgrammar.Grammar`` of one JSON object valid against ``tool.parameters``.

    Raises:
        ValueError: xgrammar cannot convert the schema (the message names the tool).
    """
    import xgrammar

    try:
        return xgrammar.Grammar.from_json_schema(json.dumps(tool.parameters), any_whitespace=False)
    except Exception as e:  # xgrammar raises RuntimeError with the converter's reason
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        reason = re.sub(r"^\[[\d:]+\] \S+: ", "", reason)  # drop xgrammar's time and source location
        raise ValueError(f"the parameters schema of tool {tool.name!r} is not supported: {reason}") from e


def wrapped_call_grammar(tool: ToolSpec, before: str, after: str) -> Any:
    """``before`` + the tool's arguments (see :func:`arguments_grammar`) + ``after``."""
    import xgrammar

    return xgrammar.Grammar.concat(literal_grammar(before), arguments_grammar(tool), literal_grammar(after))


def tool_calls_grammar(parser: ToolParser, tools: list[ToolSpec], parallel: bool) -> str:
    """EBNF (root rule ``root``) of the calls ``parser`` reads: one call of any of
    ``tools``, or with ``parallel`` one or more joined by the parser's separator,
    inside its ``calls_begin`` / ``calls_end`` text.

    Raises:
        ValueError: no tools, or a parameters schema xgrammar cannot convert.
    """
    import xgrammar

    if not tools:
        raise ValueError("a tool-call grammar needs at least one tool")
    calls = [parser.call_grammar(t) for t in tools]
    one_call = xgrammar.Grammar.union(*calls) if len(calls) > 1 else xgrammar.Grammar.concat(calls[0])
    text = str(one_call)
    # NOTE: the root of a union / concat result is a fresh rule that no other rule
    # refers to (the parts' roots were renamed), so it can be renamed and repeated.
    if len(_ROOT_RULE.findall(text)) != 1:
        raise RuntimeError("xgrammar printed a grammar without exactly one root rule")
    call_rule = "tool_call"
    while re.search(rf"\b{call_rule}\b", text):
        call_rule += "_"
    text = _ROOT_RULE.sub(f"{call_rule} ::= ", text)
    body = f"{call_rule} ({_quoted(parser.call_separator)} {call_rule})*" if parallel else call_rule
    parts = [_quoted(parser.calls_begin)] if parser.calls_begin else []
    parts.append(body)
    if parser.calls_end:
        parts.append(_quoted(parser.calls_end))
    ebnf = f"root ::= {' '.join(parts)}\n{text}"
    xgrammar.Grammar.from_ebnf(ebnf)  # raises if the composition is broken
    return ebnf


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
