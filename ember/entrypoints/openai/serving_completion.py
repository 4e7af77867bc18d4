"""``/v1/completions``, and the request plumbing it shares with chat.

A request goes: check the model name -> tokenize -> build SamplingParams -> check
lengths -> submit to the engine and await its first output -> answer (one JSON body,
or an SSE stream). Everything that can be the client's fault is checked before the
response starts, so a bad streaming request gets an HTTP 400, not a broken stream.

With ``n > 1`` the engine runs n completions of one prompt; ``choices[i]`` is
completion i, and a stream interleaves chunks of the n choices (each chunk
carries one choice and its ``index``; each choice gets its own chunk with a
``finish_reason``). ``usage.completion_tokens`` sums the n completions.

A batch of prompts (``/v1/completions`` with a list of strings or of token-id
lists) is the same, one level up: every prompt is checked before any is
submitted, then each becomes its own engine request, all running concurrently;
prompt p's completion i is choice ``p * n + i`` (as OpenAI numbers them), a
stream interleaves the chunks of all prompts as they come
(:class:`MergedOutputs`), and ``usage`` sums over prompts and choices. One prompt
is a batch of one. When one prompt's request fails, or the client goes, or the
server ends the request (timeout, shutdown), every prompt's engine request is
aborted.

With ``use_beam_search`` (vLLM's extra; chat too) each prompt runs a beam search
of width ``n`` (``AsyncLLM.beam_search``) and its ``n`` choices are the finished
sequences, best score first. The search ends before anything is sent: a stream
then carries each choice's whole text in one chunk (as vLLM streams it).

Log-probabilities are reported for the tokens of the returned text: every
generated token except a final stop token (EOS or one of ``stop_token_ids``),
which ends a completion without being part of its text (it still counts in
``usage.completion_tokens``). When a stop *string* ends a completion, the tokens
that produced it stay in the log-probabilities although the string is cut from
the text (as in vLLM). A token's text is the tokenizer's decoding of that one id
(special tokens included); its ``bytes`` are its raw bytes (see
:meth:`OpenAIServing.token_text`). A completion's ``text_offset`` counts only
text the choice holds: a special token left out of the text
(``skip_special_tokens``, the default) does not advance it. With
``return_tokens_as_token_ids`` every token of a logprobs field is spelled
``token_id:<id>`` instead (its offsets still count its text). With
``include_stop_str_in_output`` a final stop token is part of the text, and of
the log-probabilities.

``prompt_logprobs`` (not with streaming) puts vLLM's prompt log-probabilities
(:data:`~ember.entrypoints.openai.protocol.PromptLogprobs`) in every choice of
a completion and at the top of a chat completion. ``truncate_prompt_tokens``
cuts the prompt to its last tokens before anything else checks it (``usage``
counts what is left).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import StreamingResponse

from ember.beam_search import BeamSearchParams
from ember.engine.async_llm import gather_or_cancel
from ember.engine.input_processor import ChatTemplateError
from ember.entrypoints.openai.input_limits import (
    DEFAULT_MAX_STOP_STRING_CHARS,
    DEFAULT_MAX_STOP_STRINGS,
    check_prompt_chars,
    check_stop_strings,
    run_input_work,
)
from ember.entrypoints.openai.protocol import (
    MAX_COMPLETIONS_PER_REQUEST,
    APIError,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprob,
    PromptLogprobs,
    SamplingFields,
    UsageInfo,
    now,
    random_id,
)
from ember.entrypoints.openai.supervisor import engine_dead_cause
from ember.outputs import CompletionOutput, RequestOutput, SampleLogprob
from ember.sampling_params import SamplingParams
from ember.structured_output.grammar import validate_structured_outputs

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
# OpenAI's stand-in for a log-probability of -inf (JSON has no infinity).
MIN_LOGPROB = -9999.0


def sse_event(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def drop_null_usage(chunk: dict[str, Any]) -> dict[str, Any]:
    """A stream chunk without ``usage`` leaves the field out (only the last chunk has
    it with ``stream_options.include_usage``; every chunk with ``continuous_usage_stats``)."""
    if chunk.get("usage", 0) is None:
        del chunk["usage"]
    return chunk


class SSEResponse(StreamingResponse):
    """``text/event-stream`` response that always closes its body iterator.

    NOTE: closing the iterator closes the engine's output generator, which aborts the
    request; Starlette alone leaves it to the garbage collector when the client goes.
    The engine's outputs ``rest`` are closed here too, for a body that never
    started (closing an unstarted generator does not run its ``finally``).
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], rest: AsyncIterator[Any] | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.rest = rest

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            if self.rest is not None:
                await self.rest.aclose()  # type: ignore[attr-defined]


def internal_error_event(exc: BaseException) -> str:
    """The SSE event sent when a stream fails after it started (HTTP 200 already sent)."""
    err = APIError(f"internal error: {type(exc).__name__}: {exc}", 500, type="internal_server_error")
    return sse_event(err.body.model_dump())


async def guarded_stream(request_id: str, events: AsyncIterator[str], rest: AsyncIterator[Any]) -> AsyncIterator[str]:
    """Wrap a stream's SSE ``events``: a failure after the status line was sent is
    reported in-band (as vLLM does), the engine's outputs ``rest`` (a generator or
    :class:`MergedOutputs`) are always closed (which aborts unfinished requests),
    and ``[DONE]`` ends a stream that was not cut by the client."""
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
            and c.token_ids[-1] in params.all_stop_token_ids and not params.include_stop_str_in_output):
        return c.logprobs[:-1]
    return c.logprobs


def finite_logprob(logprob: float) -> float:
    """``logprob`` with -inf (and NaN) as OpenAI's -9999.0, so the JSON stays valid."""
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB  # noqa: FURB136 (max() would keep NaN)


def check_structured_outputs(request: SamplingFields, params: SamplingParams) -> None:
    """Validate the request's output constraint in the API process, before the
    engine sees it (the grammar is parsed; no token tables are built).

    Raises:
        APIError: 400 naming the field (``response_format`` or
            ``structured_outputs``) and the problem: an invalid JSON schema,
            an unsupported schema keyword, an invalid regex or EBNF grammar.
    """
    field = request.structured_outputs_field()
    try:
        validate_structured_outputs(params.structured_outputs)
    except ValueError as e:
        message = str(e)
        if field == "response_format":
            message = message.replace("structured_outputs.json", "response_format.json_schema.schema")
        raise APIError(message, param=field) from e


class OpenAIServing:
    """Shared request handling: model check, validation, submission to the engine.

    Args:
        engine: an ``AsyncLLM`` (or anything with its interface: ``model_config``,
            ``input_processor``, ``generate``, ``errored``, ``tokenizer``).

    ``max_stop_strings`` and ``max_stop_string_chars`` bound a request's ``stop``
    (see :func:`check_stop_strings`); ``special_tokens_in_content`` lets chat
    messages' special-token strings become control tokens. The server sets them
    from its flags.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.max_stop_strings = DEFAULT_MAX_STOP_STRINGS
        self.max_stop_string_chars = DEFAULT_MAX_STOP_STRING_CHARS
        self.special_tokens_in_content = False
        self.model_name: str = engine.model_config.served_model_name
        self.max_model_len: int = engine.model_config.max_model_len
        self.tokenizer: Any = getattr(engine, "tokenizer", None)
        # At most one entry per vocabulary id.
        self._token_texts: dict[int, tuple[str, list[int]]] = {}
        self._special: dict[int, bool] = {}  # likewise

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

    def shown_token(self, token_id: int, as_ids: bool) -> str:
        """How a logprobs field spells a token: its text, or ``token_id:<id>``
        (``return_tokens_as_token_ids``)."""
        return f"token_id:{token_id}" if as_ids else self.token_text(token_id)[0]

    def prompt_logprobs(self, entries: list[SampleLogprob | None] | None, num_top: int | None) -> PromptLogprobs | None:
        """vLLM's ``prompt_logprobs`` of a request's prompt (see
        :data:`~ember.entrypoints.openai.protocol.PromptLogprobs`): each prompt
        token, then its ``num_top`` most likely alternatives (where one of them
        is the token itself, it appears once)."""
        if entries is None or num_top is None:
            return None
        out: PromptLogprobs = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            ranked = {e.token_id: PromptLogprob(logprob=finite_logprob(e.logprob), rank=e.rank,
                                                decoded_token=self.token_text(e.token_id)[0])}
            for rank, (token_id, logprob) in enumerate(e.top[:num_top], 1):
                if token_id not in ranked:
                    ranked[token_id] = PromptLogprob(logprob=finite_logprob(logprob), rank=rank,
                                                     decoded_token=self.token_text(token_id)[0])
            out.append(ranked)
        return out

    def prompt_ids_for(self, request: SamplingFields, prompt_ids: list[int], max_tokens: int | None) -> list[int]:
        """``prompt_ids`` as ``truncate_prompt_tokens`` cuts them.

        Raises:
            APIError: 400 (``param`` ``truncate_prompt_tokens``) for a truncation
                longer than the context window.
        """
        try:
            return self.engine.input_processor.truncate(prompt_ids, request.truncate_prompt_tokens, max_tokens)
        except ValueError as e:
            raise APIError(str(e), param="truncate_prompt_tokens") from e

    def is_special(self, token_id: int) -> bool:
        """Whether decoding with ``skip_special_tokens`` drops ``token_id`` (a special
        token such as ``<|im_end|>``), as the engine's detokenizer does."""
        special = self._special.get(token_id)
        if special is None:
            special = self._special[token_id] = bool(
                self.tokenizer is not None and self.token_text(token_id)[0]
                and not self.tokenizer.decode([token_id], skip_special_tokens=True))
        return special

    def sse_response(self, request_id: str, events: AsyncIterator[str], rest: AsyncIterator[Any]) -> SSEResponse:
        """The streaming answer: ``events`` wrapped by :func:`guarded_stream`."""
        return SSEResponse(guarded_stream(request_id, events, rest), rest)

    def check_model(self, model: str | None) -> None:
        """Raises APIError (404, ``model_not_found``, as OpenAI and vLLM answer)
        unless ``model`` is ours or None."""
        if model is not None and model != self.model_name:
            raise APIError(
                f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                404, param="model", code="model_not_found",
            )

    def check_request(self, request: SamplingFields) -> None:
        """The checks that need no tokenizing: the model name, then the stop strings.

        Raises:
            APIError: 404 for another model, 400 for too many or too long stop strings.
        """
        self.check_model(request.model)
        check_stop_strings(request.stop, self.max_stop_strings, self.max_stop_string_chars)

    async def tokenize(self, fn: Callable[[], list[int]], location: str, num_chars: int,
                       num_tokens: int = 0) -> list[int]:
        """Run a tokenizing call on an input of ``num_chars`` characters of text (or
        ``num_tokens`` token ids): refused unread when the text cannot fit the context
        (:func:`check_prompt_chars`), run off the event loop when large
        (:func:`run_input_work`). Its ValueError becomes a 400 about ``location``
        (a field, or one item of it: see :func:`at_location`)."""
        check_prompt_chars(num_chars, self.max_model_len, location)
        try:
            return await run_input_work(fn, num_chars, num_tokens)
        except ChatTemplateError as e:
            raise APIError(str(e), param=e.param) from e
        except ValueError as e:
            raise APIError(at_location(str(e), location), param=field_of(location)) from e

    def make_params(self, request: SamplingFields, prompt_ids: list[int], max_tokens: int | None,
                    prompt_param: str) -> SamplingParams:
        """SamplingParams for ``request``, with every length limit checked.

        Args:
            prompt_param: where the prompt is in the request: a field
                (``messages``), or one item of it (``prompt[2]``, named in messages).

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
            field = first_word.split(".", 1)[0]  # structured_outputs.choice -> structured_outputs
            raise APIError(message, param=field if field in type(request).model_fields else None) from e
        if params.structured_outputs is not None:
            check_structured_outputs(request, params)
        try:
            params = self.engine.input_processor.check(prompt_ids, params)
        except ValueError as e:
            field = str(e).split(" ", 1)[0].removesuffix(":")
            if field != field_of(prompt_param) and field in type(request).model_fields:
                # A sampling field's token id outside the vocabulary (``stop_token_ids``).
                raise APIError(str(e), param=field) from e
            raise APIError(at_location(str(e), prompt_param), param=field_of(prompt_param)) from e
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
        dead = engine_dead_cause(self.engine)
        if dead is not None:
            raise dead
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
            raise request_error(e) from e
        except StopAsyncIteration:
            raise APIError("the engine returned no output", 500, type="internal_server_error") from None
        except BaseException:
            await gen.aclose()  # aborts the request (client gone, or an internal error)
            raise
        return first, gen

    async def beam_search_all(self, searches: list[tuple[list[int], BeamSearchParams]], request_ids: list[str],
                              priority: int = 0, cache_salt: str | None = None) -> list[RequestOutput]:
        """Run the beam searches of a request's prompts concurrently (see
        ``AsyncLLM.beam_search``); their outputs in order. If one fails, or the
        client goes, the others are cancelled (which aborts their engine requests).

        Raises:
            APIError: 400 when the engine rejects an input, 503 when it is not running.
        """
        if getattr(self.engine, "errored", False):
            raise APIError("the engine is not running (it stopped after an error)", 503, type="server_error")
        try:
            return await gather_or_cancel([self.engine.beam_search(ids, params, request_id, priority=priority,
                                                                   cache_salt=cache_salt)
                                           for (ids, params), request_id in zip(searches, request_ids, strict=True)])
        except ValueError as e:
            raise APIError(str(e)) from e

    async def start_all(self, starts: list[Awaitable[tuple[RequestOutput, AsyncIterator[RequestOutput]]]]
                        ) -> MergedOutputs:
        """Run several :meth:`start` calls concurrently (so that the engine gets the
        requests together) and merge their outputs.

        If one fails, or this call is cancelled (the client went), the others are
        cancelled and the started ones closed (which aborts them in the engine).

        Raises:
            What the first failing ``start`` (in list order) raised.
        """
        tasks = [asyncio.ensure_future(s) for s in starts]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # also when cancelled
            if any(not t.done() or t.cancelled() or t.exception() is not None for t in tasks):
                for t in tasks:
                    t.cancel()  # a start() that is cut closes its own engine generator
                await asyncio.wait(tasks)
                await MergedOutputs([t.result() for t in tasks if not t.cancelled() and t.exception() is None]
                                    ).aclose()
        errors = [t.exception() for t in tasks if not t.cancelled()]  # all retrieved: none logged as lost
        for error in errors:
            if error is not None:
                raise error
        return MergedOutputs([t.result() for t in tasks])


def request_error(e: ValueError) -> APIError:
    """The 400 for the engine refusing a request: a request id in use names the
    ``X-Request-Id`` header it came from."""
    message = str(e)
    if message.startswith("request id "):
        return APIError(f"{message}: another running request has the same X-Request-Id", param="X-Request-Id")
    return APIError(message)


def field_of(location: str) -> str:
    """The request field a location is in, OpenAI's ``param``: ``prompt[2]`` -> ``prompt``."""
    return location.split("[", 1)[0]


def at_location(message: str, location: str) -> str:
    """A message about a field (it starts with the field's name), said of the item
    at ``location``: ``"prompt must not be empty"`` -> ``"prompt[2] must not be empty"``."""
    field = field_of(location)
    if location != field and message.startswith(field + " "):
        return location + message[len(field):]
    return message


_END = object()  # the end of an output stream


async def no_more_outputs() -> AsyncIterator[RequestOutput]:
    """An output stream that has ended: what follows a request's only output
    (a beam search answers once, finished)."""
    return
    yield


async def _next_or_end(outputs: AsyncIterator[RequestOutput]) -> Any:
    return await anext(outputs, _END)


class MergedOutputs:
    """The outputs of several engine requests (one per prompt) as one stream.

    Yields ``(prompt index, RequestOutput)``: first each request's first output
    (already received, by :meth:`OpenAIServing.start`) in prompt order, then the
    rest as the engine produces them (when several are ready, the one whose read
    began first, so that a prompt whose outputs are always ready does not starve
    the others). An engine request's error is raised as is.

    NOTE: :meth:`aclose` must be called when done (the serving code does, in a
    ``finally``): it aborts the engine requests that have not finished, without
    needing its own awaits to complete (the server may cancel the task that closes
    a stream more than once): a pending read is cancelled, which ends the engine
    generator it is in; the other generators are closed directly.

    Args:
        starts: ``(first output, the rest)`` of each prompt's request, in prompt order.
    """

    def __init__(self, starts: list[tuple[RequestOutput, AsyncIterator[RequestOutput]]]) -> None:
        self.firsts = [first for first, _ in starts]  # each prompt's first output
        self._ready: deque[tuple[int, RequestOutput]] = deque(enumerate(self.firsts))
        self._rests = [rest for _, rest in starts]
        self._live = set(range(len(starts)))  # prompts whose output stream has not ended
        self._reads: dict[int, asyncio.Task[Any]] = {}  # prompt index -> its pending read, oldest first

    def __aiter__(self) -> MergedOutputs:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self._ready:
            return self._ready.popleft()
        while self._live:
            if len(self._live) == 1 and not self._reads:  # one stream left: read it directly
                (i,) = self._live
                out = await anext(self._rests[i], _END)
            else:
                for j in self._live - self._reads.keys():
                    self._reads[j] = asyncio.ensure_future(_next_or_end(self._rests[j]))
                await asyncio.wait(self._reads.values(), return_when=asyncio.FIRST_COMPLETED)
                i = next(j for j, t in self._reads.items() if t.done())  # the oldest read: none starves
                out = self._reads.pop(i).result()
            if out is _END:
                self._live.discard(i)
            else:
                return i, out
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Abort every engine request that has not finished (idempotent)."""
        self._ready.clear()
        self._live.clear()
        reads, self._reads = self._reads, {}
        for i, rest in enumerate(self._rests):
            read = reads.get(i)
            if read is not None and not read.done():
                # NOTE: the read has started (the loop ran it before __anext__ resumed:
                # ready callbacks run in order), so the cancellation is thrown into the
                # generator it reads, which ends it (AsyncLLM aborts the request).
                read.cancel()
            else:
                await rest.aclose()  # type: ignore[attr-defined]
        if reads:  # collect the reads' ends, so that no task is left behind unretrieved
            await asyncio.wait(reads.values())
            for read in reads.values():
                if not read.cancelled() and read.exception() is not None:
                    logger.debug("engine output stream ended with %r while aborted", read.exception())


async def final_outputs(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> list[CompletionOutput]:
    """The n finished completions of a non-streaming request, in index order
    (FINAL_ONLY: the last output, usually ``first``, holds them all)."""
    final = first
    async for out in rest:
        final = out
    return sorted(final.outputs, key=lambda c: c.index)


@dataclass(slots=True)
class _Prompt:
    """One prompt of a completion request, checked and ready to submit."""

    ids: list[int]
    params: SamplingParams
    echo: str  # the text in front of each of its choices ("" without echo)


class OpenAIServingCompletion(OpenAIServing):
    """Answers ``POST /v1/completions`` (one prompt or a batch: see the module doc)."""

    async def create_completion(self, request: CompletionRequest, request_id: str | None = None
                                ) -> CompletionResponse | SSEResponse:
        """Raises APIError for invalid requests (before anything is sent).

        Args:
            request_id: the client's id for the request (``X-Request-Id``); the
                response is named ``cmpl-<request_id>`` (and so is its engine
                request; a batch's prompt i is ``cmpl-<request_id>-i``).
        """
        self.check_request(request)
        located = request.located_prompts()
        n = request.n or 1
        if len(located) > 1 and len(located) * n > MAX_COMPLETIONS_PER_REQUEST:
            raise APIError(f"this request asks for {len(located)} prompts x n={n} = {len(located) * n} "
                           f"completions; at most {MAX_COMPLETIONS_PER_REQUEST} are allowed in one request "
                           "(lower n or split the batch)", param="n")
        prompts = [await self._prepare(request, location, prompt) for location, prompt in located]
        request_id = f"cmpl-{request_id}" if request_id else random_id("cmpl")
        engine_ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        if request.use_beam_search:
            results = await self.beam_search_all([(p.ids, request.to_beam_search_params(p.params))
                                                  for p in prompts], engine_ids, request.priority, request.cache_salt)
            merged = MergedOutputs([(result, no_more_outputs()) for result in results])
        else:
            merged = await self.start_all([self.start(p.ids, p.params, engine_id, request.priority,
                                                      request.cache_salt)
                                           for p, engine_id in zip(prompts, engine_ids, strict=True)])
        as_ids = request.return_tokens_as_token_ids
        if request.stream:
            events = self._stream(request_id, prompts, merged, request.include_usage, request.continuous_usage,
                                  as_ids)
            return self.sse_response(request_id, events, merged)
        finals: list[RequestOutput | None] = [None for _ in prompts]
        try:
            async for i, out in merged:  # FINAL_ONLY: a prompt's last output holds its n completions
                finals[i] = out
        finally:
            await merged.aclose()
        n = prompts[0].params.n
        choices = []
        for i, (p, final) in enumerate(zip(prompts, finals, strict=True)):
            echoed = self._echo_logprobs(p, final, as_ids)
            prompt_logprobs = self.prompt_logprobs(final.prompt_logprobs, request.prompt_logprobs)
            for c in sorted(final.outputs, key=lambda c: c.index):
                choice = self._choice(c, p.params, p.echo, len(p.echo), i * n + c.index, as_ids)[0]
                if echoed is not None:
                    choice.logprobs = echoed.merged_with(choice.logprobs)
                choice.prompt_logprobs = prompt_logprobs
                choices.append(choice)
        return CompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=UsageInfo.of(sum(len(p.ids) for p in prompts),
                               sum(len(c.token_ids) for final in finals for c in final.outputs)),
        )

    def _echo_logprobs(self, p: _Prompt, out: RequestOutput, as_ids: bool = False) -> CompletionLogprobs | None:
        """With ``echo`` and ``logprobs``: the echoed prompt's logprobs (its first
        token with null values, as OpenAI); otherwise None.

        NOTE: the completion's tokens continue from ``len(p.echo)``, the echoed
        text the choice holds, whatever the prompt tokens' texts add up to."""
        if not p.echo or p.params.prompt_logprobs is None or out.prompt_logprobs is None:
            return None
        first = self.token_text(p.ids[0])[0]
        head = CompletionLogprobs(tokens=[self.shown_token(p.ids[0], as_ids)], token_logprobs=[None],
                                  top_logprobs=[None], text_offset=[0])
        # The echoed prompt keeps its special tokens, so each token advances the offset.
        rest, _ = self.completion_logprobs(out.prompt_logprobs[1:], p.params.prompt_logprobs, len(first),
                                           skip_special_tokens=False, as_ids=as_ids)
        return head.merged_with(rest)

    async def _prepare(self, request: CompletionRequest, location: str, prompt: str | list[int]) -> _Prompt:
        """Tokenize and check one prompt (errors name ``location``, e.g. ``prompt[2]``)."""
        is_text = isinstance(prompt, str)
        ids = await self.tokenize(lambda: self.engine.input_processor.tokenize(prompt), location,
                                  len(prompt) if is_text else 0, 0 if is_text else len(prompt))
        whole = len(ids)
        ids = self.prompt_ids_for(request, ids, request.max_tokens)
        params = self.make_params(request, ids, request.max_tokens, location)
        echo = ""
        if request.echo:  # a truncated text prompt echoes what is left of it
            shown = prompt if len(ids) == whole else ids
            echo = await run_input_work(lambda: self._echo_text(shown, ids), num_tokens=0 if is_text else len(ids))
        return _Prompt(ids, params, echo)

    def _echo_text(self, prompt: str | list[int], prompt_ids: list[int]) -> str:
        """The prompt as text: as given, or the decoded token ids (special tokens
        kept; ``prompt`` is then ignored: it was given as ids, or truncated)."""
        if isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            raise APIError("echo needs a tokenizer to turn the token-id prompt into text", param="echo")
        return self.tokenizer.decode(prompt_ids)

    def _choice(self, c: CompletionOutput, params: SamplingParams, prefix: str, text_offset: int,
                index: int, as_ids: bool = False) -> tuple[CompletionChoice, int]:
        """Choice ``index`` (``prefix`` + the completion's text), and the text offset after it."""
        logprobs = None
        if params.logprobs is not None:
            logprobs, text_offset = self.completion_logprobs(reported_logprobs(c, params), params.logprobs,
                                                             text_offset, params.skip_special_tokens, as_ids)
        choice = CompletionChoice(index=index, text=prefix + c.text, logprobs=logprobs,
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        return choice, text_offset

    def completion_logprobs(self, entries: list[SampleLogprob], num_top: int, text_offset: int,
                            skip_special_tokens: bool, as_ids: bool = False) -> tuple[CompletionLogprobs, int]:
        """Legacy-completions ``logprobs`` of ``entries`` (see :class:`CompletionLogprobs`).

        ``top_logprobs[i]`` holds the ``num_top`` most likely tokens and the chosen
        one (OpenAI: "up to logprobs + 1 elements"); where two ids decode to the same
        text, the more likely one keeps the key.

        Args:
            text_offset: the character offset of the first entry's token.
            skip_special_tokens: whether the choice's text leaves special tokens out
                (then they do not advance the offset: it counts only text the choice holds).
            as_ids: spell tokens ``token_id:<id>`` (``return_tokens_as_token_ids``).

        Returns:
            The logprobs, and the offset just after the last token.
        """
        out = CompletionLogprobs()
        for e in entries:
            text, _ = self.token_text(e.token_id)
            shown = self.shown_token(e.token_id, as_ids)
            top: dict[str, float] = {}
            for token_id, logprob in e.top[:num_top]:
                top.setdefault(self.shown_token(token_id, as_ids), finite_logprob(logprob))
            top.setdefault(shown, finite_logprob(e.logprob))
            out.tokens.append(shown)
            out.token_logprobs.append(finite_logprob(e.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(text_offset)
            if not (skip_special_tokens and self.is_special(e.token_id)):
                text_offset += len(text)
        return out, text_offset

    async def _stream(self, request_id: str, prompts: list[_Prompt], merged: MergedOutputs,
                      include_usage: bool, continuous_usage: bool = False, as_ids: bool = False
                      ) -> AsyncIterator[str]:
        created = now()
        n = prompts[0].params.n
        num_output_tokens = 0
        text_offsets = [len(p.echo) for p in prompts for _ in range(n)]  # per choice
        choice_tokens = [0] * (len(prompts) * n)  # per choice, for continuous usage

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            if continuous_usage and choices:  # the running counts of the chunk's choice
                (choice,) = choices
                usage = UsageInfo.of(len(prompts[choice.index // n].ids), choice_tokens[choice.index])
            return sse_event(drop_null_usage(CompletionResponse(
                id=request_id, created=created, model=self.model_name, choices=choices, usage=usage).model_dump()))

        for i, (p, first) in enumerate(zip(prompts, merged.firsts)):
            if p.echo:  # the prompt comes first in every choice (with its logprobs, if asked)
                logprobs = self._echo_logprobs(p, first, as_ids)
                for k in range(n):
                    yield chunk([CompletionChoice(index=i * n + k, text=p.echo, logprobs=logprobs)])
        async for i, out in merged:
            for c in out.outputs:
                index = i * n + c.index
                num_output_tokens += len(c.token_ids)
                choice_tokens[index] += len(c.token_ids)
                choice, text_offsets[index] = self._choice(c, prompts[i].params, "", text_offsets[index], index,
                                                           as_ids)
                if c.text or c.finish_reason is not None or (choice.logprobs is not None and choice.logprobs.tokens):
                    yield chunk([choice])
        if include_usage:
            yield chunk([], UsageInfo.of(sum(len(p.ids) for p in prompts), num_output_tokens))
