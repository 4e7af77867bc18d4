"""Grammar specs: cache keys and the validation that turns a bad constraint
into a ValueError naming the field and the problem (no model needed)."""

from __future__ import annotations

import pytest

from ember.sampling_params import StructuredOutputsParams as SO
from ember.structured_output.grammar import grammar_key, validate_structured_outputs


def test_keys_equal_for_dict_and_text_schema_and_differ_by_kind() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert grammar_key(SO(json=schema)) == grammar_key(SO(json='{"type": "object", "properties": {"a": {"type": "integer"}}}'))
    keys = {grammar_key(SO(json=schema)), grammar_key(SO(json_object=True)), grammar_key(SO(regex="a+")),
            grammar_key(SO(choice=["a+"])), grammar_key(SO(grammar='root ::= "a"'))}
    assert len(keys) == 5


def test_property_order_is_part_of_the_key() -> None:
    a = {"type": "object", "properties": {"x": {"type": "string"}, "y": {"type": "string"}}}
    b = {"type": "object", "properties": {"y": {"type": "string"}, "x": {"type": "string"}}}
    assert grammar_key(SO(json=a)) != grammar_key(SO(json=b))


@pytest.mark.parametrize("params", [
    SO(json={"type": "object", "properties": {"not": {"type": "string"}}, "required": ["not"]}),  # a property named "not"
    SO(json={"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1}),
    SO(json={"$defs": {"p": {"type": "string", "enum": ["a", "b"]}}, "type": "object",
             "properties": {"p": {"$ref": "#/$defs/p"}}}),
    SO(json_object=True),
    SO(regex=r"\d{3}-[a-z]+"),
    SO(choice=['say "hi"', "back\\slash", "héllo"]),
    SO(grammar='root ::= "yes" | "no" | digits\ndigits ::= [0-9]+'),
])
def test_valid_constraints_pass(params: SO) -> None:
    validate_structured_outputs(params)


@pytest.mark.parametrize("params, words", [
    (SO(json={"type": "foo"}), ["structured_outputs.json", "invalid JSON schema", "foo"]),
    (SO(json='{"type": '), ["structured_outputs.json", "not valid JSON"]),
    (SO(json="[1, 2]"), ["structured_outputs.json", "object"]),
    (SO(json={"type": "object", "properties": {"a": {"not": {"type": "string"}}}}), ["'not'", "/properties/a"]),
    (SO(json={"type": "array", "items": {"type": "string"}, "uniqueItems": True}), ["'uniqueItems'", "not supported"]),
    (SO(json={"if": {"type": "string"}, "then": {"minLength": 2}}), ["'if'"]),
    (SO(regex="a(b"), ["structured_outputs.regex", "invalid regular expression", "parenthesis"]),
    (SO(grammar='root ::= "a" | b'), ["structured_outputs.grammar", "invalid EBNF grammar", "b"]),
    (SO(grammar="this is not ebnf"), ["structured_outputs.grammar"]),
])
def test_invalid_constraints_name_the_problem(params: SO, words: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        validate_structured_outputs(params)
    for w in words:
        assert w in str(e.value)
    assert "[" not in str(e.value).split(":")[0]  # no xgrammar timestamp prefix


@pytest.mark.parametrize("kwargs", [{}, {"regex": "a", "choice": ["a"]}, {"choice": []}, {"choice": [""]},
                                    {"regex": ""}, {"json": 3}, {"regex": "a", "reasoning": "always"}])
def test_params_reject_malformed_fields(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="structured_outputs"):
        SO(**kwargs)
