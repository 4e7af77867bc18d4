"""Tool parsers: read the tool calls a model writes in its family's format
into OpenAI ``tool_calls`` (``--tool-call-parser``), and build the grammars
that force calls in that format (``tool_choice`` ``required`` or named).

``hermes`` (Qwen2.5 / Qwen3), ``llama3_json`` (Llama 3.1+), ``deepseek_v3``
(DeepSeek-V3 / R1); without ``--tool-call-parser`` the server picks the one
its model's chat template teaches (:func:`tool_parser_for_chat_template`).
"""

from ember.tool_parsers.base import ParsedToolCall, ToolParse, ToolParser, ToolSpec
from ember.tool_parsers.grammar import tool_calls_grammar
from ember.tool_parsers.registry import get_tool_parser, tool_parser_for_chat_template, tool_parser_names

__all__ = ["ParsedToolCall", "ToolParse", "ToolParser", "ToolSpec", "get_tool_parser", "tool_calls_grammar",
           "tool_parser_for_chat_template", "tool_parser_names"]
