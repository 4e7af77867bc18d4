"""``/v1/chat/completions``: chat template, then the completion plumbing.

Streaming follows OpenAI's chunk sequence: for each of the n choices a first
chunk with ``delta.role = "assistant"``, then one chunk per engine step and choice
with new text in ``delta.content`` (and its tokens' ``logprobs``); a step that
ends a choice sends its last text (``""`` when none) in the chunk that carries
``finish_reason`` (as vLLM places it); then an optional
usage chunk (``stream_options.include_usage``; ``choices`` is empty there, the
completion tokens sum the n choices), then ``[DONE]``. With
``stream_options.continuous_usage_stats`` every choice chunk carries ``usage``
too: the prompt's tokens and the tokens its choice generated so far. Every choice chunk carries
its ``index``. Which tokens get log-probabilities: see
:mod:`ember.entrypoints.openai.serving_completion`.

With a reasoning parser (``--reasoning-parser``), the text between ``<think>``
and ``</think>`` goes to ``message.reasoning_content`` / ``delta.reasoning_content``
instead of ``content`` (see :mod:`ember.reasoning`).

With ``tools``, the tool parser reads calls from the answer (the content after
any reasoning) into ``message.tool_calls`` / ``delta.tool_calls`` (see
:mod:`ember.entrypoints.openai.tool_calls`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ember.entrypoints.openai.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    DeltaMessage,
    DeltaToolCall,
    UsageInfo,
    now,
    random_id,
)
from ember.entrypoints.openai.input_limits import messages_chars
from ember.entrypoints.openai.tool_calls import (
    ToolCallStream,
    ToolUse,
    finish_reason_with_calls,
    resolve_tool_use,
    tool_call_results,
)
from ember.entrypoints.openai.serving_completion import (
    OpenAIServing,
    SSEResponse,
    drop_null_usage,
    finite_logprob,
    no_more_outputs,
    reported_logprobs,
    sse_event,
)
from ember.outputs import CompletionOutput, RequestOutput, SampleLogprob
from ember.reasoning import ReasoningParser, get_reasoning_parser
from ember.sampling_params import SamplingParams
from ember.tool_parsers import ToolParser, get_tool_parser, tool_parser_for_chat_template


class OpenAIServingChat(OpenAIServing):
    """Answers ``POST /v1/chat/completions``.

    Args:
        engine: see :class:`OpenAIServing`.
        reasoning_parser: name of a registered reasoning parser, or None.
        tool_call_parser: name of a registered tool parser; None: the one the
            model's chat template teaches (none if it teaches no known format).
    Raises:
        ValueError: unknown parser name.
    """

    def __init__(self, engine: Any, reasoning_parser: str | None = None,
                 tool_call_parser: str | None = None) -> None:
        super().__init__(engine)
        self.reasoning_parser: ReasoningParser | None = (
            get_reasoning_parser(reasoning_parser) if reasoning_parser else None)
        tool_call_parser = tool_call_parser or tool_parser_for_chat_template(
            getattr(self.tokenizer, "chat_template", None))
        self.tool_parser: ToolParser | None = get_tool_parser(tool_call_parser) if tool_call_parser else None

    def _choice(self, c: CompletionOutput, params: SamplingParams, tool_use: ToolUse,
                as_ids: bool = False) -> ChatCompletionChoice:
        reasoning, content = None, c.text
        if self.reasoning_parser is not None:
            reasoning, content = self.reasoning_parser.extract_reasoning(c.text)
        tool_calls = None
        finish_reason = c.finish_reason
        if tool_use.parser is not None:
            parsed = tool_use.parser.extract_tool_calls(content or "")
            content = parsed.content or None
            calls = tool_use.calls_of(parsed.calls)
            tool_calls = tool_call_results(calls) or None
            finish_reason = finish_reason_with_calls(c.finish_reason, bool(calls))
        message = ChatResponseMessage(content=content, reasoning_content=reasoning, tool_calls=tool_calls)
        return ChatCompletionChoice(index=c.index, message=message, logprobs=self._logprobs(c, params, as_ids),
                                    finish_reason=finish_reason, stop_reason=c.stop_reason)

    async def create_chat_completion(self, request: ChatCompletionRequest, request_id: str | None = None
                                     ) -> ChatCompletionResponse | SSEResponse:
        """Raises APIError for invalid requests (before anything is sent).

        Args:
            request_id: the client's id for the request (``X-Request-Id``); the
                engine request and the response are named ``chatcmpl-<request_id>``.
        """
        self.check_request(request)
        tool_use = resolve_tool_use(request, self.tool_parser)
        messages = request.message_dicts()
        options = request.template_options()
        prompt_ids = await self.tokenize(
            lambda: self.engine.input_processor.apply_chat_template(
                messages, tools=tool_use.template_tools or None,
                special_tokens_in_content=self.special_tokens_in_content, **options),
            "messages", messages_chars(messages) + tool_use.num_chars)
        prompt_ids = self.prompt_ids_for(request, prompt_ids, request.resolved_max_tokens())
        params = self.make_params(request, prompt_ids, request.resolved_max_tokens(), "messages")
        tool_use.constrain(params, request.use_beam_search)
        if self.reasoning_parser is not None and params.structured_outputs is not None:
            # The reasoning stays free; the constraint applies to the answer.
            params.structured_outputs.reasoning = self.reasoning_parser.structured_output_reasoning
        request_id = f"chatcmpl-{request_id}" if request_id else random_id("chatcmpl")
        if request.use_beam_search:
            (first,) = await self.beam_search_all([(prompt_ids, request.to_beam_search_params(params))], [request_id],
                                                  request.priority, request.cache_salt)
            rest = no_more_outputs()
        else:
            first, rest = await self.start(prompt_ids, params, request_id, request.priority, request.cache_salt)
        as_ids = request.return_tokens_as_token_ids
        if request.stream:
            events = self._stream(request_id, first, rest, params, len(prompt_ids), request.include_usage,
                                  request.continuous_usage, as_ids, tool_use)
            return self.sse_response(request_id, events, rest)
        final = first
        async for out in rest:
            final = out
        outputs = sorted(final.outputs, key=lambda c: c.index)
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[self._choice(c, params, tool_use, as_ids) for c in outputs],
            usage=UsageInfo.of(len(prompt_ids), sum(len(c.token_ids) for c in outputs)),
            prompt_logprobs=self.prompt_logprobs(final.prompt_logprobs, request.num_prompt_logprobs()),
        )

    def _logprobs(self, c: CompletionOutput, params: SamplingParams, as_ids: bool = False) -> ChatChoiceLogprobs | None:
        if params.logprobs is None:
            return None
        return self.chat_logprobs(reported_logprobs(c, params), params.logprobs, as_ids)

    def chat_logprobs(self, entries: list[SampleLogprob], num_top: int, as_ids: bool = False) -> ChatChoiceLogprobs:
        """Chat ``logprobs`` of ``entries``: each chosen token with its text (or
        ``token_id:<id>`` with ``as_ids``), logprob and bytes (of its text), and
        the ``num_top`` most likely tokens at its position."""
        def top(token_id: int, logprob: float) -> ChatTopLogprob:
            _, raw = self.token_text(token_id)
            return ChatTopLogprob(token=self.shown_token(token_id, as_ids), logprob=finite_logprob(logprob), bytes=raw)

        content = []
        for e in entries:
            chosen = top(e.token_id, e.logprob)
            content.append(ChatTokenLogprob(token=chosen.token, logprob=chosen.logprob, bytes=chosen.bytes,
                                            top_logprobs=[top(t, lp) for t, lp in e.top[:num_top]]))
        return ChatChoiceLogprobs(content=content)

    async def _stream(self, request_id: str, first: RequestOutput, rest: AsyncIterator[RequestOutput],
                      params: SamplingParams, num_prompt_tokens: int, include_usage: bool,
                      continuous_usage: bool = False, as_ids: bool = False,
                      tool_use: ToolUse | None = None) -> AsyncIterator[str]:
        created = now()
        num_output_tokens = 0
        choice_tokens = [0] * params.n  # per choice, for continuous usage
        previous_texts = [""] * params.n  # per choice, for the reasoning parser
        tool_streams = ([ToolCallStream(tool_use) for _ in range(params.n)]
                        if tool_use is not None and tool_use.parser is not None else None)

        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
            body: dict[str, Any] = ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.model_name, choices=choices, usage=usage).model_dump()
            for choice in body["choices"]:  # a delta carries only what it sets
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            return sse_event(drop_null_usage(body))

        def delta(index: int, content: str | None = None, finish_reason: str | None = None,
                  stop_reason: Any = None, role: str | None = None, reasoning_content: str | None = None,
                  logprobs: ChatChoiceLogprobs | None = None, tool_calls: list[DeltaToolCall] | None = None) -> str:
            message = DeltaMessage(role=role, content=content, reasoning_content=reasoning_content,
                                   tool_calls=tool_calls)
            usage = UsageInfo.of(num_prompt_tokens, choice_tokens[index]) if continuous_usage else None
            return chunk([ChatCompletionStreamChoice(index=index, delta=message, logprobs=logprobs,
                                                     finish_reason=finish_reason, stop_reason=stop_reason)], usage)

        for i in range(params.n):
            yield delta(i, role="assistant", content="")
        out: RequestOutput | None = first
        while out is not None:
            for c in out.outputs:
                num_output_tokens += len(c.token_ids)
                choice_tokens[c.index] += len(c.token_ids)
                logprobs = self._logprobs(c, params, as_ids)
                if self.reasoning_parser is not None:
                    reasoning, content = self.reasoning_parser.extract_reasoning_streaming(
                        previous_texts[c.index], c.text, final=c.finish_reason is not None)
                    previous_texts[c.index] += c.text
                else:
                    reasoning, content = None, c.text or None
                finished = c.finish_reason is not None
                call_chunks: list[list[DeltaToolCall]] = []
                finish_reason = c.finish_reason
                if tool_streams is not None:
                    content, call_chunks = tool_streams[c.index].feed(content or "", final=finished)
                    content = content or None
                    if finished:
                        finish_reason = finish_reason_with_calls(finish_reason, tool_streams[c.index].num_calls > 0)
                has_text = bool(reasoning or content or (logprobs is not None and logprobs.content))
                if has_text or (finished and not call_chunks):
                    # Tokens whose text is still held back (a partial character, a
                    # possible stop string or tool call) send their logprobs with an
                    # empty content; so does a last step without text (an EOS token).
                    # The finish reason rides on the step's last chunk.
                    if not reasoning and not content:
                        content = ""
                    last = finished and not call_chunks
                    yield delta(c.index, content=content, reasoning_content=reasoning, logprobs=logprobs,
                                finish_reason=finish_reason if last else None,
                                stop_reason=c.stop_reason if last else None)
                for j, calls in enumerate(call_chunks):
                    last = finished and j == len(call_chunks) - 1
                    yield delta(c.index, tool_calls=calls, finish_reason=finish_reason if last else None,
                                stop_reason=c.stop_reason if last else None)
            out = await anext(rest, None)
        if include_usage:
            yield chunk([], UsageInfo.of(num_prompt_tokens, num_output_tokens))
