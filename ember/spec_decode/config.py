"""Speculative decoding settings (``speculative_config``).

The shape follows vLLM's ``speculative_config`` dict: ``method``,
``num_speculative_tokens`` (k), ``prompt_lookup_min`` / ``prompt_lookup_max``
for n-gram prompt lookup, ``model`` (the draft model of ``draft_model``), and
``disable_by_batch_size``: with more running requests than this, a step
schedules no draft tokens (plain decoding). Method ``mtp`` proposes with the
target checkpoint's own multi-token-prediction layers (DeepSeek-V3 / R1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ember.config import ConfigError

SPEC_METHODS = ("ngram", "draft_model", "eagle3", "mtp")
# Methods whose proposer is a model next to the target on the worker (read from ``model``).
WORKER_METHODS = ("draft_model", "eagle3")
# Methods known from other engines that Ember does not run yet.
_UNSUPPORTED_METHODS = ("eagle", "medusa", "mlp_speculator")
MAX_SPECULATIVE_TOKENS = 16


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Attributes:
        method: ``"ngram"`` (prompt lookup: drafts copied from an earlier
            occurrence of the sequence's last n tokens; no model),
            ``"draft_model"`` (a smaller model with the target's vocabulary
            proposes k tokens autoregressively, see
            :mod:`ember.spec_decode.draft_model`), ``"eagle3"`` (an EAGLE-3
            head reads the target's hidden states at three depths, see
            :mod:`ember.models.llama_eagle3`) or ``"mtp"`` (the target
            checkpoint's multi-token-prediction layer proposes from the
            target's final hidden states, see :mod:`ember.spec_decode.mtp`;
            no ``model``; for architectures with MTP layers and
            ``num_nextn_predict_layers`` >= 1, checked by
            :meth:`~ember.engine.arg_utils.EngineArgs.create_engine_config`).
        num_speculative_tokens: k, draft tokens per request and step, in
            [1, 16].
        prompt_lookup_min, prompt_lookup_max: the n-gram sizes tried, longest
            first; 1 <= min <= max.
        disable_by_batch_size: steps with more running requests than this
            propose nothing (verification costs more than it saves on a large
            batch); None: speculate at any batch size.
        model: the draft model of ``"draft_model"`` or the head of
            ``"eagle3"`` (a path or bundled name as ``--model`` takes, or an
            architecture preset with ``--load-format dummy``); required
            there, refused otherwise.
        draft_model_config: the draft's (or head's) resolved
            :class:`~ember.config.ModelConfig` (set by
            :meth:`~ember.engine.arg_utils.EngineArgs.create_engine_config`,
            which checks it fits the target: vocabulary, hidden size).

    Raises:
        ConfigError: a setting out of range (the message names it).
    """

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    disable_by_batch_size: int | None = 32
    model: str | None = None
    draft_model_config: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.method in _UNSUPPORTED_METHODS:
            raise ConfigError(f"speculative_config.method {self.method!r} is not supported yet "
                              f"(supported: {list(SPEC_METHODS)})")
        if self.method not in SPEC_METHODS:
            raise ConfigError(f"speculative_config.method must be one of {list(SPEC_METHODS)}, got {self.method!r}")
        if self.method in WORKER_METHODS and not (isinstance(self.model, str) and self.model):
            what = "draft model" if self.method == "draft_model" else "head"
            raise ConfigError(f"speculative_config.model must name the {what} (a path, bundled name or preset) "
                              f"for method {self.method!r}, got {self.model!r}")
        if self.method not in WORKER_METHODS and self.model is not None:
            raise ConfigError(f"speculative_config.model is only read by methods {list(WORKER_METHODS)} "
                              f"(method is {self.method!r})")
        k = self.num_speculative_tokens
        if not (_is_int(k) and 1 <= k <= MAX_SPECULATIVE_TOKENS):
            raise ConfigError(f"speculative_config.num_speculative_tokens must be an integer in "
                              f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not (_is_int(lo) and lo >= 1):
            raise ConfigError(f"speculative_config.prompt_lookup_min must be a positive integer, got {lo!r}")
        if not (_is_int(hi) and hi >= lo):
            raise ConfigError(f"speculative_config.prompt_lookup_max must be an integer >= prompt_lookup_min "
                              f"({lo}), got {hi!r}")
        b = self.disable_by_batch_size
        if b is not None and not (_is_int(b) and b >= 1):
            raise ConfigError(f"speculative_config.disable_by_batch_size must be a positive integer or None, "
                              f"got {b!r}")

    @classmethod
    def from_dict(cls, value: dict | str | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """Build from a dict (or its JSON text); None stays None.

        Raises:
            ConfigError: not a dict, an unknown key, or a value out of range.
        """
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ConfigError(f"speculative_config: not JSON: {e}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"speculative_config must be a dict, got {type(value).__name__}")
        value = dict(value)
        value.setdefault("method", "draft_model" if "model" in value else "ngram")
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                 "disable_by_batch_size", "model"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"speculative_config: unknown setting(s) {unknown} (known: {sorted(known)})")
        if value.get("prompt_lookup_min") is None and value.get("prompt_lookup_max") is not None:
            value["prompt_lookup_min"] = min(2, value["prompt_lookup_max"]) if _is_int(
                value["prompt_lookup_max"]) else value["prompt_lookup_max"]
        return cls(**value)

    @property
    def uses_draft_model(self) -> bool:
        """The proposer is a model on the worker (a draft model or a head),
        read from ``model``, which proposes after each step and shares the
        target's KV pool."""
        return self.method in WORKER_METHODS

    @property
    def proposes_on_worker(self) -> bool:
        """Whether the worker proposes (a model next to the target: those of
        :attr:`uses_draft_model`, or the target checkpoint's own MTP layer)
        rather than the engine core (n-gram lookup)."""
        return self.method in WORKER_METHODS or self.method == "mtp"
