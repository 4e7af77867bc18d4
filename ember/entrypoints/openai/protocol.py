"""Pydantic models of the OpenAI-compatible API (requests, responses, errors).

Shapes follow OpenAI's API reference for ``/v1/completions`` and
``/v1/chat/completions`` (https://platform.openai.com/docs/api-reference), plus the
sampling extensions vLLM users expect (``top_k``, ``min_p``, ``repetition_penalty``,
``stop_token_ids``, ``ignore_eos``, ``skip_special_tokens``).

Requests are strict: a wrong JSON type (``"max_tokens": "16"``) or a field Ember does
not support is rejected (HTTP 400 naming the field) rather than coerced or ignored,
so that a client never silently gets behaviour it did not ask for.

What every request field must be, whatever its meaning (checked here, at the API
boundary, so that nothing the engine core cannot carry gets past it):

* an integer field (and each item of ``stop_token_ids``, ``tokens``) a signed
  64-bit integer, in [-2**63, 2**63) (:data:`Int64`); the field's own range
  (``n`` in [1, 128], ...) is checked by :class:`SamplingParams`. Token-id
  prompts are checked against the vocabulary instead.
* a string field Unicode text (:data:`Text`): JSON lets a client send a lone
  UTF-16 surrogate (``"\\ud800"``), which is not a character; it is refused.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ember.sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams
from ember.utils import INT64_MAX, INT64_MIN, check_text


def random_id(prefix: str) -> str:
    """A unique id such as ``chatcmpl-3f2a...`` (used as the engine request id too)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix time in seconds, OpenAI's ``created`` field."""
    return int(time.time())


class OpenAIBaseModel(BaseModel):
    """Response models: plain, lenient construction from our own code."""

    model_config = ConfigDict(extra="forbid")


class StrictRequestModel(BaseModel):
    """Request models: no type coercion, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------- errors


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


class APIError(Exception):
    """An error the server answers with an OpenAI error body.

    Args:
        message: what is wrong, for the user (names the parameter where there is one).
        status_code: HTTP status (400 for the client's mistakes, 500 for ours).
        type: OpenAI's error type, e.g. ``"invalid_request_error"``.
        param: the request field at fault, if any.
        code: a machine-readable code, e.g. ``"model_not_found"``.
    """

    def __init__(self, message: str, status_code: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))


# ---------------------------------------------------------------- requests


def _unicode_text(value: str, info: ValidationInfo) -> str:
    return check_text(value, info.field_name or "text")


def _non_empty(value: str, info: ValidationInfo) -> str:
    if not value:
        raise ValueError(f"{info.field_name} must not be empty (omit it or send null instead)")
    return value


# A request integer: int64, what the engine core's wire format carries.
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
# A request string: Unicode text, no lone surrogates (see the module docstring).
Text = Annotated[str, AfterValidator(_unicode_text)]


class StreamOptions(StrictRequestModel):
    """``stream_options`` (only with ``stream: true``).

    ``include_usage``: a last chunk carries the request's ``usage``.
    ``continuous_usage_stats`` (vLLM's extra, with ``include_usage``): every chunk
    also carries ``usage`` with the running counts of its choice (the prompt's
    tokens, and the tokens that choice generated so far).
    """

    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(StrictRequestModel):
    """Sampling fields shared by completion and chat requests.

    ``None`` means "the SamplingParams default" (n 1, temperature 1.0, top_p 1.0,
    penalties off, ...), as in OpenAI's API, where omitting a field and sending
    ``null`` are the same. Ranges are checked by :class:`SamplingParams` (``n`` in
    [1, 128]; ``presence_penalty`` / ``frequency_penalty`` in [-2, 2];
    ``repetition_penalty``, a vLLM extra, in (0, 2]).
    """

    model: Text | None = None
    n: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: Int64 | None = None
    stop: list[Text] | None = None
    stop_token_ids: list[Int64] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # vLLM extras: scheduling priority (lower runs first, with --scheduling-policy
    # priority) and a salt that keeps this request's prefix-cache blocks private.
    priority: Int64 = 0
    cache_salt: Annotated[Text, AfterValidator(_non_empty)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Harmless standard field (end-user id for abuse monitoring); Ember ignores it.
    user: Text | None = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # As OpenAI and vLLM: options of a stream make no sense without one.
        if v is not None and info.data.get("stream") is False:  # (absent: stream itself was invalid)
            raise ValueError("stream_options can only be set when stream is true")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        # OpenAI allows a single string or a list of strings.
        if isinstance(v, str):
            return [v]
        if v is None or (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            return v
        raise ValueError("stop must be a string or a list of strings")

    def max_tokens_field(self) -> str:
        """The name of the request field that gave the output budget (for errors)."""
        return "max_tokens"

    def num_logprobs(self) -> int | None:
        """``SamplingParams.logprobs``: None, or how many top alternatives to return
        per generated token (each request kind spells it its own way).

        Raises:
            ValueError: an invalid combination (the message starts with the parameter).
        """
        return None

    def num_prompt_logprobs(self) -> int | None:
        """``SamplingParams.prompt_logprobs``: None unless the request asks for the
        prompt tokens' log-probabilities."""
        return None

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """Build validated SamplingParams (DELTA output when streaming).

        Args:
            max_tokens: the resolved output budget in tokens (None: up to the context).

        Raises:
            ValueError: a value out of range (the message names the parameter first).
        """
        optional = {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }
        return SamplingParams(
            logprobs=self.num_logprobs(),
            prompt_logprobs=self.num_prompt_logprobs(),
            seed=self.seed,
            max_tokens=max_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            **{k: v for k, v in optional.items() if v is not None},
        )

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options`` only counts when streaming)."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Whether every stream chunk carries the running ``usage`` (vLLM's
        ``continuous_usage_stats``; like vLLM, only together with ``include_usage``)."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


# Ember's cap on the prompts of one completion request (a 400 beyond it): each
# prompt is its own engine request (n engine-core requests with ``n``), so one
# HTTP request's share of the scheduler's queue stays bounded. The same bound as ``n``'s.
MAX_PROMPTS_PER_REQUEST = 128
# ... and on its completions in all (prompts x n): each is an engine-core request.
MAX_COMPLETIONS_PER_REQUEST = 128


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_text(value: str, location: str) -> str:
    check_text(value, location)
    if not value:
        raise ValueError(f"{location} must not be empty")
    return value


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``.

    ``prompt`` takes OpenAI's four forms: a string, a list of token ids, or a batch
    of up to :data:`MAX_PROMPTS_PER_REQUEST` of either (a list of strings, a list of
    token-id lists). Each prompt of a batch is its own engine request; prompt ``p``'s
    completion ``i`` is ``choices[p * n + i]`` (OpenAI's numbering). A prompt must
    not be empty; token ids are checked against the vocabulary when served.
    ``max_tokens`` defaults to 16 as in OpenAI's API.

    ``logprobs`` (0..20) asks, for every generated token, for its log-probability
    and the ``logprobs`` most likely alternatives. ``echo`` puts the prompt text in
    front of each choice's text; together with ``logprobs`` the choice's logprobs
    cover the prompt tokens first (the first with null values, as OpenAI does),
    which is how eval harnesses score a text's log-likelihood. Such a request
    computes its whole prompt (no prefix-cache hits).
    """

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Int64 | None = 16
    logprobs: Int64 | None = None
    echo: bool = False

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    def located_prompts(self) -> list[tuple[str, str | list[int]]]:
        """The prompts, each with its place in the request for error messages:
        ``[("prompt", p)]`` for one prompt, ``[("prompt[0]", p0), ("prompt[1]", p1), ...]``
        for a batch."""
        if isinstance(self.prompt, str) or _is_token_id(self.prompt[0]):
            return [("prompt", self.prompt)]  # type: ignore[list-item]
        return [(f"prompt[{i}]", p) for i, p in enumerate(self.prompt)]  # type: ignore[misc]

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_field(cls, v: Any) -> Any:
        return cls._prompt_forms(v)

    @staticmethod
    def _prompt_forms(v: Any) -> Any:
        # Token ids are checked against the vocabulary later (InputProcessor.tokenize).
        if isinstance(v, str):
            return _prompt_text(v, "prompt")
        if v == []:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list):
            if all(_is_token_id(t) for t in v):
                return v
            if len(v) > MAX_PROMPTS_PER_REQUEST:
                raise ValueError(f"prompt holds {len(v)} prompts; at most {MAX_PROMPTS_PER_REQUEST} are allowed "
                                 "in one request (split the batch over several requests)")
            if all(isinstance(p, str) for p in v):
                return [_prompt_text(p, f"prompt[{i}]") for i, p in enumerate(v)]
            if all(isinstance(p, list) and all(_is_token_id(t) for t in p) for p in v):
                for i, p in enumerate(v):
                    if not p:
                        raise ValueError(f"prompt[{i}] must not be empty")
                return v
        raise ValueError("prompt must be a string, a list of token ids, a list of strings or a list of "
                         "token-id lists")


class ToolCallFunction(StrictRequestModel):
    """The function an assistant message called: ``arguments`` is a JSON text."""

    name: Text
    arguments: Text


class ToolCall(StrictRequestModel):
    """One entry of an assistant message's ``tool_calls``."""

    id: Text
    type: Literal["function"] = "function"
    function: ToolCallFunction


def _text_of_parts(parts: list[Any]) -> str:
    """The text of a content-part array, its ``text`` parts joined with newlines
    (as vLLM renders them for templates that take string content).

    Raises:
        ValueError: a part that is not ``{"type": "text", "text": str}`` (named).
    """
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"type {kind!r}" if isinstance(kind, str) else "no string 'type'"
            raise ValueError(f"content[{i}] has {what}; only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                             "are supported")
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise ValueError(f"content[{i}] must be {{\"type\": \"text\", \"text\": <string>}}")
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(StrictRequestModel):
    """A chat message, as OpenAI's API and vLLM take it.

    ``role``: ``system``, ``developer`` (OpenAI's newer name for ``system``, given
    to the chat template as ``system``), ``user``, ``assistant`` or ``tool`` (a
    tool's result, with the ``tool_call_id`` it answers). ``content``: a string,
    an array of text parts (joined with newlines, as vLLM does), or null (empty).
    An assistant message may carry the ``tool_calls`` it made; every message may
    carry a ``name``. All of it reaches the chat template, which renders what it
    knows of.
    """

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | None = None
    name: Text | None = None
    tool_call_id: Text | None = None
    tool_calls: list[ToolCall] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        return _text_of_parts(v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _role_fields(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id (the id of the tool call it answers)")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError(f"tool_call_id belongs to tool messages, not to a {self.role} message")
        if self.role != "assistant" and self.tool_calls is not None:
            raise ValueError(f"tool_calls belongs to assistant messages, not to a {self.role} message")
        return self

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates take it (Hugging Face's conversation format):
        ``developer`` becomes ``system``, null content ``""``, and each tool call's
        ``arguments`` a dict (parsed from its JSON; ``{}`` when it is not a JSON
        object, as vLLM does), since templates render them with ``tojson``."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:  # an empty list keeps templates on the plain assistant path
            out["tool_calls"] = [{"id": c.id, "type": c.type,
                                  "function": {"name": c.function.name,
                                               "arguments": _json_arguments(c.function.arguments)}}
                                 for c in self.tool_calls]
        return out


def _json_arguments(arguments: str) -> Any:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, (dict, list)) else {}


def chat_template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """``messages`` as the chat template wants them (see :meth:`ChatMessage.template_dict`)."""
    return [m.template_dict() for m in messages]


# Names the chat template gets from the server itself, and the options of Hugging Face's
# apply_chat_template (which takes the template's variables as its other keyword
# arguments): chat_template_kwargs cannot set them.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "add_generation_prompt", "continue_final_message", "chat_template", "tools",
    "documents", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


class ChatTemplateFields(StrictRequestModel):
    """vLLM's chat template controls, on chat completions and ``/tokenize``.

    ``add_generation_prompt`` (default true): end the prompt with the template's
    opening of an assistant turn. ``continue_final_message``: the conversation's
    last message, which must be an assistant message, is left open so that the
    model continues it (it needs ``add_generation_prompt: false``).
    ``chat_template``: a Jinja template (text) used instead of the server's.
    ``chat_template_kwargs``: extra variables for the template (e.g.
    ``{"enable_thinking": false}`` for Qwen3's); the names the server passes
    itself (``messages``, ``add_generation_prompt``, ...) are refused.
    """

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Annotated[Text, AfterValidator(_non_empty)] | None = None
    chat_template_kwargs: dict[Text, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _kwargs_not_reserved(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in v or ():
            if key in _RESERVED_TEMPLATE_KWARGS:
                raise ValueError(f"chat_template_kwargs cannot set {key!r} (the server sets it; use the request "
                                 "field of that name where there is one)")
        return v

    def template_options(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`InputProcessor.apply_chat_template`.

        Raises:
            APIError: 400 naming ``continue_final_message`` when it is set together
                with ``add_generation_prompt`` or the last message is not an
                assistant's (as vLLM answers).
        """
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise APIError("continue_final_message cannot be used with add_generation_prompt (set "
                               "add_generation_prompt to false)", param="continue_final_message")
            messages = getattr(self, "messages", None)
            if messages and messages[-1].role != "assistant":
                raise APIError("continue_final_message needs the last message to be an assistant message "
                               f"(it is a {messages[-1].role} message)", param="continue_final_message")
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message,
                "chat_template": self.chat_template, "chat_template_kwargs": self.chat_template_kwargs}


class ChatCompletionRequest(ChatTemplateFields, SamplingFields):
    """``POST /v1/chat/completions``.

    ``max_completion_tokens`` (OpenAI's current name) wins over ``max_tokens``
    (deprecated there); with neither, generation may run to the end of the context.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = None
    top_logprobs: Int64 | None = None

    def num_logprobs(self) -> int | None:
        """``logprobs: true`` returns the chosen tokens' log-probabilities, plus the
        ``top_logprobs`` (0..20) most likely alternatives at each position."""
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
            if not self.logprobs:
                raise ValueError("top_logprobs requires logprobs to be true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def resolved_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def message_dicts(self) -> list[dict[str, Any]]:
        """Messages as the chat template wants them (see :meth:`ChatMessage.template_dict`)."""
        return chat_template_messages(self.messages)


class TokenizeRequest(ChatTemplateFields):
    """``POST /tokenize`` (vLLM's): a ``prompt`` string, or chat ``messages``
    rendered with the chat template (with the same template controls as chat
    completions: see :class:`ChatTemplateFields`)."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class TokenizerInfoResponse(OpenAIBaseModel):
    """``GET /tokenizer_info`` (vLLM's): the tokenizer's class and its
    configuration (``tokenizer_config.json``'s settings, JSON values only),
    with the chat template the server renders chats with."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str


class DetokenizeRequest(StrictRequestModel):
    """``POST /detokenize``: token ids back to text."""

    model: Text | None = None
    tokens: list[Int64]


# ---------------------------------------------------------------- responses


class TokenizeResponse(OpenAIBaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(OpenAIBaseModel):
    """Legacy completions' log-probabilities of one choice, one entry per token.

    ``tokens``: each token's text; ``token_logprobs``: its natural-log probability;
    ``top_logprobs``: the requested most likely alternatives *plus* the chosen
    token (so up to ``logprobs + 1`` entries), ``{token text: logprob}``; with
    ``echo``, the prompt's first token has null in both;
    ``text_offset``: the character offset of each token in the choice's text
    (after an echoed prompt), summing the lengths of the token texts.
    """

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def merged_with(self, more: CompletionLogprobs | None) -> CompletionLogprobs:
        """These entries followed by ``more``'s."""
        if more is None:
            return self
        return CompletionLogprobs(tokens=self.tokens + more.tokens,
                                  token_logprobs=self.token_logprobs + more.token_logprobs,
                                  top_logprobs=self.top_logprobs + more.top_logprobs,
                                  text_offset=self.text_offset + more.text_offset)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM extension: the stop string or token id that ended the completion.
    stop_reason: str | int | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


def _is_none(value: Any) -> bool:
    return value is None


class ChatResponseMessage(OpenAIBaseModel):
    """``content`` is None only when a reasoning parser found no answer after the
    reasoning; ``reasoning_content`` (vLLM/SGLang extension, ``--reasoning-parser``)
    appears only when set."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(default=None, exclude_if=_is_none)


class ChatTopLogprob(OpenAIBaseModel):
    """A token with its natural-log probability; ``bytes`` are the token's raw
    bytes (a multi-byte character split over tokens shows up here, not in ``token``)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    """A chosen token and the ``top_logprobs`` most likely tokens at its position."""

    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIBaseModel):
    """Chat ``choices[i].logprobs``: ``{"content": [ChatTokenLogprob, ...]}``."""

    content: list[ChatTokenLogprob] | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "ember"
    # vLLM's fields: ``root`` is the served model's path, ``parent`` the model it
    # adapts (null: no adapters are served).
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- embeddings


class EmbeddingRequest(StrictRequestModel):
    """``POST /v1/embeddings`` (OpenAI's, as vLLM serves it for the served model's
    pooled hidden states; see :mod:`ember.pooling_params`).

    ``input``: a string, a list of strings, a list of token ids or a list of
    token-id lists (up to :data:`MAX_PROMPTS_PER_REQUEST` inputs, none empty);
    ``encoding_format``: ``float`` (a list of numbers) or ``base64`` (the
    float32 little-endian bytes, base64-encoded: what OpenAI's client asks for
    by default); ``dimensions``: accepted only when it equals the model's
    hidden size (the model has no shorter, Matryoshka-trained embeddings).
    ``normalize`` (vLLM's extra): L2-normalize (default: the server's setting).
    """

    model: Text | None = None
    input: str | list[int] | list[str] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int64 | None = None
    user: Text | None = None
    normalize: bool | None = None
    priority: Int64 = 0

    @field_validator("input", mode="before")
    @classmethod
    def _input_forms(cls, v: Any) -> Any:
        try:
            return CompletionRequest._prompt_forms(v)
        except ValueError as e:
            raise ValueError(str(e).replace("prompt", "input")) from None

    def located_inputs(self) -> list[tuple[str, str | list[int]]]:
        """The inputs with their place in the request (``input``, ``input[2]``)."""
        if isinstance(self.input, str) or _is_token_id(self.input[0]):
            return [("input", self.input)]  # type: ignore[list-item]
        return [(f"input[{i}]", p) for i, p in enumerate(self.input)]  # type: ignore[misc]


class EmbeddingData(OpenAIBaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingUsage(OpenAIBaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(OpenAIBaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage
