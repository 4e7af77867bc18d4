"""``/v1/completions``, and the request plumbing it shares with chat.

A request goes: check the model name -> tokenize -> build SamplingParams -> check
lengths -> submit to the engine and await its first output -> answer (one JSON body,
or an SSE stream). Everything that can be the client's fault is checked before the
response starts, so a bad streaming request gets an HTTP 400, not a broken stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse

from ember.entrypoints.openai.protocol import (
    APIError,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    UsageInfo,
    now,
    random_id,
)
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def drop_null_usage(chunk: dict[str, Any]) -> dict[str, Any]:
    """Stream chunks carry ``usage`` only in the last one (``stream_options.include_usage``)."""
    if chunk.get("usage", 0) is None:
        del chunk["usage"]
    return chunk


class SSEResponse(StreamingResponse):
    """``text/event-stream`` response that always closes its body iterator.

    NOTE: closing the iterator closes the engine's output generator, which aborts the
    request; Starlette alone leaves it to the garbage collector when the client goes.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def internal_error_event(exc: BaseException) -> str:
    """The SSE event sent when a stream fails after it started (HTTP 200 already sent)."""
    err = APIError(f"internal error: {type(exc).__name__}: {exc}", 500, type="internal_server_error")
    return sse_event(err.body.model_dump())


class OpenAIServing:
    """Shared request handling: model check, validation, submission to the engine.

    Args:
        engine: an ``AsyncLLM`` (or anything with its interface: ``model_config``,
            ``input_processor``, ``generate``, ``errored``).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.model_name: str = engine.model_config.served_model_name
        self.max_model_len: int = engine.model_config.max_model_len

    def check_model(self, model: str | None) -> None:
        """Raises APIError (400, ``model_not_found``) unless ``model`` is ours or None."""
        if model is not None and model != self.model_name:
            raise APIError(
                f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                param="model", code="model_not_found",
            )

    @staticmethod
    def tokenize(fn: Callable[[], list[int]], param: str) -> list[int]:
        """Run a tokenizing call; its ValueError becomes a 400 naming ``param``."""
        try:
            return fn()
        except ValueError as e:
            raise APIError(str(e), param=param) from e

    def make_params(self, request: SamplingFields, prompt_ids: list[int], max_tokens: int | None,
                    prompt_param: str) -> SamplingParams:
        """SamplingParams for ``request``, with every length limit checked.

        Raises:
            APIError: 400 for an invalid sampling value, a prompt that fills the context
                window, or ``prompt + max_tokens`` beyond it (as vLLM does).
        """
        try:
            params = request.to_sampling_params(max_tokens)
        except ValueError as e:
            first_word = str(e).split(" ", 1)[0]
            raise APIError(str(e), param=first_word if first_word in type(request).model_fields else None) from e
        try:
            params = self.engine.input_processor.check(prompt_ids, params)
        except ValueError as e:
            raise APIError(str(e), param=prompt_param) from e
        n = len(prompt_ids)
        if max_tokens is not None and n + max_tokens > self.max_model_len:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens, but {n + max_tokens} "
                f"were requested ({n} in the {prompt_param}, {max_tokens} for the completion). "
                f"Shorten the {prompt_param} or lower max_tokens.",
                param="max_tokens",
            )
        return params

    async def start(self, prompt_ids: list[int], params: SamplingParams, request_id: str, priority: int = 0,
                    cache_salt: str | None = None) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
        """Submit a request and wait for its first output.

        Waiting for the first output means that a request the engine rejects gets a
        proper HTTP error even when streaming (the status line is not sent yet).

        Returns:
            ``(first_output, rest)``; the caller must exhaust or ``aclose()`` ``rest``.

        Raises:
            APIError: 400 when the engine rejects the input, 503 when it is not running.
        """
        if getattr(self.engine, "errored", False):
            raise APIError("the engine is not running (it stopped after an error)", 503, type="server_error")
        # Only non-default scheduling fields are passed, so engines without them keep working.
        extra: dict[str, Any] = {}
        if priority != 0:
            extra["priority"] = priority
        if cache_salt is not None:
            extra["cache_salt"] = cache_salt
        gen = self.engine.generate(prompt_ids, params, request_id, **extra)
        try:
            first = await anext(gen)
        except ValueError as e:
            raise APIError(str(e)) from e
        except StopAsyncIteration:
            raise APIError("the engine returned no output", 500, type="internal_server_error") from None
        except BaseException:
            await gen.aclose()  # aborts the request (client gone, or an internal error)
            raise
        return first, gen


async def final_output(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> CompletionOutput:
    """The finished completion of a non-streaming request (FINAL_ONLY: usually ``first``)."""
    final = first
    async for out in rest:
        final = out
    return final.outputs[0]


class OpenAIServingCompletion(OpenAIServing):
    """Answers ``POST /v1/completions``."""

    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | SSEResponse:
        """Raises APIError for invalid requests (before anything is sent)."""
        self.check_model(request.model)
        prompt = request.prompt
        prompt_ids = self.tokenize(lambda: self.engine.input_processor.tokenize(prompt), "prompt")
        params = self.make_params(request, prompt_ids, request.max_tokens, "prompt")
        request_id = random_id("cmpl")
        first, rest = await self.start(prompt_ids, params, request_id, request.priority, request.cache_salt)
        if request.stream:
            return SSEResponse(self._stream(request_id, first, rest, len(prompt_ids), request.include_usage))
        out = await final_output(first, rest)
        return CompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[CompletionChoice(index=0, text=out.text, finish_reason=out.finish_reason,
                                      stop_reason=out.stop_reason)],
            usage=UsageInfo.of(len(prompt_ids), len(out.token_ids)),
        )

    async def _stream(self, request_id: str, first: RequestOutput, rest: AsyncIterator[RequestOutput],
                      num_prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        created = now()
        num_output_tokens = 0

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return sse_event(drop_null_usage(CompletionResponse(
                id=request_id, created=created, model=self.model_name, choices=choices, usage=usage).model_dump()))

        try:
            out: RequestOutput | None = first
            while out is not None:
                c = out.outputs[0]
                num_output_tokens += len(c.token_ids)
                if c.text or c.finish_reason is not None:
                    yield chunk([CompletionChoice(index=0, text=c.text, finish_reason=c.finish_reason,
                                                  stop_reason=c.stop_reason)])
                out = await anext(rest, None)
            if include_usage:
                yield chunk([], UsageInfo.of(num_prompt_tokens, num_output_tokens))
        except Exception as e:  # the status line is sent: report in-band, as vLLM does
            logger.exception("completion stream %s failed", request_id)
            yield internal_error_event(e)
        finally:
            await rest.aclose()
        yield SSE_DONE
