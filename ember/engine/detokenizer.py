"""Incremental detokenization with stop strings.

Text is produced with ``tokenizers``' ``DecodeStream``, which buffers tokens
until they form whole UTF-8 characters, so a multi-byte character split across
tokens is never emitted half-way. While a request runs, the last
``len(longest stop string) - 1`` characters are held back, so a stop string
that is still being completed never leaks into streamed text.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from ember.engine.stop_strings import StopStringMatcher
from ember.sampling_params import SamplingParams


class IncrementalDetokenizer:
    """Detokenizes one request's output tokens as they arrive.

    Args:
        tokenizer: a ``transformers`` fast tokenizer.
        params: gives ``stop`` and ``skip_special_tokens``.
        stop_matcher: ``params.stop`` prepared for matching, when the caller shares
            one between the completions of a request (built here otherwise).
    """

    def __init__(self, tokenizer: Any | None, params: SamplingParams,
                 stop_matcher: StopStringMatcher | None = None) -> None:
        # NOTE: without a tokenizer (skip_tokenizer_init) the text stays empty.
        self._tokenizer = None if tokenizer is None else (
            getattr(tokenizer, "backend_tokenizer", None) or tokenizer._tokenizer)
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self.stop = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self._hold = 0 if self.include_stop else max((len(s) for s in self.stop), default=1) - 1
        if self.stop and stop_matcher is None:
            stop_matcher = StopStringMatcher(self.stop)
        self._stop_state = stop_matcher.new_state() if self.stop else None
        self.min_tokens = params.min_tokens
        self.num_tokens = 0
        self._stop_from = 0  # text before this offset belongs to the first min_tokens tokens
        # Added tokens' contents by id, when consecutive ones must not be spaced.
        self._added: dict[int, str] | None = None
        self._last_added = False
        if self._tokenizer is not None and not (params.skip_special_tokens or params.spaces_between_special_tokens):
            self._added = {i: t.content for i, t in self._tokenizer.get_added_tokens_decoder().items()}
        self.output_text = ""
        self.num_tokens_to_stop = 0  # set with each stop string found (see update)
        self._sent = 0

    def update(self, token_ids: list[int]) -> str | None:
        """Add tokens; returns the stop string if one now appears in the text
        (the text is cut just before it, or just after it with
        ``include_stop_str_in_output``)."""
        if self._tokenizer is None:
            return None
        for i, tid in enumerate(token_ids):
            before = len(self.output_text)
            piece = self._stream.step(self._tokenizer, tid)
            if self._added is not None:
                content = self._added.get(tid)
                if content is not None and self._last_added:
                    piece = content
                self._last_added = content is not None
            self.num_tokens += 1
            if piece:
                self.output_text += piece
                if self.num_tokens <= self.min_tokens:
                    self._stop_from = len(self.output_text)
                    continue
                stop = self._find_stop(max(before, self._stop_from))
                if stop is not None:
                    # Tokens of this call up to the one that completed the stop
                    # string (the rest follow it: several tokens per step with
                    # speculative decoding).
                    self.num_tokens_to_stop = i + 1
                    return stop
        return None

    def _find_stop(self, new_text_start: int) -> str | None:
        if self._stop_state is None:
            return None
        match = self._stop_state.feed(self.output_text, new_text_start)
        if match is None:
            return None
        self.output_text = self.output_text[: match.start + (len(match.stop) if self.include_stop else 0)]
        return match.stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to report now: everything safe so far (cumulative) or only
        what was not reported before (delta)."""
        end = len(self.output_text) if finished else max(self._sent, len(self.output_text) - self._hold)
        if not delta:
            return self.output_text[:end]
        text = self.output_text[self._sent: end]
        self._sent = end
        return text
