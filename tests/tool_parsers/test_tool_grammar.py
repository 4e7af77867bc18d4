"""Grammars that force tool calls: they accept exactly the calls their parser
reads, with arguments valid against each tool's schema (checked with xgrammar's
string matcher, no model)."""

from __future__ import annotations

import json

import pytest
from xgrammar.testing import _is_grammar_accept_string

from ember.tool_parsers import ToolSpec, get_tool_parser, tool_calls_grammar, tool_parser_names

WEATHER = ToolSpec("get_weather", {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]})
ADD = ToolSpec("add", {"type": "object", "required": ["a", "b"],
                       "properties": {"a": {"type": "integer", "minimum": 0}, "b": {"type": "number"}}})
NESTED = ToolSpec("plan", {"type": "object", "$defs": {"step": {"type": "object", "properties": {
    "title": {"type": "string"}}, "required": ["title"]}},
    "properties": {"steps": {"type": "array", "items": {"$ref": "#/$defs/step"}, "minItems": 1}},
    "required": ["steps"]})
TOOLS = [WEATHER, ADD, NESTED]


def render(parser: str, calls: list[tuple[str, dict]]) -> str:
    """``calls`` written as the model writes them in ``parser``'s format."""
    args = [json.dumps(a, ensure_ascii=False) for _, a in calls]
    if parser == "hermes":
        return "\n".join(f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>'
                         for (n, _), a in zip(calls, args))
    if parser == "llama3_json":
        return "; ".join(f'{{"name": "{n}", "parameters": {a}}}' for (n, _), a in zip(calls, args))
    body = "\n".join(f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n{a}\n```<｜tool▁call▁end｜>"
                     for (n, _), a in zip(calls, args))
    return f"<｜tool▁calls▁begin｜>{body}<｜tool▁calls▁end｜>"


GOOD = [("get_weather", {"city": "Paris"}), ("add", {"a": 2, "b": -3.5}),
        ("plan", {"steps": [{"title": "a"}, {"title": "b"}]}), ("get_weather", {"city": "Oslo", "unit": "celsius"})]
BAD = [("get_weather", {}),  # required property missing
       ("get_weather", {"city": "Paris", "unit": "kelvin"}),  # not in the enum
       ("add", {"a": -1, "b": 1}),  # below the minimum
       ("add", {"a": 1.5, "b": 1}),  # not an integer
       ("add", {"a": 1, "b": 2, "c": 3}),  # an undeclared property
       ("plan", {"steps": []}),  # too few items
       ("nope", {})]  # not an offered tool


@pytest.mark.parametrize("parser", tool_parser_names())
def test_required_accepts_valid_calls_and_rejects_invalid_ones(parser):
    grammar = tool_calls_grammar(get_tool_parser(parser), TOOLS, parallel=True)
    for call in GOOD:
        text = render(parser, [call])
        assert _is_grammar_accept_string(grammar, text), text
        parsed = get_tool_parser(parser).extract_tool_calls(text)
        assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [call] and parsed.content == ""
    assert _is_grammar_accept_string(grammar, render(parser, GOOD))  # parallel calls
    for call in BAD:
        assert not _is_grammar_accept_string(grammar, render(parser, [call])), call
    assert not _is_grammar_accept_string(grammar, "")  # at least one call
    assert not _is_grammar_accept_string(grammar, "Sure. " + render(parser, GOOD[:1]))  # no text around calls


@pytest.mark.parametrize("parser", tool_parser_names())
def test_single_call_and_named_function(parser):
    single = tool_calls_grammar(get_tool_parser(parser), TOOLS, parallel=False)
    assert _is_grammar_accept_string(single, render(parser, GOOD[:1]))
    assert not _is_grammar_accept_string(single, render(parser, GOOD[:2]))
    named = tool_calls_grammar(get_tool_parser(parser), [ADD], parallel=False)
    assert _is_grammar_accept_string(named, render(parser, [GOOD[1]]))
    assert not _is_grammar_accept_string(named, render(parser, [GOOD[0]]))


def test_omitted_parameters_mean_no_arguments():
    grammar = tool_calls_grammar(get_tool_parser("hermes"), [ToolSpec("now", {"type": "object", "properties": {}})],
                                 parallel=False)
    assert _is_grammar_accept_string(grammar, render("hermes", [("now", {})]))
    assert not _is_grammar_accept_string(grammar, render("hermes", [("now", {"x": 1})]))


def test_rule_names_of_the_schema_do_not_clash():
    # A property named like the grammar's own rules stays a plain property.
    tool = ToolSpec("tool_call", {"type": "object", "properties": {"root": {"type": "string"},
                                                                   "tool_call": {"type": "integer"}}})
    grammar = tool_calls_grammar(get_tool_parser("hermes"), [tool], parallel=True)
    call = ("tool_call", {"root": "x", "tool_call": 1})
    assert _is_grammar_accept_string(grammar, render("hermes", [call, call]))


def test_unsupported_schema_is_a_value_error_naming_the_tool():
    with pytest.raises(ValueError, match="the parameters schema of tool 'f' is not supported: .*frobnicate"):
        tool_calls_grammar(get_tool_parser("hermes"), [ToolSpec("f", {"type": "object", "properties": {
            "a": {"type": "frobnicate"}}})], parallel=True)
    with pytest.raises(ValueError, match="at least one tool"):
        tool_calls_grammar(get_tool_parser("hermes"), [], parallel=True)
