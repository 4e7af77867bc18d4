"""response_format and structured_outputs in the request models -> SamplingParams."""

from __future__ import annotations

import pydantic
import pytest

from ember.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
          "additionalProperties": False}


def params(cls=ChatCompletionRequest, **body):
    base = {"messages": MSG} if cls is ChatCompletionRequest else {"prompt": "hi"}
    return cls.model_validate({**base, **body}).to_sampling_params(16)


@pytest.mark.parametrize("cls", [ChatCompletionRequest, CompletionRequest])
def test_response_format_and_extra_map_to_structured_outputs(cls) -> None:
    assert params(cls).structured_outputs is None
    assert params(cls, response_format={"type": "text"}).structured_outputs is None
    assert params(cls, response_format={"type": "json_object"}).structured_outputs.json_object
    so = params(cls, response_format={"type": "json_schema", "json_schema": {
        "name": "A", "schema": SCHEMA, "strict": True, "description": "an a"}}).structured_outputs
    assert so.json == SCHEMA
    assert params(cls, structured_outputs={"json": SCHEMA}).structured_outputs.json == SCHEMA
    assert params(cls, structured_outputs={"regex": "a+"}).structured_outputs.regex == "a+"
    assert params(cls, structured_outputs={"choice": ["x", "y"]}).structured_outputs.choice == ["x", "y"]
    assert params(cls, structured_outputs={"grammar": 'root ::= "a"'}).structured_outputs.grammar
    assert params(cls, structured_outputs={"json_object": True}).structured_outputs.json_object


@pytest.mark.parametrize("body, match", [
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "cannot be combined"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"structured_outputs": {}}, "exactly one"),
])
def test_conflicting_constraints_are_value_errors(body: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        params(**body)


@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    {"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
    {"response_format": {"type": "yaml"}},
    {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
    {"structured_outputs": {"choice": "a"}},
])
def test_malformed_fields_fail_validation(body: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate({"messages": MSG, **body})
