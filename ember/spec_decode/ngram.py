"""N-gram prompt-lookup proposer (no model).

For a sequence ``t`` (prompt + output so far), the proposer looks for the
latest earlier occurrence of its last ``n`` tokens, for ``n`` from
``prompt_lookup_max`` down to ``prompt_lookup_min``, and proposes the (up to
k) tokens that followed that occurrence. This is prompt lookup decoding
(Saxena, 2023), the ``ngram`` method of vLLM; it pays off where the output
copies spans of the context (editing, summarising with quotes, code).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    """Args:
        k: draft tokens proposed at most.
        min_n, max_n: n-gram sizes tried, longest first (1 <= min_n <= max_n).
        max_lookback: only the last this many tokens are searched (bounds the
            host time per request and step).
    """

    def __init__(self, k: int, min_n: int, max_n: int, max_lookback: int = 4096) -> None:
        assert 1 <= min_n <= max_n and k >= 1
        self.k, self.min_n, self.max_n, self.max_lookback = k, min_n, max_n, max_lookback

    def propose(self, token_ids: list[int] | np.ndarray, k: int | None = None) -> list[int]:
        """Up to ``k`` (default: the proposer's k) draft tokens to follow
        ``token_ids``; empty when no n-gram of the allowed sizes recurs.

        The latest earlier match wins (recent context predicts best); the
        drafts are the tokens after it, at most up to the sequence end.
        """
        k = self.k if k is None else k
        t = np.asarray(token_ids[-self.max_lookback:], dtype=np.int64)
        n_tok = len(t)
        if k <= 0 or n_tok < self.min_n + 1:
            return []
        for n in range(min(self.max_n, n_tok - 1), self.min_n - 1, -1):
            suffix = t[n_tok - n:]
            # windows starting at 0 .. n_tok - n - 1 (excludes the suffix itself)
            windows = sliding_window_view(t[: n_tok - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return t[start: start + k].tolist()
        return []
