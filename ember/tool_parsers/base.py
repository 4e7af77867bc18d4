"""The tool parser interface.

A parser reads the tool calls a model wrote in its own format out of the
generated text (hermes: ``<tool_call>{...}</tool_call>``; Llama 3: bare JSON;
DeepSeek-V3: tool-call tokens), and builds the grammar that forces output of
that same format (``tool_choice`` ``required`` or a named function).

Like the reasoning parsers, a parser defines one pure function,
:meth:`ToolParser.split`: the content and the complete tool calls that a text
commits to. Both the non-streaming and the streaming call derive from it, so
the streamed deltas, assembled, always equal the non-streamed answer however
the text is cut:

* a call is committed only once its text is complete and parses; until then
  its text is withheld, and a call that never completes or does not parse
  (malformed JSON, a missing field) is returned as content, verbatim;
* a suffix that may still become a tag (``"<tool_ca"``) is withheld until the
  next delta decides it;
* whitespace next to a call is not content (the newline between two calls);
  trailing whitespace is withheld while streaming, since a call may follow.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    """One tool call read from the output.

    Attributes:
        name: the function's name, as the model wrote it.
        arguments: the arguments as JSON text of an object (re-serialized with
            ``json.dumps``, so always valid JSON).
    """

    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolParse:
    """What a text commits to: ``content`` (text outside the calls) and the
    complete ``calls`` in order. As the text grows, ``content`` only grows at
    its end and ``calls`` only gains entries at its end."""

    content: str
    calls: tuple[ParsedToolCall, ...]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function a request offers, as grammars need it.

    Attributes:
        name: the function's name.
        parameters: the JSON schema of its arguments (an object schema).
    """

    name: str
    parameters: dict[str, Any]


def partial_suffix_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``."""
    best = 0
    for tag in tags:
        for n in range(min(len(text), len(tag) - 1), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def arguments_json(value: Any) -> str | None:
    """The arguments of a call as JSON text, or None if they are not a JSON object.

    ``value`` is the parsed arguments: an object, or a string holding the JSON
    text of one (some models write the arguments as a string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def json_call(text: str, argument_keys: tuple[str, ...]) -> ParsedToolCall | None:
    """A call written as one JSON object ``{"name": str, KEY: {...}}`` (KEY one of
    ``argument_keys``; a missing KEY means no arguments), or None when ``text``
    (surrounding whitespace aside) is anything else."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    keys = [k for k in argument_keys if k in obj]
    if set(obj) - {"name", *argument_keys} or len(keys) > 1:
        return None
    arguments = arguments_json(obj[keys[0]]) if keys else "{}"
    return None if arguments is None else ParsedToolCall(obj["name"], arguments)


class ContentBuilder:
    """Content pieces between calls, trimmed of the whitespace next to a call;
    two non-empty pieces that a call separated are joined by a newline."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.after_call = False

    def add(self, piece: str, before_call: bool) -> None:
        """Append ``piece``; ``before_call``: a call (or a withheld, possible call) follows it."""
        if self.after_call:
            piece = piece.lstrip()
        if before_call:
            piece = piece.rstrip()
        if piece and self.after_call and any(self.pieces):
            piece = "\n" + piece
        self.after_call = self.after_call or before_call
        self.pieces.append(piece)

    def text(self) -> str:
        return "".join(self.pieces)


class ToolParser(ABC):
    """Reads tool calls in one model family's format.

    Subclasses set :attr:`name` and implement :meth:`split` and
    :meth:`call_grammar`; :attr:`calls_begin`, :attr:`call_separator` and
    :attr:`calls_end` give the text around and between parallel calls.
    """

    name: str = ""
    calls_begin: str = ""
    call_separator: str = ""
    calls_end: str = ""
    # The format's tags are tokens a tokenizer may mark special: requests read
    # by this parser keep special tokens in their text (skip_special_tokens off).
    keeps_special_tokens: bool = False

    @abstractmethod
    def split(self, text: str, final: bool) -> ToolParse:
        """The content and complete calls of ``text``.

        Args:
            text: all text generated so far (the answer, after any reasoning).
            final: the generation has ended: withheld text is decided (an
                unfinished call is content unless its text parses as a call).
        """

    @abstractmethod
    def call_grammar(self, tool: ToolSpec) -> Any:
        """An ``xgrammar.Grammar`` of one call of ``tool`` in this format.

        Raises:
            ValueError: ``tool.parameters`` is not a JSON schema xgrammar supports.
        """

    def extract_tool_calls(self, text: str) -> ToolParse:
        """The content and calls of a finished output."""
        return self.split(text, final=True)

    def extract_tool_calls_streaming(self, previous_text: str, delta_text: str, final: bool = False
                                     ) -> tuple[str, tuple[ParsedToolCall, ...]]:
        """The content and the calls that ``delta_text`` adds after ``previous_text``.

        Returns:
            ``(content_delta, new_calls)``. Costs O(len(previous_text + delta_text))
            per call (stateless).
        """
        old = self.split(previous_text, final=False)
        new = self.split(previous_text + delta_text, final=final)
        return new.content[len(old.content):], new.calls[len(old.calls):]
