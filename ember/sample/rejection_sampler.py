"""Verification of draft tokens: speculative sampling that keeps the output
distribution exactly the target model's.

A request with k draft tokens ``d_0 .. d_{k-1}`` has k + 1 rows of target
logits in the step: row j is the distribution of the token after the last
known token and ``d_0 .. d_{j-1}``. Scanning j = 0, 1, ..: draft ``d_j`` is
accepted with probability ``min(1, p_j(d_j) / q_j(d_j))``; at the first
rejection a token is drawn from the residual ``normalize(max(p_j - q_j, 0))``
and the scan stops; when all k are accepted, row k gives one more (bonus)
token from ``p_k``. Every emitted token is then distributed as the target's
(Leviathan et al., 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al., 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling").

Proposers without a model (n-gram lookup) propose one token with certainty:
``q_j`` is a point mass at ``d_j``, so the acceptance probability is
``p_j(d_j)`` and the residual is ``p_j`` with ``d_j`` removed. A draft model
that samples its drafts passes its distributions ``q_j`` (``draft_probs``). Greedy rows
accept a draft exactly when it is the argmax and emit the argmax at the first
mismatch, so greedy output equals decoding without drafts.

Randomness: per row one uniform (the acceptance test) and one vector of
Exp(1) noise (residual or bonus draw, by the exponential race of
:mod:`ember.sample.sampler`), both from a generator seeded by the row's
``(seed, output position)`` when the request has a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.sample.sampler import SamplingMetadata, shape_logits


@dataclass(slots=True)
class RejectionResult:
    """Per row, on the device: ``accepted`` [rows] bool (the row's draft is
    accepted; False on bonus rows) and ``fallback`` [rows] int64 (the token
    emitted when the scan stops at this row: the residual draw, or on a bonus
    row the bonus token)."""

    accepted: torch.Tensor
    fallback: torch.Tensor


def target_probs(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target distribution of each row as the sampler defines it
    (:func:`~ember.sample.sampler.shape_logits`): greedy rows' argmax, and for
    the others the softmax of the shaped logits.

    Args:
        logits: [rows, vocab] float32 raw logits (not modified).
        meta: per-row settings (one row per verified position).
    Returns:
        ``(argmax [rows] int64, probs [rows, vocab] float32 or None when every
        row is greedy)``.
    """
    argmax, scaled, _ = shape_logits(logits, meta)
    return argmax, None if scaled is None else scaled.softmax(dim=-1)


def draw_noise(num_rows: int, vocab: int, seeds: list[int | None], device: torch.device,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row a uniform in [0, 1) and Exp(1) noise over the vocabulary; rows
    with a seed draw from ``torch.Generator().manual_seed(seed)`` (noise
    first, then the uniform), the others from ``generator``.

    Returns:
        ``(uniform [rows] float32, noise [rows, vocab] float32)``.
    """
    noise = torch.empty(num_rows, vocab, dtype=torch.float32, device=device).exponential_(generator=generator)
    uniform = torch.rand(num_rows, dtype=torch.float32, device=device, generator=generator)
    for i, seed in enumerate(seeds):
        if seed is not None:
            g = torch.Generator(device=device).manual_seed(seed)
            noise[i].exponential_(generator=g)
            uniform[i] = torch.rand(1, dtype=torch.float32, device=device, generator=g)[0]
    return uniform, noise


def rejection_sample(draft_ids: torch.Tensor, argmax: torch.Tensor, probs: torch.Tensor | None,
                     is_greedy: torch.Tensor | None, uniform: torch.Tensor | None,
                     noise: torch.Tensor | None, draft_probs: torch.Tensor | None = None) -> RejectionResult:
    """Accept/reject every row's draft at once (the scan over a request's
    rows is :func:`emitted_tokens`).

    Args:
        draft_ids: [rows] int64, the draft token each row verifies; -1 on a
            request's last (bonus) row.
        argmax: [rows] int64, the target's argmax per row.
        probs: [rows, vocab] float32 target probabilities, or None when every
            row is greedy (then ``is_greedy``, ``uniform``, ``noise`` are unused).
        is_greedy: [rows] bool.
        uniform: [rows] float32 in [0, 1).
        noise: [rows, vocab] float32 Exp(1).
        draft_probs: [rows, vocab] float32, the distribution each row's draft
            was drawn from (a one-hot row for a draft proposed with certainty,
            zeros on bonus rows); None: every draft is a point mass.
    """
    has_draft = draft_ids >= 0
    greedy_accept = has_draft & (argmax == draft_ids)
    if probs is None:
        return RejectionResult(greedy_accept, argmax)
    d = draft_ids.clamp(min=0).unsqueeze(1)
    p_draft = probs.gather(1, d).squeeze(1)
    if draft_probs is None:
        accept = has_draft & (uniform < p_draft)
        residual = probs.scatter(1, d, torch.where(has_draft.unsqueeze(1), 0.0, p_draft.unsqueeze(1)))
    else:
        # NOTE: u < p/q as u * q < p (no division; q(d) > 0 for a drawn draft).
        accept = has_draft & (uniform * draft_probs.gather(1, d).squeeze(1) < p_draft)
        residual = (probs - draft_probs).clamp_(min=0.0)
        # A row whose residual vanished in rounding (p <= q everywhere) draws from p.
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, probs)
    drawn = residual.div(noise).argmax(dim=-1)
    return RejectionResult(torch.where(is_greedy, greedy_accept, accept), torch.where(is_greedy, argmax, drawn))


def emitted_tokens(draft_ids: list[list[int]], accepted: list[bool], fallback: list[int]) -> list[list[int]]:
    """Host side: per request, its accepted drafts and then the fallback
    token of the row where the scan stopped (1 .. k + 1 tokens).

    Args:
        draft_ids: per request, its drafts (possibly none); its rows are
            ``len(drafts) + 1`` consecutive rows, requests in order.
        accepted, fallback: per row, from :class:`RejectionResult`.
    """
    out, row = [], 0
    for drafts in draft_ids:
        toks = []
        for j, d in enumerate(drafts):
            if not accepted[row + j]:
                toks.append(fallback[row + j])
                break
            toks.append(d)
        else:
            toks.append(fallback[row + len(drafts)])
        out.append(toks)
        row += len(drafts) + 1
    return out
