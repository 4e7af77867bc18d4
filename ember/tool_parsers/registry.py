"""Tool parser registry: ``--tool-call-parser NAME`` -> parser class, and the
parser a model's chat template implies when no name is given."""

from __future__ import annotations

from ember.tool_parsers.base import ToolParser
from ember.tool_parsers.deepseek_v3 import CALL_BEGIN, DeepSeekV3ToolParser
from ember.tool_parsers.hermes import HermesToolParser
from ember.tool_parsers.llama3_json import PYTHON_TAG, Llama3JsonToolParser

_PARSERS: dict[str, type[ToolParser]] = {
    DeepSeekV3ToolParser.name: DeepSeekV3ToolParser,
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}

# What a chat template that renders tools writes to teach its format, in the
# order checked: Qwen2.5 / Qwen3 / Hermes spell out the <tool_call> block;
# DeepSeek-V3 / R1 render calls with their tool-call tokens; Llama 3.1+ ask
# for a JSON object with "parameters" and mention the ipython role or tag.
_TEMPLATE_MARKERS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("<tool_call>",), HermesToolParser.name),
    ((CALL_BEGIN,), DeepSeekV3ToolParser.name),
    ((PYTHON_TAG,), Llama3JsonToolParser.name),
    (('"parameters": dictionary of argument name and its value', "ipython"), Llama3JsonToolParser.name),
)


def tool_parser_names() -> list[str]:
    return sorted(_PARSERS)


def get_tool_parser(name: str) -> ToolParser:
    """A parser instance for ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name not in _PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; available: {tool_parser_names()}")
    return _PARSERS[name]()


def tool_parser_for_chat_template(chat_template: str | None) -> str | None:
    """The name of the parser whose format ``chat_template`` teaches, or None
    (no template, or one that renders no tool format Ember knows)."""
    if not chat_template:
        return None
    for markers, name in _TEMPLATE_MARKERS:
        if all(m in chat_template for m in markers):
            return name
    return None
