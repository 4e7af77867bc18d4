"""``/v1/chat/completions``: chat template, then the completion plumbing.

Streaming follows OpenAI's chunk sequence: for each of the n choices a first
chunk with ``delta.role = "assistant"``, then one chunk per engine step and choice
with new text in ``delta.content`` (and its tokens' ``logprobs``), and for each
choice a last chunk with an empty delta and ``finish_reason``; then an optional
usage chunk (``stream_options.include_usage``; ``choices`` is empty there, the
completion tokens sum the n choices), then ``[DONE]``. With
``stream_options.continuous_usage_stats`` every choice chunk carries ``usage``
too: the prompt's tokens and the tokens its choice generated so far. Every choice chunk carries
its ``index``. Which tokens get log-probabilities: see
:mod:`ember.entrypoints.openai.serving_completion`.

With a reasoning parser (``--reasoning-parser``), the text between ``<think>``
and ``</think>`` goes to ``message.reasoning_content`` / ``delta.reasoning_content``
instead of ``content`` (see :mod:`ember.reasoning`).
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
    UsageInfo,
    now,
    random_id,
)
from ember.entrypoints.openai.input_limits import messages_chars
from ember.entrypoints.openai.serving_completion import (
    OpenAIServing,
    SSEResponse,
    drop_null_usage,
    final_outputs,
    finite_logprob,
    reported_logprobs,
    sse_event,
)
from ember.outputs import CompletionOutput, RequestOutput, SampleLogprob
from ember.reasoning import ReasoningParser, get_reasoning_parser
from ember.sampling_params import SamplingParams


class OpenAIServingChat(OpenAIServing):
    """Answers ``POST /v1/chat/completions``.

    Args:
        engine: see :class:`OpenAIServing`.
        reasoning_parser: name of a registered reasoning parser, or None.
    Raises:
        ValueError: unknown parser name.
    """

    def __init__(self, engine: Any, reasoning_parser: str | None = None) -> None:
        super().__init__(engine)
        self.reasoning_parser: ReasoningParser | None = (
            get_reasoning_parser(reasoning_parser) if reasoning_parser else None)

    def _message(self, text: str) -> ChatResponseMessage:
        if self.reasoning_parser is None:
            return ChatResponseMessage(content=text)
        reasoning, content = self.reasoning_parser.extract_reasoning(text)
        return ChatResponseMessage(content=content, reasoning_content=reasoning)

    async def create_chat_completion(self, request: ChatCompletionRequest, request_id: str | None = None
                                     ) -> ChatCompletionResponse | SSEResponse:
        """Raises APIError for invalid requests (before anything is sent).

        Args:
            request_id: the client's id for the request (``X-Request-Id``); the
                engine request and the response are named ``chatcmpl-<request_id>``.
        """
        self.check_model(request.model)
        messages = request.message_dicts()
        options = request.template_options()
        prompt_ids = await self.tokenize(lambda: self.engine.input_processor.apply_chat_template(messages, **options),
                                         "messages", messages_chars(messages))
        params = self.make_params(request, prompt_ids, request.resolved_max_tokens(), "messages")
        request_id = f"chatcmpl-{request_id}" if request_id else random_id("chatcmpl")
        first, rest = await self.start(prompt_ids, params, request_id, request.priority, request.cache_salt)
        if request.stream:
            events = self._stream(request_id, first, rest, params, len(prompt_ids), request.include_usage,
                                  request.continuous_usage)
            return self.sse_response(request_id, events, rest)
        outputs = await final_outputs(first, rest)
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[ChatCompletionChoice(index=c.index, message=self._message(c.text),
                                          logprobs=self._logprobs(c, params), finish_reason=c.finish_reason,
                                          stop_reason=c.stop_reason) for c in outputs],
            usage=UsageInfo.of(len(prompt_ids), sum(len(c.token_ids) for c in outputs)),
        )

    def _logprobs(self, c: CompletionOutput, params: SamplingParams) -> ChatChoiceLogprobs | None:
        if params.logprobs is None:
            return None
        return self.chat_logprobs(reported_logprobs(c, params), params.logprobs)

    def chat_logprobs(self, entries: list[SampleLogprob], num_top: int) -> ChatChoiceLogprobs:
        """Chat ``logprobs`` of ``entries``: each chosen token with its text, logprob
        and bytes, and the ``num_top`` most likely tokens at its position."""
        def top(token_id: int, logprob: float) -> ChatTopLogprob:
            text, raw = self.token_text(token_id)
            return ChatTopLogprob(token=text, logprob=finite_logprob(logprob), bytes=raw)

        content = []
        for e in entries:
            chosen = top(e.token_id, e.logprob)
            content.append(ChatTokenLogprob(token=chosen.token, logprob=chosen.logprob, bytes=chosen.bytes,
                                            top_logprobs=[top(t, lp) for t, lp in e.top[:num_top]]))
        return ChatChoiceLogprobs(content=content)

    async def _stream(self, request_id: str, first: RequestOutput, rest: AsyncIterator[RequestOutput],
                      params: SamplingParams, num_prompt_tokens: int, include_usage: bool,
                      continuous_usage: bool = False) -> AsyncIterator[str]:
        created = now()
        num_output_tokens = 0
        choice_tokens = [0] * params.n  # per choice, for continuous usage
        previous_texts = [""] * params.n  # per choice, for the reasoning parser

        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
            body: dict[str, Any] = ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.model_name, choices=choices, usage=usage).model_dump()
            for choice in body["choices"]:  # a delta carries only what it sets
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            return sse_event(drop_null_usage(body))

        def delta(index: int, content: str | None = None, finish_reason: str | None = None,
                  stop_reason: Any = None, role: str | None = None, reasoning_content: str | None = None,
                  logprobs: ChatChoiceLogprobs | None = None) -> str:
            message = DeltaMessage(role=role, content=content, reasoning_content=reasoning_content)
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
                logprobs = self._logprobs(c, params)
                if self.reasoning_parser is not None:
                    reasoning, content = self.reasoning_parser.extract_reasoning_streaming(
                        previous_texts[c.index], c.text, final=c.finish_reason is not None)
                    previous_texts[c.index] += c.text
                else:
                    reasoning, content = None, c.text or None
                if reasoning or content or (logprobs is not None and logprobs.content):
                    # Tokens whose text is still held back (a partial character or a
                    # possible stop string) send their logprobs with an empty content.
                    if not reasoning and not content:
                        content = ""
                    yield delta(c.index, content=content, reasoning_content=reasoning, logprobs=logprobs)
                if c.finish_reason is not None:
                    yield delta(c.index, finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            out = await anext(rest, None)
        if include_usage:
            yield chunk([], UsageInfo.of(num_prompt_tokens, num_output_tokens))
