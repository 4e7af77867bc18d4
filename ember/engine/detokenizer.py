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

from ember.sampling_params import SamplingParams


class IncrementalDetokenizer:
    """Detokenizes one request's output tokens as they arrive.

    Args:
        tokenizer: a ``transformers`` fast tokenizer.
        params: gives ``stop`` and ``skip_special_tokens``.
    """

    def __init__(self, tokenizer: Any | None, params: SamplingParams) -> None:
        # NOTE: without a tokenizer (skip_tokenizer_init) the text stays empty.
        self._tokenizer = None if tokenizer is None else (
            getattr(tokenizer, "backend_tokenizer", None) or tokenizer._tokenizer)
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self.stop = list(params.stop or [])
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.output_text = ""
        self.num_tokens_to_stop = 0  # set with each stop string found (see update)
        self._sent = 0

    def update(self, token_ids: list[int]) -> str | None:
        """Add tokens; returns the stop string if one now appears in the text
        (the text is cut just before it)."""
        if self._tokenizer is None:
            return None
        for i, tid in enumerate(token_ids):
            before = len(self.output_text)
            piece = self._stream.step(self._tokenizer, tid)
            if piece:
                self.output_text += piece
                stop = self._find_stop(before)
                if stop is not None:
                    # Tokens of this call up to the one that completed the stop
                    # string (the rest follow it: several tokens per step with
                    # speculative decoding).
                    self.num_tokens_to_stop = i + 1
                    return stop
        return None

    def _find_stop(self, new_text_start: int) -> str | None:
        if not self.stop:
            return None
        # A stop string may begin up to len(stop) - 1 characters before the new text.
        search_from = max(0, new_text_start - self._hold)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.output_text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self.output_text = self.output_text[: best[0]]
        return best[1]

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to report now: everything safe so far (cumulative) or only
        what was not reported before (delta)."""
        end = len(self.output_text) if finished else max(self._sent, len(self.output_text) - self._hold)
        if not delta:
            return self.output_text[:end]
        text = self.output_text[self._sent: end]
        self._sent = end
        return text
