"""The sampler's logits-processor seam: packed token bitmasks, one batched
mask per step, and ``allowed_token_ids`` through it (unit and on the bundled
SmolLM2 through the engine)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from ember.sample.logits_processor import (LogitsProcessor, TokenMaskMetadata, bitmask_words,
                                           token_ids_to_bitmask, unpack_bitmask)
from ember.sample.sampler import Sampler, SamplingMetadata
from ember.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB = 70  # not a multiple of 32: the last word is partial


def _meta(params, positions=None, token_ids=None, vocab=VOCAB, **kw):
    positions = positions or [0] * len(params)
    token_ids = token_ids or [[1, 2, 3]] * len(params)
    return SamplingMetadata.build(params, positions, CPU, token_ids=token_ids, vocab_size=vocab, **kw)


def test_bitmask_round_trip() -> None:
    ids = [0, 5, 31, 32, 33, 63, 64, 69, 69, 500]  # bit 31 is the int32 sign bit; 500 is out of range
    mask = token_ids_to_bitmask(ids, VOCAB)
    assert mask.dtype == torch.int32 and mask.shape == (bitmask_words(VOCAB),) == (3,)
    allowed = unpack_bitmask(mask[None], VOCAB)[0]
    assert allowed.shape == (VOCAB,)
    assert set(torch.nonzero(allowed).flatten().tolist()) == {0, 5, 31, 32, 33, 63, 64, 69}
    assert int(mask[0]) < 0  # token 31 set the sign bit


def test_no_processor_builds_nothing() -> None:
    meta = SamplingMetadata.build([SamplingParams(temperature=0)] * 2, [0, 0], CPU)
    assert meta.token_mask is None


def test_greedy_picks_best_allowed_token_and_logprobs_stay_raw() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, VOCAB, generator=gen)
    order = logits.argsort(dim=-1, descending=True)
    allowed = [order[0, 5].item(), order[0, 9].item(), order[0, 40].item()]  # row 0's 6th, 10th, 41st best
    params = [SamplingParams(temperature=0, allowed_token_ids=allowed, logprobs=2),
              SamplingParams(temperature=0, logprobs=2),
              SamplingParams(temperature=0, allowed_token_ids=[69], logprobs=2)]
    meta = _meta(params)
    assert meta.token_mask is not None and meta.token_mask.rows.tolist() == [0, 2]
    out = Sampler()(logits.clone(), meta)
    assert out.sampled_token_ids.tolist() == [allowed[0], logits[1].argmax().item(), 69]
    # Log-probabilities are of the raw distribution: the same as an unconstrained run's
    # for the same tokens.
    free = [SamplingParams(temperature=0, logprobs=2)] * 3
    ref = Sampler()(logits.clone(), _meta(free))
    assert out.logprobs is not None
    torch.testing.assert_close(out.logprobs[:, 2:], ref.logprobs[:, 2:])  # top-2 of the raw logits
    raw_lp = logits.log_softmax(-1)
    assert out.logprobs[0, 0].item() == pytest.approx(raw_lp[0, allowed[0]].item(), abs=1e-6)
    assert out.logprobs[0, 1].item() == 6  # rank in the raw distribution


def test_random_sampling_only_draws_allowed_tokens() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=gen) * 2
    allowed = [3, 31, 32, 64, 69]
    params = [SamplingParams(temperature=1.0, allowed_token_ids=allowed, seed=7),
              SamplingParams(temperature=1.0, seed=8),
              SamplingParams(temperature=0.7, top_k=3, allowed_token_ids=allowed, seed=9),
              SamplingParams(temperature=1.5, top_p=0.9, allowed_token_ids=[10, 11], seed=10)]
    free = [SamplingParams(temperature=1.0, seed=8)]
    sampler = Sampler(torch.Generator().manual_seed(0))
    seen: list[set[int]] = [set(), set(), set(), set()]
    for pos in range(300):
        toks = sampler(logits, _meta(params, [pos] * 4)).sampled_token_ids.tolist()
        for i, t in enumerate(toks):
            seen[i].add(t)
        # The unconstrained row draws what it draws alone: its noise is its own.
        assert toks[1] == sampler(logits[1:2], _meta(free, [pos])).sampled_token_ids.item()
    assert seen[0] <= set(allowed) and len(seen[0]) >= 3
    assert len(seen[1] - set(allowed)) > 0
    top3 = set(torch.tensor(allowed)[logits[2, allowed].argsort(descending=True)[:3]].tolist())
    assert seen[2] <= top3 and len(seen[2]) > 1  # top-k applies among the allowed tokens
    assert seen[3] <= {10, 11}


def test_sampling_follows_renormalized_distribution() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    params = [SamplingParams(temperature=1.0, allowed_token_ids=[1, 3], seed=3)]
    sampler = Sampler()
    counts = torch.zeros(4)
    for pos in range(3000):
        counts[sampler(logits, _meta(params, [pos], vocab=4)).sampled_token_ids.item()] += 1
    assert counts[0] == counts[2] == 0
    assert counts[1] / counts.sum() == pytest.approx(0.75, abs=0.03)  # 0.3 / (0.3 + 0.1)


class NoRepeat(LogitsProcessor):
    """Forbids the last output token (an output-dependent mask)."""

    def allowed_token_bitmask(self, output_token_ids: Sequence[int], vocab_size: int) -> torch.Tensor | None:
        if not output_token_ids:
            return None
        return token_ids_to_bitmask([t for t in range(vocab_size) if t != output_token_ids[-1]], vocab_size)


def test_custom_processors_and_their_intersection() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 7] = 5.0
    logits[:, 8] = 4.0
    logits[:, 9] = 3.0
    params = [SamplingParams(temperature=0)] * 3
    # Row 0 just generated 7 (prompt 1, 2), row 1 has no output yet, row 2 generated 7 and
    # is also limited to {7, 9} by a second processor.
    token_ids = [[1, 2, 7], [1, 2], [1, 7]]
    procs = [[NoRepeat()], [NoRepeat()], [NoRepeat(), _Allowed([7, 9])]]
    meta = SamplingMetadata.build(params, [1, 0, 1], CPU, token_ids=token_ids, vocab_size=VOCAB,
                                  logits_processors=procs)
    assert meta.token_mask.rows.tolist() == [0, 2]  # row 1's processor returned None
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [8, 7, 9]


class _Allowed(LogitsProcessor):
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def allowed_token_bitmask(self, output_token_ids: Sequence[int], vocab_size: int) -> torch.Tensor | None:
        return token_ids_to_bitmask(self.ids, vocab_size)


class _BadShape(LogitsProcessor):
    def allowed_token_bitmask(self, output_token_ids: Sequence[int], vocab_size: int) -> torch.Tensor | None:
        return torch.ones(vocab_size, dtype=torch.bool)


def test_errors() -> None:
    with pytest.raises(ValueError, match="_BadShape returned a torch.bool mask of shape \\(70,\\)"):
        TokenMaskMetadata.build([[_BadShape()]], [[]], VOCAB, CPU)
    with pytest.raises(ValueError, match="vocab_size must be given"):
        SamplingMetadata.build([SamplingParams(allowed_token_ids=[1])], [0], CPU, token_ids=[[1]])


@pytest.mark.parametrize("bad", [[], [-1], [1, True], "12", [1.0], [2 ** 63]])
def test_allowed_token_ids_validation(bad) -> None:
    with pytest.raises(ValueError, match="allowed_token_ids must be None or a non-empty list"):
        SamplingParams(allowed_token_ids=bad)


def test_allowed_token_ids_accepts_sequences_and_checks_vocab() -> None:
    assert SamplingParams(allowed_token_ids=(3, 1)).allowed_token_ids == [3, 1]
    assert SamplingParams(allowed_token_ids={5}).allowed_token_ids == [5]
    p = SamplingParams(allowed_token_ids=[0, 69, 70])
    p.check_vocab(71)
    with pytest.raises(ValueError, match="token id 70 is outside the vocabulary \\[0, 70\\)"):
        p.check_vocab(70)


# ----------------------------------------------------------------- engine

@pytest.mark.slow
def test_allowed_token_ids_through_the_engine(smollm2_path, one_torch_thread) -> None:
    from ember import LLM

    llm = LLM(smollm2_path, dtype="float32", max_model_len=256, block_size=16, kv_cache_memory=32 << 20)
    prompt = "The capital of France is"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)[0]
    top = free.outputs[0].logprobs[0].top  # five (token, logprob), most likely first
    vocab = llm.llm_engine.model_config.vocab_size
    # The 3rd and 5th most likely tokens, plus tokens far down the distribution.
    allowed = [top[2][0], top[4][0], 17, vocab - 1]
    out = llm.generate([prompt, prompt], [SamplingParams(temperature=0, max_tokens=6, logprobs=1, allowed_token_ids=allowed,
                                               ignore_eos=True),
                                SamplingParams(temperature=0.8, max_tokens=6, seed=1, allowed_token_ids=allowed,
                                               ignore_eos=True)], use_tqdm=False)
    greedy, sampled = out[0].outputs[0], out[1].outputs[0]
    assert greedy.token_ids[0] == top[2][0]  # the best allowed token
    assert set(greedy.token_ids) <= set(allowed) and set(sampled.token_ids) <= set(allowed)
    # Its log-probability is the raw one, as the unconstrained run reported it.
    assert greedy.logprobs[0].logprob == pytest.approx(top[2][1], abs=1e-4)
    assert greedy.logprobs[0].rank == 3


def test_allowed_token_ids_cross_the_engine_core_wire() -> None:
    import msgspec

    params = SamplingParams(allowed_token_ids=[4, 2], temperature=0)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    assert decoded.allowed_token_ids == [4, 2] and decoded == params


@pytest.mark.gpu
def test_token_mask_on_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(4)
    vocab = 1000
    logits = torch.randn(5, vocab, generator=gen)
    params = [SamplingParams(temperature=0, allowed_token_ids=[3, 500, 999]), SamplingParams(temperature=0),
              SamplingParams(temperature=0, allowed_token_ids=list(range(31, 70))),
              SamplingParams(temperature=0.9, seed=5, allowed_token_ids=[7, 8]), SamplingParams(temperature=0)]
    token_ids = [[1, 2]] * 5
    cpu = Sampler()(logits, SamplingMetadata.build(params, [0] * 5, CPU, token_ids=token_ids, vocab_size=vocab))
    cuda = torch.device("cuda")
    dev = Sampler()(logits.to(cuda), SamplingMetadata.build(params, [0] * 5, cuda, token_ids=token_ids,
                                                           vocab_size=vocab))
    ids = dev.sampled_token_ids.cpu()
    assert torch.equal(ids[[0, 1, 2, 4]], cpu.sampled_token_ids[[0, 1, 2, 4]])
    assert ids[3].item() in (7, 8)
