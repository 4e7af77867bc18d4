"""User-facing sampling parameters, validated on construction."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from ember.utils import INT64_MAX, INT64_MIN, check_text, is_int


class RequestOutputKind(enum.Enum):
    """How the engine reports a request's progress.

    CUMULATIVE: every output carries all text/tokens so far.
    DELTA: every output carries only what is new since the last one (streaming).
    FINAL_ONLY: one output, when the request finishes.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class StructuredOutputsParams:
    """A constraint on a request's output, enforced token by token with a
    grammar engine (xgrammar): exactly one of the fields is set.

    Attributes:
        json: a JSON schema (dict or its JSON text); the output is one JSON
            value valid against it.
        json_object: True for any one JSON object (OpenAI's ``json_object``).
        regex: the output matches this regular expression in full.
        choice: the output is exactly one of these strings.
        grammar: an EBNF grammar (GBNF / xgrammar's EBNF dialect, start rule
            ``root``); the output is a sentence of it.
        reasoning: None (the constraint applies from the first token), or,
            for a reasoning model, where its ``<think> ... </think>`` block
            may be: ``"required"`` (the output starts inside one, as
            DeepSeek-R1's, unless the prompt closed it) or ``"optional"`` (the
            first token may open one, as Qwen3's). The block is unconstrained;
            the constraint applies after ``</think>``. The chat server sets it
            from its reasoning parser.

    Raises:
        ValueError: none or more than one constraint set, or a field of the
            wrong type (the message names it).
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    reasoning: str | None = None

    def __post_init__(self) -> None:
        set_fields = [name for name in ("json", "regex", "choice", "grammar")
                      if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(set_fields) != 1:
            raise ValueError("structured_outputs must set exactly one of json, json_object, regex, choice, "
                             f"grammar; got {set_fields or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (object or string), got {self.json!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None and not (isinstance(self.choice, list) and self.choice
                                            and all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                             f"got {self.choice!r}")
        if self.reasoning not in (None, "required", "optional"):
            raise ValueError(f"structured_outputs.reasoning must be None, 'required' or 'optional', "
                             f"got {self.reasoning!r}")


_GREEDY_EPS = 1e-5
MAX_N = 128
MAX_LOGPROBS = 20
# OpenAI's range for one logit_bias value; -100 bans a token for any model in practice.
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    """Parameters for sampling one completion.

    Attributes:
        n: number of completions per prompt, 1..128. The n completions share the
            prompt's KV blocks (through the prefix cache); with a ``seed``,
            completion i uses ``seed + i``.
        temperature: 0 means greedy (argmax); must be >= 0.
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep the k most likely tokens; 0 or -1 disables; at most
            2**63 - 1 (a k at or above the vocabulary size keeps every token).
        min_p: drop tokens whose probability is below ``min_p * p_max``; in [0, 1].
        seed: per-request seed, a signed 64-bit integer in [-2**63, 2**63); with
            it, sampling is reproducible whatever else shares the batch (the
            noise depends only on seed and output position). For n > 1,
            ``seed + i`` wraps around within that range.
        max_tokens: maximum number of generated tokens, in [1, 2**63); None means
            "up to the context window" (generation never runs past it anyway).
        min_tokens: generate at least this many tokens before an EOS token or
            one of ``stop_token_ids`` may be sampled (their logits are -inf
            until then) and before a stop string is looked for; in
            [0, max_tokens].
        stop: strings that end generation; the matched string is not in the
            text (unless ``include_stop_str_in_output``). Non-empty Unicode
            text (no lone surrogates).
        stop_token_ids: token ids that end generation (finish reason ``stop``),
            in [0, 2**63).
        presence_penalty: subtracted once from the logit of every token already
            generated (OpenAI's definition); in [-2, 2], 0 disables.
        frequency_penalty: subtracted from a token's logit once per time it was
            generated; in [-2, 2], 0 disables.
        repetition_penalty: CTRL-style (Keskar et al., 2019, as in HF
            transformers): logits of tokens in the prompt or the output are
            divided by it when positive, multiplied when negative; in (0, 2],
            1 disables.
        logprobs: None for no log-probabilities; k in [0, 20] returns, for each
            generated token, its log-probability and rank plus the k most likely
            tokens (from the model's raw distribution, before penalties,
            temperature and top-k/p).
        prompt_logprobs: None, or k in [0, 20]: for each prompt token after the
            first, its log-probability and rank given the tokens before it, plus
            the k most likely tokens at that position (as ``logprobs``; see
            ``RequestOutput.prompt_logprobs``). Such a request takes no
            prefix-cache hits: the logits of every prompt position are computed.
        allowed_token_ids: None, or the only token ids the request may
            generate (a non-empty list of ids in [0, vocab_size)); every other
            token's logit is set to -inf before sampling, so greedy picks the
            most likely allowed token. Log-probabilities stay those of the
            raw distribution. Applied through the sampler's logits-processor
            seam (:mod:`ember.sample.logits_processor`).
        structured_outputs: None, or a :class:`StructuredOutputsParams`
            constraint (JSON schema, regex, choice or grammar) the output
            must satisfy, applied through the logits-processor seam.
        logit_bias: None, or token id -> bias added to that token's logit
            before sampling (OpenAI's ``logit_bias``): ids in [0, vocab_size),
            biases real numbers in [-100, 100]; -100 in practice bans the
            token, +100 in practice forces it. Log-probabilities stay those of
            the raw distribution.
        bad_words: None, or words that must not be generated (non-empty
            Unicode text). Each word is tokenized twice, as is (less leading
            spaces) and after one space, and a word's last token is banned
            (-inf) at every position where the output's last tokens equal the
            word's other tokens; a one-token word is banned everywhere.
        include_stop_str_in_output: keep the stop string that ended the text
            in it (and the text of a final stop token: EOS, ``stop_token_ids``;
            a special token still only with ``skip_special_tokens`` off).
        ignore_eos: keep generating past the EOS token.
        skip_special_tokens: drop special tokens from the detokenized text.
        spaces_between_special_tokens: with ``skip_special_tokens`` off,
            False joins a special token to a special token just before it
            without the space some tokenizers' decoders put between them
            (WordPiece); True keeps the tokenizer's own decoding.
        truncate_prompt_tokens: None, or k >= 1: keep only the prompt's last k
            tokens (the first ones are dropped before anything else checks
            the prompt); -1: keep the last ones that leave room for
            ``max_tokens`` (at least one token) in the context window.
        output_kind: see :class:`RequestOutputKind`.

    Integers are bounded by the int64 range at most, as the engine core's wire
    format (msgpack) and its int64 tensors need.

    Raises:
        ValueError: naming the parameter (first word of the message) and its
            allowed range.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    # Filled in by the engine: the model's EOS token ids (not user-settable).
    _eos_token_ids: frozenset[int] = field(default_factory=frozenset, repr=False)
    # Filled in by the engine from ``bad_words`` (its tokenizer): the banned
    # token sequences (not user-settable).
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.allowed_token_ids, (tuple, set, frozenset)):
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, tuple):
            self.bad_words = list(self.bad_words)
        self._verify()
        self._verify_extras()

    def _verify(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        check(is_int(self.n, 1, MAX_N),
              f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and -2.0 <= value <= 2.0,
                  f"{name} must be in [-2, 2], got {value!r}")
        check(isinstance(self.repetition_penalty, (int, float)) and 0.0 < self.repetition_penalty <= 2.0,
              f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or is_int(value, 0, MAX_LOGPROBS),
                  f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        check(
            isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0,
            f"temperature must be in [0, 100], got {self.temperature!r}",
        )
        check(
            isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        check(
            is_int(self.top_k, -1, INT64_MAX),
            f"top_k must be -1, 0 (disabled) or a positive integer up to 2**63 - 1, got {self.top_k!r}",
        )
        check(
            isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0,
            f"min_p must be in [0, 1], got {self.min_p!r}",
        )
        check(
            self.seed is None or is_int(self.seed, INT64_MIN, INT64_MAX),
            f"seed must be None or an integer in [-2**63, 2**63) (int64), got {self.seed!r}",
        )
        check(
            self.max_tokens is None or is_int(self.max_tokens, 1, INT64_MAX),
            f"max_tokens must be None or an integer in [1, 2**63), got {self.max_tokens!r}",
        )
        check(
            all(isinstance(s, str) and s for s in self.stop),
            f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}",
        )
        for s in self.stop:
            check_text(s, "stop")
        check(
            all(is_int(t, 0, INT64_MAX) for t in self.stop_token_ids),
            f"stop_token_ids must be integers in [0, 2**63), got {self.stop_token_ids!r}",
        )
        check(
            self.allowed_token_ids is None or (isinstance(self.allowed_token_ids, list) and self.allowed_token_ids
                                               and all(is_int(t, 0, INT64_MAX) for t in self.allowed_token_ids)),
            f"allowed_token_ids must be None or a non-empty list of token ids in [0, 2**63), "
            f"got {self.allowed_token_ids!r}",
        )
        if self.top_k == -1:
            self.top_k = 0

    def _verify_extras(self) -> None:
        """min_tokens, logit_bias, bad_words, truncate_prompt_tokens and the flags."""
        if not is_int(self.min_tokens, 0, INT64_MAX):
            raise ValueError(f"min_tokens must be an integer in [0, 2**63), got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be None or a dict of token id -> bias, got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                if not is_int(token, 0, INT64_MAX):
                    raise ValueError(f"logit_bias keys must be token ids in [0, 2**63), got {token!r}")
                if (isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias)
                        or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                    raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} "
                                     f"for token {token}")
        if self.bad_words is not None:
            if not (isinstance(self.bad_words, list) and all(isinstance(w, str) and w.strip()
                                                              for w in self.bad_words)):
                raise ValueError(f"bad_words must be None or a list of words (strings with a non-space "
                                 f"character), got {self.bad_words!r}")
            for w in self.bad_words:
                check_text(w, "bad_words")
        if self.truncate_prompt_tokens is not None and not (
                self.truncate_prompt_tokens == -1 or is_int(self.truncate_prompt_tokens, 1, INT64_MAX)):
            raise ValueError(f"truncate_prompt_tokens must be None, -1 or an integer >= 1, "
                             f"got {self.truncate_prompt_tokens!r}")
        for name in ("include_stop_str_in_output", "spaces_between_special_tokens", "skip_special_tokens",
                     "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """Check the token ids that must lie in the model's vocabulary.

        Raises:
            ValueError: an ``allowed_token_ids`` entry or a ``logit_bias`` key
                is not below ``vocab_size`` (the message starts with the field).
        """
        bad = [t for t in self.allowed_token_ids or () if t >= vocab_size]
        if bad:
            raise ValueError(f"allowed_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        bad = [t for t in self.logit_bias or () if t >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature ~ 0)."""
        return self.temperature < _GREEDY_EPS

    @property
    def all_stop_token_ids(self) -> frozenset[int]:
        """EOS ids (unless ``ignore_eos``) plus ``stop_token_ids``."""
        ids = set(self.stop_token_ids or [])
        if not self.ignore_eos:
            ids |= self._eos_token_ids
        return frozenset(ids)
