"""``/v1/completions``, and the request plumbing it shares with chat.

A request goes: check the model name -> tokenize -> build SamplingParams -> check
lengths -> submit to the engine and await its first output -> answer (one JSON body,
or an SSE stream). Everything that can be the client's fault is checked before the
response starts, so a bad streaming request gets an HTTP 400, not a broken stream.

With ``n > 1`` the engine runs n completions of one prompt; ``choices[i]`` is
completion i, and a stream interleaves chunks of the n choices (each chunk
carries one choice and its ``index``; each choice gets its own chunk with a
``finish_reason``). ``usage.completion_tokens`` sums the n completions.

Log-probabilities are reported for the tokens of the returned text: every
generated token except a final stop token (EOS or one of ``stop_token_ids``),
which ends a completion without being part of its text (it still counts in
``usage.completion_tokens``). When a stop *string* ends a completion, the tokens
that produced it stay in the log-probabilities although the string is cut from
the text (as in vLLM). A token's text is the tokenizer's decoding of that one id
(special tokens included); its ``bytes`` are its raw bytes (see
:meth:`OpenAIServing.token_text`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse

from ember.entrypoints.openai.protocol import (
    APIError,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    UsageInfo,
    now,
    random_id,
)
from ember.outputs import CompletionOutput, RequestOutput, SampleLogprob
from ember.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
# OpenAI's stand-in for a log-probability of -inf (JSON has no infinity).
MIN_LOGPROB = -9999.0


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


async def guarded_stream(request_id: str, events: AsyncIterator[str],
                         rest: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    """Wrap a stream's SSE ``events``: a failure after the status line was sent is
    reported in-band (as vLLM does), the engine's output generator ``rest`` is
    always closed (which aborts an unfinished request), and ``[DONE]`` ends a
    stream that was not cut by the client."""
    try:
        async for event in events:
            yield event
    except Exception as e:
        logger.exception("stream %s failed", request_id)
        yield internal_error_event(e)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        await rest.aclose()  # type: ignore[attr-defined]
    yield SSE_DONE


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character map, with which byte-level BPE
    vocabularies (GPT-2, Llama 3, Qwen, SmolLM2) spell each byte as one character:
    printable Latin-1 bytes stand for themselves, the other bytes for 256, 257, ...
    in byte order (openai/gpt-2, ``src/encoder.py``, ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return {c: b for b, c in chars.items()}


_BYTE_DECODER = _gpt2_byte_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces


def _raw_token_bytes(tokenizer: Any, token_id: int) -> bytes | None:
    """The bytes a vocabulary entry stands for, when its spelling tells (byte-level
    BPE or a SentencePiece byte piece); else None."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    piece = convert(token_id) if convert is not None else None
    if not isinstance(piece, str) or not piece:
        return None
    if m := _BYTE_FALLBACK.fullmatch(piece):
        return bytes([int(m.group(1), 16)])
    if all(c in _BYTE_DECODER for c in piece):
        return bytes(_BYTE_DECODER[c] for c in piece)
    return None


def reported_logprobs(c: CompletionOutput, params: SamplingParams) -> list[SampleLogprob]:
    """The log-probabilities to report for ``c`` (one per token of ``c.token_ids``,
    less a final stop token, which is not part of the text; see the module doc).

    Raises:
        RuntimeError: the engine did not return one entry per token (an engine bug).
    """
    if c.logprobs is None or len(c.logprobs) != len(c.token_ids):
        got = "none" if c.logprobs is None else len(c.logprobs)
        raise RuntimeError(f"the engine returned {got} logprobs for {len(c.token_ids)} tokens")
    if (c.finish_reason == "stop" and not isinstance(c.stop_reason, str) and c.token_ids
            and c.token_ids[-1] in params.all_stop_token_ids):
        return c.logprobs[:-1]
    return c.logprobs


def finite_logprob(logprob: float) -> float:
    """``logprob`` with -inf (and NaN) as OpenAI's -9999.0, so the JSON stays valid."""
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB  # noqa: FURB136 (max() would keep NaN)


class OpenAIServing:
    """Shared request handling: model check, validation, submission to the engine.

    Args:
        engine: an ``AsyncLLM`` (or anything with its interface: ``model_config``,
            ``input_processor``, ``generate``, ``errored``, ``tokenizer``).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.model_name: str = engine.model_config.served_model_name
        self.max_model_len: int = engine.model_config.max_model_len
        self.tokenizer: Any = getattr(engine, "tokenizer", None)
        # At most one entry per vocabulary id.
        self._token_texts: dict[int, tuple[str, list[int]]] = {}

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """The text of one token and its raw bytes, for log-probabilities.

        The text is the tokenizer's decoding of ``[token_id]`` with special tokens
        kept. A token that holds only part of a multi-byte UTF-8 character decodes
        to U+FFFD; its bytes then come from its vocabulary spelling (byte-level BPE
        or SentencePiece byte pieces), so that the bytes of consecutive tokens join
        into the text's UTF-8 (what OpenAI's ``bytes`` field is for). Without a
        tokenizer the text is ``token_id:<id>`` (vLLM's spelling).

        Returns:
            ``(text, bytes)``, bytes as a list of ints in [0, 256).
        """
        cached = self._token_texts.get(token_id)
        if cached is not None:
            return cached
        if self.tokenizer is None:
            text, raw = f"token_id:{token_id}", None
        else:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw = _raw_token_bytes(self.tokenizer, token_id) if "\ufffd" in text else None
            if raw is not None and raw.decode("utf-8", errors="replace") != text:
                raw = None  # the spelling does not explain the decoded text: do not guess
        cached = self._token_texts[token_id] = (text, list(raw if raw is not None else text.encode()))
        return cached

    def sse_response(self, request_id: str, events: AsyncIterator[str],
                     rest: AsyncIterator[RequestOutput]) -> SSEResponse:
        """The streaming answer: ``events`` wrapped by :func:`guarded_stream`."""
        return SSEResponse(guarded_stream(request_id, events, rest))

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
                window, or ``prompt + max_tokens`` beyond it (as vLLM does); ``param``
                is the request field at fault, as the client spelled it (e.g.
                ``max_completion_tokens``).
        """
        budget_field = request.max_tokens_field()
        try:
            params = request.to_sampling_params(max_tokens)
        except ValueError as e:
            message = str(e)
            first_word = message.split(" ", 1)[0]
            if first_word == "max_tokens":  # SamplingParams' name for the budget, whatever the field
                first_word, message = budget_field, budget_field + message.removeprefix("max_tokens")
            raise APIError(message, param=first_word if first_word in type(request).model_fields else None) from e
        try:
            params = self.engine.input_processor.check(prompt_ids, params)
        except ValueError as e:
            raise APIError(str(e), param=prompt_param) from e
        n = len(prompt_ids)
        if max_tokens is not None and n + max_tokens > self.max_model_len:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens, but {n + max_tokens} "
                f"were requested ({n} in the {prompt_param}, {max_tokens} for the completion). "
                f"Shorten the {prompt_param} or lower {budget_field}.",
                param=budget_field,
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


async def final_outputs(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> list[CompletionOutput]:
    """The n finished completions of a non-streaming request, in index order
    (FINAL_ONLY: the last output, usually ``first``, holds them all)."""
    final = first
    async for out in rest:
        final = out
    return sorted(final.outputs, key=lambda c: c.index)


class OpenAIServingCompletion(OpenAIServing):
    """Answers ``POST /v1/completions``."""

    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | SSEResponse:
        """Raises APIError for invalid requests (before anything is sent)."""
        self.check_model(request.model)
        prompt = request.prompt
        prompt_ids = self.tokenize(lambda: self.engine.input_processor.tokenize(prompt), "prompt")
        params = self.make_params(request, prompt_ids, request.max_tokens, "prompt")
        echo = self._echo_text(request, prompt_ids) if request.echo else ""
        request_id = random_id("cmpl")
        first, rest = await self.start(prompt_ids, params, request_id, request.priority, request.cache_salt)
        if request.stream:
            events = self._stream(request_id, first, rest, params, len(prompt_ids), echo, request.include_usage)
            return self.sse_response(request_id, events, rest)
        outputs = await final_outputs(first, rest)
        return CompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[self._choice(c, params, echo, len(echo))[0] for c in outputs],
            usage=UsageInfo.of(len(prompt_ids), sum(len(c.token_ids) for c in outputs)),
        )

    def _echo_text(self, request: CompletionRequest, prompt_ids: list[int]) -> str:
        """The prompt as text: as given, or the decoded token ids (special tokens kept)."""
        if isinstance(request.prompt, str):
            return request.prompt
        if self.tokenizer is None:
            raise APIError("echo needs a tokenizer to turn the token-id prompt into text", param="echo")
        return self.tokenizer.decode(prompt_ids)

    def _choice(self, c: CompletionOutput, params: SamplingParams, prefix: str,
                text_offset: int) -> tuple[CompletionChoice, int]:
        """One choice (``prefix`` + the completion's text), and the text offset after it."""
        logprobs = None
        if params.logprobs is not None:
            logprobs, text_offset = self.completion_logprobs(reported_logprobs(c, params), params.logprobs,
                                                             text_offset)
        choice = CompletionChoice(index=c.index, text=prefix + c.text, logprobs=logprobs,
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        return choice, text_offset

    def completion_logprobs(self, entries: list[SampleLogprob], num_top: int,
                            text_offset: int) -> tuple[CompletionLogprobs, int]:
        """Legacy-completions ``logprobs`` of ``entries`` (see :class:`CompletionLogprobs`).

        ``top_logprobs[i]`` holds the ``num_top`` most likely tokens and the chosen
        one (OpenAI: "up to logprobs + 1 elements"); where two ids decode to the same
        text, the more likely one keeps the key.

        Args:
            text_offset: the character offset of the first entry's token.

        Returns:
            The logprobs, and the offset just after the last token.
        """
        out = CompletionLogprobs()
        for e in entries:
            text, _ = self.token_text(e.token_id)
            top: dict[str, float] = {}
            for token_id, logprob in e.top[:num_top]:
                top.setdefault(self.token_text(token_id)[0], finite_logprob(logprob))
            top.setdefault(text, finite_logprob(e.logprob))
            out.tokens.append(text)
            out.token_logprobs.append(finite_logprob(e.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(text_offset)
            text_offset += len(text)
        return out, text_offset

    async def _stream(self, request_id: str, first: RequestOutput, rest: AsyncIterator[RequestOutput],
                      params: SamplingParams, num_prompt_tokens: int, echo: str,
                      include_usage: bool) -> AsyncIterator[str]:
        created = now()
        num_output_tokens = 0
        text_offsets = [len(echo)] * params.n

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return sse_event(drop_null_usage(CompletionResponse(
                id=request_id, created=created, model=self.model_name, choices=choices, usage=usage).model_dump()))

        if echo:  # the prompt comes first in every choice
            for i in range(params.n):
                yield chunk([CompletionChoice(index=i, text=echo)])
        out: RequestOutput | None = first
        while out is not None:
            for c in out.outputs:
                num_output_tokens += len(c.token_ids)
                choice, text_offsets[c.index] = self._choice(c, params, "", text_offsets[c.index])
                if c.text or c.finish_reason is not None or (choice.logprobs is not None and choice.logprobs.tokens):
                    yield chunk([choice])
            out = await anext(rest, None)
        if include_usage:
            yield chunk([], UsageInfo.of(num_prompt_tokens, num_output_tokens))
