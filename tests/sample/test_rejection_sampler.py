"""Rejection sampling of point-mass drafts keeps the target distribution.

Each case draws N = 40,000 independent verifications on a 6-token vocabulary
with the draft token taken from some distribution q (including adversarial
ones: always the least likely token, always a token the target gives
probability 0), and compares the emitted tokens' histogram with the target p
by Pearson's chi-square test at significance 1e-3 (5 degrees of freedom).
With N = 40,000 a shift of 0.01 in the probability of a token of mass 0.1
gives a non-centrality of about 2 * 40,000 * 0.01^2 / 0.1 = 80, so the test
rejects such a bias with power above 0.999. Seeds are fixed: the test is
deterministic.
"""

from __future__ import annotations

import pytest
import torch

from ember.sample.rejection_sampler import draw_noise, emitted_tokens, rejection_sample

N = 40_000
ALPHA = 1e-3
P = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.07, 0.03])
P_NEXT = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness-of-fit p-value (cells with p > 0; a
    count in a cell with p == 0 fails outright)."""
    n = counts.sum()
    if (counts[probs == 0] > 0).any():
        return 0.0
    keep = probs > 0
    expected = probs[keep].double() * n
    stat = ((counts[keep].double() - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _verify(p_rows: list[torch.Tensor], drafts: torch.Tensor, seed: int) -> list[list[int]]:
    """N requests, each with ``drafts.shape[1]`` drafts verified against
    ``p_rows`` (one distribution per position, the last the bonus row)."""
    n, k = drafts.shape
    probs = torch.stack(p_rows).repeat(n, 1)  # rows of request i: i*(k+1) .. i*(k+1)+k
    draft_rows = torch.cat([drafts, torch.full((n, 1), -1)], dim=1).reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    uniform, noise = draw_noise(n * (k + 1), probs.shape[1], [None] * (n * (k + 1)), torch.device("cpu"), gen)
    res = rejection_sample(draft_rows, probs.argmax(dim=1), probs, torch.zeros(n * (k + 1), dtype=torch.bool),
                           uniform, noise)
    return emitted_tokens(drafts.tolist(), res.accepted.tolist(), res.fallback.tolist())


def _draws(q: torch.Tensor, n: int, k: int, seed: int) -> torch.Tensor:
    return torch.multinomial(q, n * k, replacement=True, generator=torch.Generator().manual_seed(seed)).view(n, k)


DRAFT_DISTS = {
    "target": P,
    "uniform": torch.full((6,), 1 / 6),
    "least_likely": torch.tensor([0, 0, 0, 0, 0, 1.0]),
    "most_likely": torch.tensor([1.0, 0, 0, 0, 0, 0]),
    "reversed": P.flip(0),
}


@pytest.mark.parametrize("name", sorted(DRAFT_DISTS))
def test_first_token_distribution_is_target(name):
    out = _verify([P, P_NEXT], _draws(DRAFT_DISTS[name], N, 1, seed=1), seed=2)
    first = torch.tensor([o[0] for o in out])
    counts = torch.bincount(first, minlength=6)
    assert chi_square_pvalue(counts, P) > ALPHA, (name, counts.tolist())


def test_draft_with_target_probability_zero_is_never_emitted():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0])  # e.g. top-k = 3
    out = _verify([p, P_NEXT], torch.full((N, 1), 4), seed=3)
    counts = torch.bincount(torch.tensor([o[0] for o in out]), minlength=6)
    assert counts[3:].sum() == 0 and all(len(o) == 1 for o in out)
    assert chi_square_pvalue(counts, p) > ALPHA, counts.tolist()


@pytest.mark.parametrize("name", ["uniform", "least_likely", "target"])
def test_second_position_after_accepted_draft_is_target(name):
    # Two drafts: the token after an accepted first draft follows P_NEXT, and
    # the bonus after two accepted drafts follows the third row's distribution.
    p_third = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.1, 0.1])
    drafts = _draws(DRAFT_DISTS[name], N, 2, seed=4)
    out = _verify([P, P_NEXT, p_third], drafts, seed=5)
    second = torch.tensor([o[1] for o, d in zip(out, drafts.tolist()) if o[0] == d[0]])
    assert chi_square_pvalue(torch.bincount(second, minlength=6), P_NEXT) > ALPHA
    bonus = torch.tensor([o[2] for o in out if len(o) == 3])
    if name != "least_likely":  # P_NEXT[5] * P[5] makes full acceptance rare there
        assert chi_square_pvalue(torch.bincount(bonus, minlength=6), p_third) > ALPHA


def test_chi_square_detects_a_biased_sampler():
    # The test has power: always accepting the draft (no rejection) is caught.
    drafts = _draws(DRAFT_DISTS["uniform"], N, 1, seed=6)
    counts = torch.bincount(drafts[:, 0], minlength=6)
    assert chi_square_pvalue(counts, P) < ALPHA


def test_greedy_accepts_exactly_the_argmax_prefix():
    logits_argmax = torch.tensor([3, 1, 4, 2])
    drafts = [[3, 1, 5]]
    res = rejection_sample(torch.tensor([3, 1, 5, -1]), logits_argmax, None, None, None, None)
    assert emitted_tokens(drafts, res.accepted.tolist(), res.fallback.tolist()) == [[3, 1, 4]]
    res = rejection_sample(torch.tensor([3, 1, 4, -1]), logits_argmax, None, None, None, None)
    assert emitted_tokens([[3, 1, 4]], res.accepted.tolist(), res.fallback.tolist()) == [[3, 1, 4, 2]]
    res = rejection_sample(torch.tensor([0, -1]), logits_argmax[:2], None, None, None, None)
    assert emitted_tokens([[0]], res.accepted.tolist(), res.fallback.tolist()) == [[3]]


def test_seeded_rows_are_reproducible():
    seeds = [11, 12, None]
    u1, n1 = draw_noise(3, 6, seeds, torch.device("cpu"), torch.Generator().manual_seed(0))
    u2, n2 = draw_noise(3, 6, seeds, torch.device("cpu"), torch.Generator().manual_seed(99))
    assert torch.equal(u1[:2], u2[:2]) and torch.equal(n1[:2], n2[:2])
    assert not torch.equal(n1[2], n2[2])
