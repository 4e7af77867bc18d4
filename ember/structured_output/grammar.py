"""Grammar specs: a request's :class:`~ember.sampling_params.StructuredOutputsParams`
as a hashable key (the compile cache's key) and as an xgrammar ``Grammar``,
with the checks that turn a bad constraint into a ``ValueError`` naming it.

JSON schemas are converted by xgrammar (``Grammar.from_json_schema``) in its
strict mode (an object takes only the properties its schema lists unless
``additionalProperties`` says otherwise, as OpenAI's ``strict: true``) and
without free whitespace (``any_whitespace=False``), so a model cannot spend
its token budget on blank lines. Keywords that xgrammar would not enforce
(e.g. ``not``, ``if``/``then``/``else``, ``uniqueItems``) are rejected rather
than silently ignored: the output would not be guaranteed to validate.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from ember.sampling_params import StructuredOutputsParams

# (kind, canonical text): kind is one of json, json_object, regex, choice, grammar.
GrammarKey = tuple[str, str]

# JSON Schema keywords whose constraint the converter does not enforce.
UNSUPPORTED_SCHEMA_KEYWORDS = frozenset({
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "uniqueItems",
    "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$dynamicAnchor", "$recursiveRef",
})
# Keywords whose value maps names to subschemas (the names are not keywords).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Keywords whose value is a subschema or a list of subschemas.
_SUBSCHEMAS = ("items", "prefixItems", "additionalProperties", "additionalItems", "contains", "propertyNames",
               "anyOf", "oneOf", "allOf", "not", "if", "then", "else", "unevaluatedProperties",
               "unevaluatedItems")


def grammar_key(params: StructuredOutputsParams) -> GrammarKey:
    """The cache key of a constraint: equal constraints (a schema given as a
    dict or as its JSON text) get equal keys. Key order is kept: it is the
    order in which the output lists an object's properties.

    Raises:
        ValueError: ``json`` is a string that is not JSON text, or not an object.
    """
    if params.json is not None:
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from e
        if not isinstance(schema, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
        return "json", json.dumps(schema, separators=(",", ":"))
    if params.json_object:
        return "json_object", ""
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:
        return "choice", json.dumps(params.choice)
    return "grammar", params.grammar  # type: ignore[return-value]


def _unsupported_keyword(schema: Any, path: str) -> tuple[str, str] | None:
    """The first (location, keyword) in ``schema`` that is not enforced, or None."""
    if isinstance(schema, list):
        for i, s in enumerate(schema):
            found = _unsupported_keyword(s, f"{path}/{i}")
            if found:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    for key in schema:
        if key in UNSUPPORTED_SCHEMA_KEYWORDS:
            return path or "/", key
    for key in _SCHEMA_MAPS:
        value = schema.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                found = _unsupported_keyword(sub, f"{path}/{key}/{name}")
                if found:
                    return found
    for key in _SUBSCHEMAS:
        if key in schema:
            found = _unsupported_keyword(schema[key], f"{path}/{key}")
            if found:
                return found
    return None


def _error_text(e: Exception) -> str:
    """xgrammar's message without its ``[time] file:line:`` prefix."""
    text = str(e).strip()
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
        head, sep, rest = text.partition(": ")
        if sep and (".cc:" in head or ".h:" in head):
            text = rest
    return text


def build_grammar(key: GrammarKey) -> Any:
    """The xgrammar ``Grammar`` of a constraint.

    Raises:
        ValueError: an invalid schema, an unsupported schema keyword, an
            invalid regex or an invalid EBNF grammar; the message starts with
            the field (``structured_outputs.json`` ...) and says what is wrong.
    """
    import xgrammar as xgr

    kind, text = key
    try:
        if kind == "json":
            found = _unsupported_keyword(json.loads(text), "")
            if found:
                raise ValueError(f"structured_outputs.json: the schema keyword {found[1]!r} (at {found[0]}) "
                                 "is not supported")
            return xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "choice":
            # EBNF string literals take JSON's escapes.
            choices = json.loads(text)
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in choices))
        return xgr.Grammar.from_ebnf(text)
    except ValueError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError for every parse error
        raise ValueError(f"structured_outputs.{kind}: invalid {_KIND_NAMES[kind]}: {_error_text(e)}") from e


_KIND_NAMES = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regular expression",
               "choice": "choice", "grammar": "EBNF grammar"}


@functools.lru_cache(maxsize=256)
def _validate_key(key: GrammarKey) -> None:
    build_grammar(key)


def validate_structured_outputs(params: StructuredOutputsParams) -> GrammarKey:
    """Check that a constraint parses and that every schema keyword in it is
    enforced (cheap: no token tables are built; repeated specs are cached).

    Returns:
        Its :func:`grammar_key`.
    Raises:
        ValueError: see :func:`grammar_key` and :func:`build_grammar`.
    """
    key = grammar_key(params)
    _validate_key(key)
    return key
