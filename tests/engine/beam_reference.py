"""A plain-PyTorch beam search over a Hugging Face model, for checking Ember's.

Every step recomputes each live beam from its first token (no KV cache) in
float32, takes each beam's ``2 * width`` most likely next tokens from
``log_softmax`` of the last position's logits, keeps the ``width`` candidates
with the highest cumulative log-probability (stable: beam order, then token
rank), finishes those that end on a stop token or reach ``max_tokens``, and
returns the ``width`` best finished sequences by ``cum / length ** length_penalty``
(``length``: generated tokens without a final stop token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RefBeam:
    token_ids: list[int]
    cum_logprob: float
    score: float
    finish_reason: str


def reference_beam_search(hf, prompt: list[int], width: int, max_tokens: int, stop_ids: set[int],
                          length_penalty: float = 1.0) -> tuple[list[RefBeam], float]:
    """Returns the ``width`` best sequences (best first) and the smallest gap, over
    all steps, between the last kept candidate and the first dropped one (the
    cut is only well defined when that gap exceeds the numerical noise)."""
    live: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float, bool]] = []
    min_gap = float("inf")
    while live:
        with torch.inference_mode():
            logits = hf(input_ids=torch.tensor([prompt + toks for toks, _ in live])).logits[:, -1].float()
        logprobs = logits.log_softmax(dim=-1)
        top_lp, top_ids = logprobs.topk(2 * width, dim=-1)
        cands = [(cum + lp, toks + [tok]) for (toks, cum), lps, ids in zip(live, top_lp.tolist(), top_ids.tolist())
                 for lp, tok in zip(lps, ids)]
        cands.sort(key=lambda c: c[0], reverse=True)
        if len(cands) > width:
            min_gap = min(min_gap, cands[width - 1][0] - cands[width][0])
        live = []
        for cum, toks in cands[:width]:
            if toks[-1] in stop_ids:
                finished.append((toks, cum, True))
            elif len(toks) >= max_tokens:
                finished.append((toks, cum, False))
            else:
                live.append((toks, cum))
    beams = [RefBeam(toks, cum, cum / max(1, len(toks) - int(stop)) ** length_penalty,
                     "stop" if stop else "length") for toks, cum, stop in finished]
    beams.sort(key=lambda b: b.score, reverse=True)
    return beams[:width], min_gap
