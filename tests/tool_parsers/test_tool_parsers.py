"""Tool parsers over model outputs in each family's format: content kept around
the calls, several calls, malformed calls returned as content verbatim, and the
stream cut at every character position assembling to the non-streamed result."""

from __future__ import annotations

import json

import pytest

from ember.tool_parsers import ParsedToolCall, ToolParse, get_tool_parser, tool_parser_for_chat_template, \
    tool_parser_names

HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
HERMES_CALL2 = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": -3.5}}\n</tool_call>'
HERMES_BAD = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": }}\n</tool_call>'
WEATHER = ("get_weather", {"city": "Paris", "unit": "celsius"})
ADD = ("add", {"a": 2, "b": -3.5})

# (parser, output text, expected content or None, expected calls as (name, arguments))
CASES = [
    # hermes: Qwen2.5 / Qwen3
    ("hermes", HERMES_CALL, None, [WEATHER]),
    ("hermes", "I'll look that up.\n" + HERMES_CALL, "I'll look that up.", [WEATHER]),
    ("hermes", HERMES_CALL + "\nOne moment.", "One moment.", [WEATHER]),
    ("hermes", "Sure.\n" + HERMES_CALL + "\n" + HERMES_CALL2 + "\nDone.", "Sure.\nDone.", [WEATHER, ADD]),
    ("hermes", HERMES_BAD, HERMES_BAD, []),
    ("hermes", HERMES_CALL + "\n" + HERMES_BAD, HERMES_BAD, [WEATHER]),
    ("hermes", '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',
     '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>', []),
    ("hermes", '<tool_call>\n["add", {"a": 1}]\n</tool_call>', '<tool_call>\n["add", {"a": 1}]\n</tool_call>', []),
    # a model that stops right after the call's JSON (no end tag): still a call
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": -3.5}}', None, [ADD]),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 2', '<tool_call>\n{"name": "add", "arguments": {"a": 2',
     []),
    # arguments as a JSON string, braces and tags inside strings, non-ASCII
    ("hermes", '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 2, \\"b\\": -3.5}"}\n</tool_call>', None, [ADD]),
    ("hermes", '<tool_call>\n{"name": "echo", "arguments": {"text": "a } b { \\"</tool\\" é"}}\n</tool_call>', None,
     [("echo", {"text": 'a } b { "</tool" é'})]),
    ("hermes", '<tool_call>\n{"name": "now"}\n</tool_call>', None, [("now", {})]),
    ("hermes", "Plain answer with a <tool> tag and trailing space. ",
     "Plain answer with a <tool> tag and trailing space. ", []),
    ("hermes", "Ends with a partial tag <tool_ca", "Ends with a partial tag <tool_ca", []),
    # llama3_json: Llama 3.1 / 3.2 / 3.3
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None, [WEATHER]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None,
     [WEATHER]),
    ("llama3_json", 'Let me check.<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": -3.5}}', "Let me check.",
     [ADD]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                    '{"name": "add", "arguments": {"a": 2, "b": -3.5}}', None, [WEATHER, ADD]),
    ("llama3_json", '{"name": "add", "parameters": {"a": 2, "b": -3.5}} That is all.', "That is all.", [ADD]),
    ("llama3_json", '{"name": "add", "parameters": {"a": 2, "b": }}', '{"name": "add", "parameters": {"a": 2, "b": }}',
     []),
    ("llama3_json", '{"name": "add", "parameters": {"a": 2, "b": -3.5}}; {"name": "add", "parameters": {"a": }}',
     '; {"name": "add", "parameters": {"a": }}', [ADD]),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", 'As JSON: {"name": "add", "parameters": {"a": 1}}',
     'As JSON: {"name": "add", "parameters": {"a": 1}}', []),
    ("llama3_json", '<|python_tag|>print("hi")', 'print("hi")', []),
    ("llama3_json", '{"name": "add", "parameters": {"a": 2', '{"name": "add", "parameters": {"a": 2', []),
    ("llama3_json", '  {"name": "now", "parameters": {}}  ', None, [("now", {})]),
    # deepseek_v3: DeepSeek-V3 / R1
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                    '{"city": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', None, [WEATHER]),
    ("deepseek_v3", "Checking both.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                    '```json\n{"city": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>'
                    'function<｜tool▁sep｜>add\n```json\n{"a": 2, "b": -3.5}\n```<｜tool▁call▁end｜>'
                    "<｜tool▁calls▁end｜>", "Checking both.", [WEATHER, ADD]),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n"
                    '{"a": 2, "b": }\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
                    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n"
                    '{"a": 2, "b": }\n```<｜tool▁call▁end｜>', []),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>code<｜tool▁sep｜>add\n```json\n{}\n```"
                    "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
                    "<｜tool▁call▁begin｜>code<｜tool▁sep｜>add\n```json\n{}\n```<｜tool▁call▁end｜>", []),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n"
                    '{"a": 2, "b": -3.5}\n```', None, [ADD]),
    ("deepseek_v3", "No tools needed: 4.", "No tools needed: 4.", []),
]


def expected_parse(content: str | None, calls: list[tuple[str, dict]]) -> ToolParse:
    return ToolParse(content or "", tuple(ParsedToolCall(n, json.dumps(a, ensure_ascii=False)) for n, a in calls))


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_extract(name, text, content, calls):
    parsed = get_tool_parser(name).extract_tool_calls(text)
    assert parsed == expected_parse(content, calls)
    for call in parsed.calls:
        assert isinstance(json.loads(call.arguments), dict)


def assemble(name: str, chunks: list[str]) -> ToolParse:
    """The content and calls a stream of ``chunks`` sends, assembled."""
    parser = get_tool_parser(name)
    previous, content, calls = "", "", []
    for i, chunk in enumerate(chunks):
        delta_content, new_calls = parser.extract_tool_calls_streaming(previous, chunk, final=i == len(chunks) - 1)
        previous += chunk
        content += delta_content
        calls += new_calls
    return ToolParse(content, tuple(calls))


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_stream_split_at_every_position(name, text, content, calls):
    expected = expected_parse(content, calls)
    for cut in range(len(text) + 1):
        assert assemble(name, [text[:cut], text[cut:]]) == expected, f"cut at {cut}: {text[:cut]!r}"
    assert assemble(name, list(text)) == expected  # one character per delta
    assert assemble(name, [*text, ""]) == expected  # an empty final delta


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_a_prefix_commits_only_what_the_whole_text_keeps(name, text, content, calls):
    parser = get_tool_parser(name)
    final = parser.split(text, final=True)
    for cut in range(len(text) + 1):
        partial = parser.split(text[:cut], final=False)
        assert final.content.startswith(partial.content), cut
        assert final.calls[:len(partial.calls)] == partial.calls, cut


def test_a_call_is_sent_only_once_complete():
    parser = get_tool_parser("hermes")
    text = "Hi " + HERMES_CALL
    end = text.index("</tool_call>")
    for cut in range(end + len("</tool_call>")):
        assert parser.split(text[:cut], final=False).calls == ()
    assert len(parser.split(text, final=False).calls) == 1


def test_registry_and_template_detection(qwen_path):
    from ember.loader.source import load_tokenizer_for

    assert tool_parser_names() == ["deepseek_v3", "hermes", "llama3_json"]
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'; available"):
        get_tool_parser("nope")
    assert tool_parser_for_chat_template(load_tokenizer_for(qwen_path).chat_template) == "hermes"
    assert tool_parser_for_chat_template(None) is None
    assert tool_parser_for_chat_template("{{ messages[0]['content'] }}") is None
    assert tool_parser_for_chat_template("{{'<｜tool▁call▁begin｜>' + tool['type']}}") == "deepseek_v3"
    assert tool_parser_for_chat_template("{{- '<|python_tag|>' + tool_call.name }}") == "llama3_json"
