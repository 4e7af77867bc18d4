"""Repetition, presence and frequency penalties on a step's raw logits.

Definitions:

- repetition penalty (CTRL, Keskar et al., 2019, as HF transformers'
  ``RepetitionPenaltyLogitsProcessor``): for every token that occurs in the
  prompt or the output so far, a logit ``l`` becomes ``l * r`` when ``l < 0``
  and ``l / r`` otherwise;
- presence and frequency penalties (OpenAI API reference, "Parameter
  details"): ``l -= frequency * count + presence * (count > 0)``, where
  ``count`` is how often the token occurs in the output so far (not the prompt).

The token counts are built on the device from one host->device copy of the
rows' token ids, and only in steps where some row uses a penalty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ember.sampling_params import SamplingParams


def uses_penalty(p: SamplingParams) -> bool:
    """Whether ``p`` asks for any of the three penalties."""
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


@dataclass(slots=True)
class PenaltyMetadata:
    """One step's penalties, on the device.

    Attributes:
        presence, frequency, repetition: [num_rows] float32 (0, 0 and 1, i.e.
            no-ops, on rows without penalties).
        token_ids: [num_rows, max_prompt_len + max_output_len] int64: row i's
            prompt tokens in columns ``[0, max_prompt_len)`` (only when it uses
            the repetition penalty) and its output tokens from column
            ``max_prompt_len`` on; -1 pads. Rows without penalties are all -1.
        max_prompt_len: where the output columns start.
        use_repetition: some row's repetition penalty is not 1.
    """

    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    token_ids: torch.Tensor
    max_prompt_len: int
    use_repetition: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], token_ids: Sequence[Sequence[int]],
              num_output_tokens: Sequence[int], device: torch.device) -> PenaltyMetadata:
        """Pack the rows' tokens and penalty values (two host->device copies).

        Args:
            params: per row, its request's sampling parameters.
            token_ids: per row, its request's prompt followed by its output
                tokens so far.
            num_output_tokens: per row, how many of ``token_ids`` are output.
        """
        rows = [i for i, p in enumerate(params) if uses_penalty(p)]
        rep_rows = {i for i in rows if params[i].repetition_penalty != 1.0}
        prompt_lens = [len(token_ids[i]) - num_output_tokens[i] for i in range(len(params))]
        max_prompt = max((prompt_lens[i] for i in rep_rows), default=0)
        max_out = max((num_output_tokens[i] for i in rows), default=0)
        ids = np.full((len(params), max_prompt + max_out), -1, dtype=np.int64)
        for i in rows:
            toks, n_prompt = token_ids[i], prompt_lens[i]
            if i in rep_rows:
                ids[i, :n_prompt] = toks[:n_prompt]
            ids[i, max_prompt: max_prompt + num_output_tokens[i]] = toks[n_prompt:]
        values = torch.tensor([[p.presence_penalty for p in params], [p.frequency_penalty for p in params],
                               [p.repetition_penalty for p in params]], dtype=torch.float32).to(device,
                                                                                                  non_blocking=True)
        return cls(presence=values[0], frequency=values[1], repetition=values[2],
                   token_ids=torch.from_numpy(ids).to(device, non_blocking=True), max_prompt_len=max_prompt,
                   use_repetition=bool(rep_rows))


def apply_penalties(logits: torch.Tensor, meta: PenaltyMetadata) -> torch.Tensor:
    """Penalized copy of ``logits`` (the input is not modified).

    Args:
        logits: [num_rows, vocab] float32 raw logits.
        meta: the step's penalties (see :class:`PenaltyMetadata`).

    Returns:
        [num_rows, vocab] float32: repetition penalty first, then frequency
        and presence (the order of vLLM and HF when several are combined).
    """
    num_rows, vocab = logits.shape
    # Pads (-1) go to an extra column that is dropped.
    ids = meta.token_ids.masked_fill(meta.token_ids < 0, vocab)
    out_ids = ids[:, meta.max_prompt_len:]
    counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
    counts = counts[:, :vocab]
    if meta.use_repetition:
        seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=logits.device)
        seen = seen.scatter_(1, ids, True)[:, :vocab]
        rep = meta.repetition.unsqueeze(1)
        logits = torch.where(seen, torch.where(logits < 0, logits * rep, logits / rep), logits)
    return logits - meta.frequency.unsqueeze(1) * counts - meta.presence.unsqueeze(1) * (counts > 0)
