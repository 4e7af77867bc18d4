import torch

from ember.sample.sampler import Sampler, SamplingMetadata, apply_top_k_top_p_min_p
from ember.sampling_params import SamplingParams


def _reference_mask(logits_row, k, p, min_p):
    """Straightforward per-row reference of top-k / top-p / min-p."""
    probs = logits_row.softmax(-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if min_p > 0:
        keep &= probs >= probs.max() * min_p
    masked = logits_row.masked_fill(~keep, float("-inf"))
    order = masked.argsort(descending=True)
    kept = torch.zeros_like(keep)
    mass = 0.0
    probs2 = masked.softmax(-1)
    if k > 0:
        allowed = set(order[:k].tolist())
        probs2 = masked.masked_fill(torch.tensor([i not in allowed for i in range(len(masked))]), float("-inf")).softmax(-1)
    for rank, idx in enumerate(order.tolist()):
        if k > 0 and rank >= k:
            break
        if not keep[idx] or mass >= p:
            break
        kept[idx] = True
        mass += probs2[idx].item()
    return kept


def test_top_k_top_p_min_p_match_reference():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    top_k = torch.tensor([0, 5, 0, 10, 3, 0])
    top_p = torch.tensor([1.0, 1.0, 0.7, 0.5, 0.9, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.2])
    out = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    for i in range(6):
        ref = _reference_mask(logits[i], int(top_k[i]), float(top_p[i]), float(min_p[i]))
        assert torch.equal(torch.isfinite(out[i]), ref), i
        assert torch.equal(out[i][ref], logits[i][ref])


def _meta(params, positions):
    return SamplingMetadata.build(params, positions, torch.device("cpu"))


def test_greedy_is_argmax():
    logits = torch.randn(3, 20)
    out = Sampler()(logits, _meta([SamplingParams(temperature=0)] * 3, [0, 0, 0]))
    assert torch.equal(out, logits.argmax(-1))


def test_seeded_sampling_independent_of_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    seeded = SamplingParams(temperature=1.0, seed=42)
    other = SamplingParams(temperature=1.0)
    s = Sampler(torch.Generator().manual_seed(0))
    alone = s(logits[2:3], _meta([seeded], [5]))
    batched = s(logits, _meta([other, other, seeded, other], [0, 3, 5, 1]))
    assert alone.item() == batched[2].item()
    # A different output position gives a different noise stream.
    draws = {s(logits[2:3], _meta([seeded], [pos])).item() for pos in range(20)}
    assert len(draws) > 1


def test_sampling_follows_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]]))
    s = Sampler(torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, seed=7)]
    counts = torch.zeros(4)
    for pos in range(4000):
        counts[s(logits, _meta(params, [pos])).item()] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    assert counts[3] == 0
    # top_k=1 is greedy whatever the noise.
    params = [SamplingParams(temperature=1.0, top_k=1, seed=3)]
    assert all(s(logits, _meta(params, [p])).item() == 0 for p in range(50))
