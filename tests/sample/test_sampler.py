import math

import pytest
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
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_seeded_sampling_independent_of_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    seeded = SamplingParams(temperature=1.0, seed=42)
    other = SamplingParams(temperature=1.0)
    s = Sampler(torch.Generator().manual_seed(0))
    alone = s(logits[2:3], _meta([seeded], [5])).sampled_token_ids
    batched = s(logits, _meta([other, other, seeded, other], [0, 3, 5, 1])).sampled_token_ids
    assert alone.item() == batched[2].item()
    # A different output position gives a different noise stream.
    draws = {s(logits[2:3], _meta([seeded], [pos])).sampled_token_ids.item() for pos in range(20)}
    assert len(draws) > 1


def test_sampling_follows_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]]))
    s = Sampler(torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, seed=7)]
    counts = torch.zeros(4)
    for pos in range(4000):
        counts[s(logits, _meta(params, [pos])).sampled_token_ids.item()] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    assert counts[3] == 0
    # top_k=1 is greedy whatever the noise.
    params = [SamplingParams(temperature=1.0, top_k=1, seed=3)]
    assert all(s(logits, _meta(params, [p])).sampled_token_ids.item() == 0 for p in range(50))


# ----------------------------------------------------------------- penalties

VOCAB = 40


def _rows_with_repeats(num_rows: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per row a prompt and an output drawn from a small id range, so that
    tokens repeat within and across them (some rows have no output yet)."""
    gen = torch.Generator().manual_seed(seed)
    prompts, outputs = [], []
    for i in range(num_rows):
        prompts.append(torch.randint(0, VOCAB // 2, (int(torch.randint(1, 12, (1,), generator=gen)),),
                                     generator=gen).tolist())
        n_out = 0 if i % 4 == 0 else int(torch.randint(1, 15, (1,), generator=gen))
        outputs.append(torch.randint(VOCAB // 4, VOCAB, (n_out,), generator=gen).tolist())
    return prompts, outputs


def _meta_with_tokens(params, prompts, outputs):
    return SamplingMetadata.build(params, [len(o) for o in outputs], torch.device("cpu"),
                                  token_ids=[p + o for p, o in zip(prompts, outputs)])


def _penalize_reference(row: list[float], prompt: list[int], output: list[int], params: SamplingParams) -> list[float]:
    """Plain-Python penalties: CTRL repetition over prompt+output, then OpenAI
    frequency/presence over the output."""
    seen = set(prompt) | set(output)
    out = []
    for tok, logit in enumerate(row):
        if tok in seen:
            r = params.repetition_penalty
            logit = logit * r if logit < 0 else logit / r
        count = output.count(tok)
        logit -= params.frequency_penalty * count + params.presence_penalty * (1 if count > 0 else 0)
        out.append(logit)
    return out


def test_repetition_penalty_matches_hf():
    from transformers import RepetitionPenaltyLogitsProcessor

    from ember.sample.penalties import apply_penalties

    torch.manual_seed(3)
    num_rows = 8
    logits = torch.randn(num_rows, VOCAB) * 4
    prompts, outputs = _rows_with_repeats(num_rows, seed=1)
    penalties = [1.0, 1.3, 0.7, 2.0, 1.0, 1.05, 0.5, 1.8]
    params = [SamplingParams(temperature=0, repetition_penalty=r) for r in penalties]
    ours = apply_penalties(logits, _meta_with_tokens(params, prompts, outputs).penalties)
    for i, r in enumerate(penalties):
        ids = torch.tensor([prompts[i] + outputs[i]])
        ref = RepetitionPenaltyLogitsProcessor(r)(ids, logits[i:i + 1].clone())[0]
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=1e-6)
        if r != 1.0:
            assert not torch.equal(ours[i], logits[i])


def test_presence_frequency_repetition_match_loop_reference():
    from ember.sample.penalties import apply_penalties

    torch.manual_seed(4)
    num_rows = 8
    logits = torch.randn(num_rows, VOCAB) * 3
    prompts, outputs = _rows_with_repeats(num_rows, seed=2)
    settings = [(0.0, 0.0, 1.0), (0.5, 0.0, 1.0), (0.0, 0.7, 1.0), (1.5, -0.4, 1.0), (-2.0, 2.0, 1.0),
                (0.3, 0.2, 1.4), (0.0, 0.0, 0.8), (2.0, 1.0, 1.2)]
    params = [SamplingParams(temperature=0.7, presence_penalty=p, frequency_penalty=f, repetition_penalty=r)
              for p, f, r in settings]
    original = logits.clone()
    ours = apply_penalties(logits, _meta_with_tokens(params, prompts, outputs).penalties)
    assert torch.equal(logits, original), "the raw logits must not be modified"
    for i in range(num_rows):
        ref = torch.tensor(_penalize_reference(logits[i].tolist(), prompts[i], outputs[i], params[i]))
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=1e-5)
    assert torch.equal(ours[0], logits[0])  # row without penalties is untouched


def test_presence_frequency_ignore_prompt_tokens():
    from ember.sample.penalties import apply_penalties

    logits = torch.zeros(1, 6)
    params = [SamplingParams(presence_penalty=1.0, frequency_penalty=0.5)]
    ours = apply_penalties(logits, _meta_with_tokens(params, [[1, 1, 2]], [[3, 3, 3, 4]]).penalties)
    assert ours[0].tolist() == [0.0, 0.0, 0.0, -2.5, -1.5, 0.0]


def test_greedy_with_penalties_takes_argmax_of_penalized_and_mixes_with_plain_rows():
    torch.manual_seed(5)
    num_rows = 6
    logits = torch.randn(num_rows, VOCAB) * 2
    prompts, outputs = _rows_with_repeats(num_rows, seed=3)
    # Make every row's raw argmax a token it already generated (or prompted), so
    # that a strong penalty must move the argmax.
    for i in range(num_rows):
        logits[i, (outputs[i] or prompts[i])[0]] = logits[i].max() + 0.5
    params = [SamplingParams(temperature=0),
              SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0),
              SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=2),
              SamplingParams(temperature=1.0, seed=9),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=0, repetition_penalty=1.9, presence_penalty=2.0)]
    meta = _meta_with_tokens(params, prompts, outputs)
    out = Sampler(torch.Generator().manual_seed(0))(logits, meta)
    for i, p in enumerate(params):
        if not p.greedy:
            continue
        ref = torch.tensor(_penalize_reference(logits[i].tolist(), prompts[i], outputs[i], p))
        assert out.sampled_token_ids[i].item() == ref.argmax().item(), i
    assert out.sampled_token_ids[0].item() == logits[0].argmax().item()
    for i in (1, 2, 5):
        assert out.sampled_token_ids[i].item() != logits[i].argmax().item(), i
    # The seeded row samples the same token alone as in this mixed batch.
    alone = Sampler(torch.Generator().manual_seed(1))(logits[3:4], _meta_with_tokens(
        params[3:4], prompts[3:4], outputs[3:4]))
    assert alone.sampled_token_ids.item() == out.sampled_token_ids[3].item()


def test_penalty_without_token_ids_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="token_ids"):
        SamplingMetadata.build([SamplingParams(presence_penalty=0.5)], [0], torch.device("cpu"))


def test_fast_path_builds_nothing_extra():
    meta = _meta([SamplingParams(temperature=0)] * 3, [0, 4, 9])
    assert meta.all_greedy and meta.penalties is None and meta.logprobs is None and meta.temperature is None
    out = Sampler()(torch.randn(3, 10), meta)
    assert out.logprobs is None


# ------------------------------------------------------------------ logprobs

def _logprobs_reference(row: list[float]) -> list[float]:
    """float64 log-softmax in plain Python."""
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def test_logprobs_match_reference_for_asking_rows_only():
    from ember.sample.logprobs import unpack_logprobs

    torch.manual_seed(6)
    num_rows = 5
    logits = torch.randn(num_rows, VOCAB) * 3
    prompts, outputs = _rows_with_repeats(num_rows, seed=4)
    params = [SamplingParams(temperature=0, logprobs=5),
              SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=1.0, seed=4, logprobs=0),
              SamplingParams(temperature=0.8, seed=5, logprobs=3, repetition_penalty=1.5, frequency_penalty=1.0),
              SamplingParams(temperature=0)]
    meta = _meta_with_tokens(params, prompts, outputs)
    assert meta.logprobs.row_ids == [0, 2, 3]
    out = Sampler(torch.Generator().manual_seed(0))(logits, meta)
    sampled = out.sampled_token_ids.tolist()
    entries = unpack_logprobs(out.logprobs.tolist(), [sampled[i] for i in meta.logprobs.row_ids], meta.logprobs)
    assert len(entries) == 3
    for entry, i in zip(entries, meta.logprobs.row_ids):
        # From the raw logits, whatever the penalties and temperature.
        ref = _logprobs_reference(logits[i].tolist())
        tok = sampled[i]
        assert entry.token_id == tok
        assert abs(entry.logprob - ref[tok]) < 1e-5
        assert entry.rank == 1 + sum(1 for v in ref if v > ref[tok])
        k = params[i].logprobs
        order = sorted(range(VOCAB), key=lambda t: -ref[t])[:k]
        assert [t for t, _ in entry.top] == order
        for t, lp in entry.top:
            assert abs(lp - ref[t]) < 1e-5
        assert all(type(t) is int for t, _ in entry.top) and type(entry.logprob) is float
        assert type(entry.rank) is int and type(entry.token_id) is int
    assert entries[0].rank == 1  # greedy without penalties: the most likely token


def test_logprobs_all_rows_need_no_gather():
    meta = _meta([SamplingParams(temperature=0, logprobs=2)] * 2, [0, 0])
    assert meta.logprobs.rows is None and meta.logprobs.max_num_logprobs == 2
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 2.0]])
    packed = Sampler()(logits, meta).logprobs
    assert packed.shape == (2, 2 + 2 * 2) and packed.dtype == torch.float64
    assert packed[:, 1].tolist() == [1.0, 1.0]
    assert packed[:, 2:4].tolist() == [[2.0, 1.0], [0.0, 2.0]]


@pytest.mark.gpu
def test_penalties_and_logprobs_on_cuda_match_cpu():
    """The same mixed batch (penalties, logprobs, greedy and seeded rows) on
    CUDA gives the CPU's greedy tokens and logprobs."""
    from ember.sample.logprobs import unpack_logprobs

    torch.manual_seed(8)
    num_rows = 6
    logits = torch.randn(num_rows, VOCAB) * 2
    prompts, outputs = _rows_with_repeats(num_rows, seed=6)
    params = [SamplingParams(temperature=0, logprobs=3),
              SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=0.5, logprobs=0),
              SamplingParams(temperature=0, repetition_penalty=1.7),
              SamplingParams(temperature=0.7, seed=11, logprobs=2),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=-0.5, logprobs=5)]
    results = {}
    for device in ("cpu", "cuda"):
        meta = SamplingMetadata.build(params, [len(o) for o in outputs], torch.device(device),
                                      token_ids=[p + o for p, o in zip(prompts, outputs)])
        out = Sampler(torch.Generator(device=device).manual_seed(0))(logits.to(device), meta)
        sampled = out.sampled_token_ids.tolist()
        entries = unpack_logprobs(out.logprobs.tolist(), [sampled[i] for i in meta.logprobs.row_ids], meta.logprobs)
        results[device] = (sampled, entries)
    (cpu_tokens, cpu_lp), (gpu_tokens, gpu_lp) = results["cpu"], results["cuda"]
    for i, p in enumerate(params):
        if p.greedy:
            assert gpu_tokens[i] == cpu_tokens[i], i
    for a, b in zip(cpu_lp, gpu_lp):
        if a.token_id == b.token_id:
            assert abs(a.logprob - b.logprob) < 1e-4 and a.rank == b.rank
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a.top, b.top))


@pytest.mark.gpu
def test_sampling_on_cuda_never_waits_for_the_device():
    """The sampler needs no host synchronisation except to read the
    sampled ids. With torch's sync debug mode set to "error", building the
    metadata and sampling a batch that uses every feature raises on any sync."""
    torch.manual_seed(9)
    num_rows = 5
    logits = torch.randn(num_rows, VOCAB, device="cuda") * 2
    prompts, outputs = _rows_with_repeats(num_rows, seed=7)
    params = [SamplingParams(temperature=0, logprobs=3),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=5, frequency_penalty=0.5),
              SamplingParams(temperature=1.1, min_p=0.05, repetition_penalty=1.2, logprobs=1),
              SamplingParams(temperature=0.6),
              SamplingParams(temperature=0.9, top_p=0.5, seed=3, presence_penalty=-0.5)]
    sampler = Sampler(torch.Generator(device="cuda").manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meta = SamplingMetadata.build(params, [len(o) for o in outputs], torch.device("cuda"),
                                      token_ids=[p + o for p, o in zip(prompts, outputs)])
        out = sampler(logits, meta)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.sampled_token_ids.shape == (num_rows,) and out.logprobs.shape[0] == 2
