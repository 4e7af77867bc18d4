"""Log-probabilities of sampled tokens, their ranks and the top-k tokens.

Computed from the raw logits (float32 ``log_softmax``, before penalties,
temperature and top-k/p/min-p, as the OpenAI API and vLLM report them), for
the rows that ask, in one batched device computation whose result comes back
to the host in one copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ember.outputs import SampleLogprob
from ember.sampling_params import SamplingParams


@dataclass(slots=True)
class LogprobsMetadata:
    """Which rows of a step want log-probabilities, and how many top tokens.

    Attributes:
        row_ids: the rows that ask, ascending.
        rows: ``row_ids`` as a [len(row_ids)] int64 device tensor, or None when
            every row asks (no gather needed).
        num_logprobs: per asking row, its ``SamplingParams.logprobs`` (top
            tokens wanted, 0..20).
        max_num_logprobs: the largest of them (top-k width of the batch).
    """

    row_ids: list[int]
    rows: torch.Tensor | None
    num_logprobs: list[int]
    max_num_logprobs: int

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device: torch.device) -> LogprobsMetadata | None:
        """None when no row asks."""
        row_ids = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not row_ids:
            return None
        ks = [params[i].logprobs for i in row_ids]
        rows = None if len(row_ids) == len(params) else torch.tensor(row_ids, dtype=torch.int64).to(
            device, non_blocking=True)
        return cls(row_ids, rows, ks, max(ks))


def compute_logprobs(logits: torch.Tensor, sampled: torch.Tensor, meta: LogprobsMetadata) -> torch.Tensor:
    """Log-probabilities of the asking rows, packed for a single host copy.

    Args:
        logits: [num_rows, vocab] raw logits.
        sampled: [num_rows] int64 sampled token ids.
        meta: which rows ask.

    Returns:
        [len(meta.row_ids), 2 + 2 * k] float64 with ``k = meta.max_num_logprobs``:
        column 0 the sampled token's log-probability, column 1 its rank (1 =
        most likely; 1 + the number of tokens strictly more likely), columns
        ``2 .. 2+k`` the top-k token ids and ``2+k .. 2+2k`` their
        log-probabilities, most likely first. float64 holds the float32 values
        and the integer ids exactly.
    """
    if meta.rows is not None:
        logits, sampled = logits.index_select(0, meta.rows), sampled.index_select(0, meta.rows)
    logprobs = logits.float().log_softmax(dim=-1)
    token_lp = logprobs.gather(1, sampled.unsqueeze(1))
    rank = (logprobs > token_lp).sum(dim=-1, keepdim=True) + 1
    cols = [token_lp.double(), rank.double()]
    if meta.max_num_logprobs > 0:
        top_lp, top_ids = logprobs.topk(meta.max_num_logprobs, dim=-1)
        cols += [top_ids.double(), top_lp.double()]
    return torch.cat(cols, dim=1)


def unpack_logprobs(packed: list[list[float]], sampled: Sequence[int], meta: LogprobsMetadata) -> list[SampleLogprob]:
    """Host side of :func:`compute_logprobs`: one :class:`SampleLogprob` per
    asking row (plain Python ints and floats).

    Args:
        packed: ``compute_logprobs(...).tolist()``.
        sampled: per asking row, its sampled token id.
    """
    k_max = meta.max_num_logprobs
    out = []
    for row, token, k in zip(packed, sampled, meta.num_logprobs):
        top = [(int(row[2 + j]), row[2 + k_max + j]) for j in range(k)]
        out.append(SampleLogprob(int(token), row[0], int(row[1]), top))
    return out
