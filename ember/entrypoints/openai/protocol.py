"""Pydantic models of the OpenAI-compatible API (requests, responses, errors).

Shapes follow OpenAI's API reference for ``/v1/completions`` and
``/v1/chat/completions`` (https://platform.openai.com/docs/api-reference), plus the
sampling extensions vLLM users expect (``top_k``, ``min_p``, ``repetition_penalty``,
``stop_token_ids``, ``ignore_eos``, ``skip_special_tokens``, ``min_tokens``,
``bad_words``, ``allowed_token_ids``, ``prompt_logprobs``, ...; see
:class:`SamplingFields`).

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
import math
import re
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

from ember.beam_search import MAX_BEAM_WIDTH, BeamSearchParams
from ember.sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams, StructuredOutputsParams
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


class JSONSchemaFormat(StrictRequestModel):
    """``response_format.json_schema``: ``schema`` is the JSON schema the
    output must validate against (``strict`` is accepted; Ember always
    enforces the schema)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: Text
    description: Text | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictRequestModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object``
    (any JSON object) or ``json_schema`` (output valid against
    ``json_schema.schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"response_format.json_schema belongs to type json_schema, not {self.type}")
        return self


class StructuredOutputsField(StrictRequestModel):
    """vLLM's ``structured_outputs`` extra: exactly one of ``json`` (a JSON
    schema), ``json_object``, ``regex``, ``choice`` or ``grammar`` (EBNF)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_schema: dict[str, Any] | Text | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None


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
    # OpenAI's logit_bias: token id (a string, as JSON object keys are) -> bias in [-100, 100].
    logit_bias: dict[Text, float] | None = None
    # vLLM's sampling extras, with SamplingParams' meaning (ranges checked there).
    min_tokens: Int64 = 0
    allowed_token_ids: list[Int64] | None = None
    bad_words: list[Text] | None = None
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Int64 | None = None
    # The prompt tokens' log-probabilities (0..20 alternatives each; not with stream),
    # and "token_id:<id>" instead of token texts in every logprobs field.
    prompt_logprobs: Int64 | None = None
    return_tokens_as_token_ids: bool = False
    # vLLM extras: scheduling priority (lower runs first, with --scheduling-policy
    # priority) and a salt that keeps this request's prefix-cache blocks private.
    priority: Int64 = 0
    cache_salt: Annotated[Text, AfterValidator(_non_empty)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras: beam search, with n as the beam width (see check_beam_search).
    use_beam_search: bool = False
    length_penalty: float | None = None
    # Harmless standard field (end-user id for abuse monitoring); Ember ignores it.
    user: Text | None = None
    # Constrained output: OpenAI's response_format, or vLLM's structured_outputs extra.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # As OpenAI and vLLM: options of a stream make no sense without one.
        if v is not None and info.data.get("stream") is False:  # (absent: stream itself was invalid)
            raise ValueError("stream_options can only be set when stream is true")
        return v

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {v}")
        return v

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and v < 1:
            raise ValueError(f"truncate_prompt_tokens must be -1 or an integer >= 1, got {v}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or ():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers written as strings), "
                                 f"got {key!r}")
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
        prompt tokens' log-probabilities (a stream never gets them: 0 is then
        accepted and ignored, as vLLM does).

        Raises:
            ValueError: ``prompt_logprobs`` above 0 with ``stream``.
        """
        if self.stream:
            # As vLLM: the prompt's logprobs come in the response body, which a stream does not have.
            if self.prompt_logprobs:
                raise ValueError("prompt_logprobs are not available when stream is true")
            return None
        return self.prompt_logprobs

    def token_logit_bias(self) -> dict[int, float] | None:
        """``logit_bias`` with integer token ids (ranges are checked by SamplingParams)."""
        if self.logit_bias is None:
            return None
        return {int(token): bias for token, bias in self.logit_bias.items()}

    def check_beam_search(self) -> None:
        """Check the beam-search fields (vLLM's): ``use_beam_search`` runs a beam
        search of width ``n`` (in [1, 10]) and answers its ``n`` sequences, best
        first; ``length_penalty`` (default 1.0, finite) is the exponent of the
        generated length in the score (see :mod:`ember.beam_search`). Beams are
        ranked by the model's raw log-probabilities, so the fields that shape
        sampling (``temperature`` other than 0, ``top_p``, ``top_k``, ``min_p``,
        the penalties, ``logit_bias``, ``allowed_token_ids``, ``bad_words``,
        ``min_tokens``, ``response_format``, ``structured_outputs``), stop strings
        (and ``include_stop_str_in_output``) and the
        prompt's log-probabilities (``prompt_logprobs``, ``echo`` with ``logprobs``)
        are refused with it rather than ignored. A stream gets
        the finished sequences (the search ranks them only at its end).

        Raises:
            ValueError: the message starts with the field at fault.
        """
        if not self.use_beam_search:
            if self.length_penalty is not None:
                raise ValueError("length_penalty applies only with use_beam_search: true")
            return
        n = 1 if self.n is None else self.n
        if not 1 <= n <= MAX_BEAM_WIDTH:
            raise ValueError(f"n (the beam width with use_beam_search) must be an integer in [1, {MAX_BEAM_WIDTH}], "
                             f"got {n}")
        if self.temperature not in (None, 0):
            raise ValueError(f"temperature must be 0 or unset with use_beam_search (beams are ranked by the "
                             f"model's raw log-probabilities), got {self.temperature}")
        neutral = {"top_p": (1,), "top_k": (0, -1), "min_p": (0,), "presence_penalty": (0,),
                   "frequency_penalty": (0,), "repetition_penalty": (1,)}
        for name, values in neutral.items():
            value = getattr(self, name)
            if value is not None and value not in values:
                raise ValueError(f"{name} is not supported with use_beam_search (beams are ranked by the model's "
                                 f"raw log-probabilities), got {value}")
        if self.stop:
            raise ValueError("stop strings are not supported with use_beam_search (stop_token_ids are)")
        for name in ("logit_bias", "allowed_token_ids", "bad_words", "min_tokens", "prompt_logprobs",
                     "include_stop_str_in_output", "response_format", "structured_outputs"):
            if getattr(self, name) or (name == "prompt_logprobs" and self.prompt_logprobs is not None):
                raise ValueError(f"{name} is not supported with use_beam_search")
        if self.num_prompt_logprobs() is not None:
            raise ValueError("echo with logprobs is not supported with use_beam_search")
        if self.length_penalty is not None and not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")

    def to_beam_search_params(self, params: SamplingParams) -> BeamSearchParams:
        """The beam search of a ``use_beam_search`` request, from its checked
        SamplingParams (:meth:`to_sampling_params`; ``max_tokens`` None: up to the
        context window)."""
        return BeamSearchParams(
            beam_width=params.n, max_tokens=INT64_MAX if params.max_tokens is None else params.max_tokens,
            ignore_eos=params.ignore_eos, length_penalty=1.0 if self.length_penalty is None else self.length_penalty,
            stop_token_ids=params.stop_token_ids, logprobs=params.logprobs,
            skip_special_tokens=params.skip_special_tokens)

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """Build validated SamplingParams (DELTA output when streaming). With
        ``use_beam_search`` they describe the answer (``n`` sequences, greedy, the
        logprobs and stop ids to report); see :meth:`to_beam_search_params`.

        Args:
            max_tokens: the resolved output budget in tokens (None: up to the context).

        Raises:
            ValueError: a value out of range (the message names the parameter first).
        """
        self.check_beam_search()
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
        if self.use_beam_search:
            optional["temperature"] = 0.0
        return SamplingParams(
            logprobs=self.num_logprobs(),
            prompt_logprobs=self.num_prompt_logprobs(),
            seed=self.seed,
            max_tokens=max_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            min_tokens=self.min_tokens,
            logit_bias=self.token_logit_bias(),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            include_stop_str_in_output=self.include_stop_str_in_output,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=self.structured_outputs_params(),
            **{k: v for k, v in optional.items() if v is not None},
        )

    def structured_outputs_field(self) -> str:
        """The request field that gave the output constraint (for errors)."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The output constraint of ``response_format`` or ``structured_outputs``.

        Raises:
            ValueError: both are set, or ``structured_outputs`` does not set
                exactly one constraint (the message starts with the field).
        """
        rf = self.response_format
        if rf is not None and rf.type != "text" and self.structured_outputs is not None:
            raise ValueError("structured_outputs cannot be combined with a response_format other than text")
        if self.structured_outputs is not None:
            so = self.structured_outputs
            return StructuredOutputsParams(json=so.json_schema, json_object=bool(so.json_object), regex=so.regex,
                                           choice=so.choice, grammar=so.grammar)
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=rf.json_schema.json_schema)  # type: ignore[union-attr]

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
        # The echoed prompt's logprobs and the choices' prompt_logprobs share one computation.
        asked = [k for k in (super().num_prompt_logprobs(), self.logprobs if self.echo else None) if k is not None]
        return max(asked) if asked else None

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


# The most tools one chat request may offer (OpenAI's limit).
MAX_TOOLS = 128
# OpenAI's characters for a function name (letters, digits, ``_``, ``-``), plus
# ``.`` (namespaced tools such as ``browser.search``); at most 64.
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class FunctionDefinition(StrictRequestModel):
    """A function a chat request offers the model (``tools[i].function``).

    ``parameters``: the JSON schema of its arguments, an object schema (omitted:
    no arguments). ``strict`` is accepted for OpenAI compatibility; arguments
    are grammar-enforced exactly when ``tool_choice`` forces a call.
    """

    name: Text
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        if not _FUNCTION_NAME.fullmatch(v):
            raise ValueError(f"name must be 1 to 64 letters, digits, '_', '-' or '.', got {v[:80]!r}")
        return v

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "object") != "object":
            raise ValueError(f"parameters must be a JSON schema of type 'object', got type {v.get('type')!r}")
        return v

    def parameters_schema(self) -> dict[str, Any]:
        """``parameters``, or the schema of no arguments (``{}`` only) when omitted."""
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class ChatCompletionTool(StrictRequestModel):
    """One entry of ``tools``: ``{"type": "function", "function": {...}}``."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictRequestModel):
    name: Text


class NamedToolChoice(StrictRequestModel):
    """``tool_choice`` forcing one function: ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: NamedFunction


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

    ``tools`` (1 to :data:`MAX_TOOLS`, distinct names), ``tool_choice`` and
    ``parallel_tool_calls`` as OpenAI's API: see
    :mod:`ember.entrypoints.openai.tool_calls` for what each choice does.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = None
    top_logprobs: Int64 | None = None
    tools: list[ChatCompletionTool] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, v: list[ChatCompletionTool] | None) -> list[ChatCompletionTool] | None:
        seen: set[str] = set()
        for i, tool in enumerate(v or []):
            if tool.function.name in seen:
                raise ValueError(f"tools[{i}] repeats the function name {tool.function.name!r} "
                                 "(names must be distinct)")
            seen.add(tool.function.name)
        return v

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


def _is_none(value: Any) -> bool:
    return value is None


class PromptLogprob(OpenAIBaseModel):
    """vLLM's ``Logprob``, one entry of ``prompt_logprobs``: a token's natural-log
    probability (-inf as -9999.0), its rank in the distribution (1 = most likely)
    and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's ``prompt_logprobs``: one entry per prompt token, null for the first (nothing
# predicts it), else {token id: PromptLogprob} of the prompt's token followed by the
# ``prompt_logprobs`` most likely tokens at that position (JSON keys are strings).
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM extension: the stop string or token id that ended the completion.
    stop_reason: str | int | None = None
    # vLLM extension, only with ``prompt_logprobs`` (not streamed): the prompt's logprobs.
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_is_none)


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class FunctionCallResult(OpenAIBaseModel):
    """The function a response's tool call calls: ``arguments`` is JSON text of an object."""

    name: str
    arguments: str


class ChatToolCallResult(OpenAIBaseModel):
    """One entry of a response message's ``tool_calls``; ``id`` is ``call_<hex>``."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallResult


class ChatResponseMessage(OpenAIBaseModel):
    """``content`` is None when there is no text: a reasoning parser found no
    answer after the reasoning, or the answer is only tool calls;
    ``reasoning_content`` (vLLM/SGLang extension, ``--reasoning-parser``) and
    ``tool_calls`` appear only when set."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(default=None, exclude_if=_is_none)
    tool_calls: list[ChatToolCallResult] | None = Field(default=None, exclude_if=_is_none)


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
    # vLLM extension, only with ``prompt_logprobs``: the prompt's logprobs (see PromptLogprobs).
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_is_none)


class DeltaFunctionCall(OpenAIBaseModel):
    """A streamed piece of a call's function: ``name`` in its first chunk, then
    ``arguments`` fragments (their concatenation is the arguments' JSON text)."""

    name: str | None = Field(default=None, exclude_if=_is_none)
    arguments: str | None = Field(default=None, exclude_if=_is_none)


class DeltaToolCall(OpenAIBaseModel):
    """A streamed piece of tool call ``index`` (the call's place in the
    message's ``tool_calls``); ``id`` and ``type`` come in its first chunk."""

    index: int
    id: str | None = Field(default=None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_is_none)
    function: DeltaFunctionCall


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


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
