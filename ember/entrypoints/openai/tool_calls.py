"""Tool calling in chat completions: what a request's ``tools``,
``tool_choice`` and ``parallel_tool_calls`` do, and the tool calls of a
response (whole or streamed).

``tool_choice`` (default ``auto`` with tools, ``none`` without):

* ``none``: the tools are not given to the chat template and the output is
  plain content (no call is read from it).
* ``auto``: the tools are rendered by the chat template (``tools=``), and the
  calls the model writes in its own format are read by the server's tool
  parser (:mod:`ember.tool_parsers`); what is not a call stays content, and a
  call that does not parse is content too.
* ``required``: as ``auto``, and the output is forced by a grammar to be one or
  more calls (one with ``parallel_tool_calls: false``) of the offered tools, in
  the parser's format, with arguments valid against each tool's schema
  (``SamplingParams.structured_outputs``, enforced by the engine).
* a named function (``{"type": "function", "function": {"name": ...}}``):
  exactly one call of that function, forced likewise.

``parallel_tool_calls: false`` in ``auto`` mode returns only the model's first
call (calls after it are dropped, as the model was asked for at most one).

A message with calls gets ``finish_reason: "tool_calls"`` (unless the output
was cut by ``max_tokens``: ``"length"``). Each call gets an id ``call_<hex>``.
A stream sends each call once its text is complete: a first chunk with its
``index``, ``id``, ``type`` and ``function.name`` (``arguments: ""``), then one
with its arguments' JSON text; so a streamed call is never taken back, and the
chunks, assembled, equal the non-streamed message for the same output.
``n > 1`` is supported: every choice is parsed on its own.

Errors (HTTP 400, ``param`` naming the field): ``tool_choice`` ``required`` or
named without ``tools``; a named function not in ``tools``; ``auto`` /
``required`` / named on a server with no tool parser (the model's chat template
teaches no known format and no ``--tool-call-parser`` was given); a parameters
schema the grammar engine cannot enforce (``required`` / named); a forced call
together with another output constraint.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from ember.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatToolCallResult,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCallResult,
)
from ember.sampling_params import SamplingParams, StructuredOutputsParams
from ember.tool_parsers import ParsedToolCall, ToolParser, ToolSpec, tool_calls_grammar


def tool_call_id() -> str:
    """A fresh call id, ``call_<24 hex digits>`` (OpenAI's shape)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolUse:
    """How one chat request uses tools (see the module docstring).

    Attributes:
        template_tools: the ``tools`` for the chat template (OpenAI's shape), or None.
        parser: the parser that reads calls from the answer, or None (no calls read).
        grammar: EBNF that forces the calls (``required`` / named), or None.
        max_calls: at most this many calls are returned (None: no limit).
    """

    template_tools: list[dict[str, Any]] | None = None
    parser: ToolParser | None = None
    grammar: str | None = None
    max_calls: int | None = None

    @property
    def num_chars(self) -> int:
        """Characters the tool definitions add to the prompt, at least (for the length bound)."""
        return len(json.dumps(self.template_tools)) if self.template_tools else 0

    def constrain(self, params: SamplingParams, use_beam_search: bool = False) -> None:
        """Put the forcing grammar (if any) on ``params``, and keep special tokens
        in the text for a parser whose tags may be special tokens.

        Raises:
            APIError: ``params`` already carries another output constraint, or
                the request is a beam search (which ranks beams by the raw
                log-probabilities and takes no grammar).
        """
        if self.parser is not None and self.parser.keeps_special_tokens:
            params.skip_special_tokens = False
        if self.grammar is None:
            return
        if use_beam_search:
            raise APIError("tool_choice 'required' or a named function is not supported with use_beam_search",
                           param="tool_choice")
        if params.structured_outputs is not None:
            raise APIError("tool_choice 'required' or a named function forces the output format; it cannot be "
                           "combined with response_format or structured_outputs", param="tool_choice")
        params.structured_outputs = StructuredOutputsParams(grammar=self.grammar)

    def calls_of(self, calls: tuple[ParsedToolCall, ...]) -> tuple[ParsedToolCall, ...]:
        return calls if self.max_calls is None else calls[:self.max_calls]


def resolve_tool_use(request: ChatCompletionRequest, parser: ToolParser | None) -> ToolUse:
    """How ``request`` uses tools, on a server whose tool parser is ``parser``.

    Raises:
        APIError: 400 for the cases the module docstring lists.
    """
    tools = request.tools or []
    choice = request.tool_choice if request.tool_choice is not None else ("auto" if tools else "none")
    if choice == "none":
        return ToolUse()
    if not tools:
        if choice == "auto":
            return ToolUse()
        what = repr(choice) if isinstance(choice, str) else "a named function"
        raise APIError(f"tool_choice {what} needs tools (the request offers none)", param="tool_choice")
    if parser is None:
        raise APIError("this server reads no tool calls: the model's chat template teaches no tool-call format "
                       "Ember knows; start the server with --tool-call-parser NAME, or send tool_choice 'none'",
                       param="tool_choice")
    template_tools = [t.model_dump(exclude_none=True) for t in tools]
    single = request.parallel_tool_calls is False
    if choice == "auto":
        return ToolUse(template_tools, parser, None, 1 if single else None)
    if choice == "required":
        forced = tools
    else:
        forced = [t for t in tools if t.function.name == choice.function.name]
        if not forced:
            names = ", ".join(repr(t.function.name) for t in tools)
            raise APIError(f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                           f"(offered: {names})", param="tool_choice")
        single = True
    specs = [ToolSpec(t.function.name, t.function.parameters_schema()) for t in forced]
    try:
        grammar = tool_calls_grammar(parser, specs, parallel=not single)
    except ValueError as e:
        raise APIError(f"tools: {e}", param="tools") from e
    return ToolUse(template_tools, parser, grammar, 1 if single else None)


def tool_call_results(calls: tuple[ParsedToolCall, ...]) -> list[ChatToolCallResult]:
    """Response ``tool_calls`` of ``calls``, each with a fresh id."""
    return [ChatToolCallResult(id=tool_call_id(), function=FunctionCallResult(name=c.name, arguments=c.arguments))
            for c in calls]


def finish_reason_with_calls(finish_reason: str | None, has_calls: bool) -> str | None:
    """``"tool_calls"`` for an answer with calls that the model ended itself."""
    return "tool_calls" if has_calls and finish_reason == "stop" else finish_reason


@dataclass(slots=True)
class ToolCallStream:
    """Tool calls of one streamed choice: feed it the answer's text deltas.

    Args:
        use: the request's :class:`ToolUse` (with a parser).
    """

    use: ToolUse
    text: str = ""  # the answer so far
    num_calls: int = 0  # calls sent so far

    def feed(self, delta_text: str, final: bool) -> tuple[str, list[list[DeltaToolCall]]]:
        """The content and the tool-call chunks that ``delta_text`` adds.

        Returns:
            ``(content_delta, chunks)``: each chunk is the ``delta.tool_calls`` of
            one stream event (a call's header, then its arguments).
        """
        assert self.use.parser is not None
        content, calls = self.use.parser.extract_tool_calls_streaming(self.text, delta_text, final)
        self.text += delta_text
        chunks: list[list[DeltaToolCall]] = []
        room = None if self.use.max_calls is None else self.use.max_calls - self.num_calls
        for call in calls if room is None else calls[:max(room, 0)]:
            index = self.num_calls
            self.num_calls += 1
            chunks.append([DeltaToolCall(index=index, id=tool_call_id(), type="function",
                                         function=DeltaFunctionCall(name=call.name, arguments=""))])
            chunks.append([DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=call.arguments))])
        return content, chunks
