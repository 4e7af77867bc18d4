"""``/v1/chat/completions``: chat template, then the completion plumbing.

Streaming follows OpenAI's chunk sequence: a first chunk with ``delta.role =
"assistant"``, one chunk per engine step with new text in ``delta.content``, a last
chunk with an empty delta and ``finish_reason``, an optional usage chunk
(``stream_options.include_usage``; ``choices`` is empty there), then ``[DONE]``.

With a reasoning parser (``--reasoning-parser``), the text between ``<think>``
and ``</think>`` goes to ``message.reasoning_content`` / ``delta.reasoning_content``
instead of ``content`` (see :mod:`ember.reasoning`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ember.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
    now,
    random_id,
)
from ember.entrypoints.openai.serving_completion import (
    SSE_DONE,
    OpenAIServing,
    SSEResponse,
    drop_null_usage,
    final_output,
    internal_error_event,
    sse_event,
)
from ember.outputs import RequestOutput
from ember.reasoning import ReasoningParser, get_reasoning_parser

logger = logging.getLogger(__name__)


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

    async def create_chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse | SSEResponse:
        """Raises APIError for invalid requests (before anything is sent)."""
        self.check_model(request.model)
        messages = request.message_dicts()
        prompt_ids = self.tokenize(lambda: self.engine.input_processor.apply_chat_template(messages), "messages")
        params = self.make_params(request, prompt_ids, request.resolved_max_tokens(), "messages")
        request_id = random_id("chatcmpl")
        first, rest = await self.start(prompt_ids, params, request_id, request.priority, request.cache_salt)
        if request.stream:
            return SSEResponse(self._stream(request_id, first, rest, len(prompt_ids), request.include_usage))
        out = await final_output(first, rest)
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[ChatCompletionChoice(index=0, message=self._message(out.text),
                                          finish_reason=out.finish_reason, stop_reason=out.stop_reason)],
            usage=UsageInfo.of(len(prompt_ids), len(out.token_ids)),
        )

    async def _stream(self, request_id: str, first: RequestOutput, rest: AsyncIterator[RequestOutput],
                      num_prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        created = now()
        num_output_tokens = 0
        previous_text = ""

        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
            body: dict[str, Any] = ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.model_name, choices=choices, usage=usage).model_dump()
            for choice in body["choices"]:  # a delta carries only what it sets
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            return sse_event(drop_null_usage(body))

        def delta(content: str | None = None, finish_reason: str | None = None, stop_reason: Any = None,
                  role: str | None = None, reasoning_content: str | None = None) -> str:
            message = DeltaMessage(role=role, content=content, reasoning_content=reasoning_content)
            return chunk([ChatCompletionStreamChoice(index=0, delta=message, finish_reason=finish_reason,
                                                     stop_reason=stop_reason)])

        try:
            yield delta(role="assistant", content="")
            out: RequestOutput | None = first
            while out is not None:
                c = out.outputs[0]
                num_output_tokens += len(c.token_ids)
                if self.reasoning_parser is not None:
                    reasoning, content = self.reasoning_parser.extract_reasoning_streaming(
                        previous_text, c.text, final=c.finish_reason is not None)
                    previous_text += c.text
                    if reasoning or content:
                        yield delta(content=content, reasoning_content=reasoning)
                elif c.text:
                    yield delta(content=c.text)
                if c.finish_reason is not None:
                    yield delta(finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                out = await anext(rest, None)
            if include_usage:
                yield chunk([], UsageInfo.of(num_prompt_tokens, num_output_tokens))
        except Exception as e:  # the status line is sent: report in-band, as vLLM does
            logger.exception("chat stream %s failed", request_id)
            yield internal_error_event(e)
        finally:
            await rest.aclose()
        yield SSE_DONE
