"""Sparse logit biases on the logits-processor seam: ``logit_bias``,
``min_tokens`` and ``bad_words`` (one batched ``index_put`` per step, only when
some row needs it), checked against dense plain-PyTorch references."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import numpy as np
import pytest
import torch

from ember.sample.logits_processor import (BadWordsProcessor, LogitBiasMetadata, LogitsProcessor,
                                           MinTokensProcessor, logits_processors_for, reads_output_history)
from ember.sample.sampler import Sampler, SamplingMetadata
from ember.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB = 50


def _meta(params, positions=None, token_ids=None, **kw):
    positions = positions or [0] * len(params)
    token_ids = token_ids or [[1, 2, 3]] * len(params)
    return SamplingMetadata.build(params, positions, CPU, token_ids=token_ids, vocab_size=VOCAB, **kw)


def _with_eos(params: SamplingParams, eos: set[int]) -> SamplingParams:
    params._eos_token_ids = frozenset(eos)
    return params


def test_no_field_builds_nothing() -> None:
    meta = _meta([SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1)])
    assert meta.logit_bias is None and meta.token_mask is None
    # min_tokens already reached: nothing to apply either.
    p = _with_eos(SamplingParams(temperature=0, min_tokens=2), {7})
    meta = _meta([p], positions=[2], token_ids=[[1, 2, 3, 4]])
    assert meta.logit_bias is None


def test_bias_equals_dense_reference_greedy_and_sampled() -> None:
    """Each row's sampled token equals the sampler's on ``logits + dense bias``
    without biases (same seeds: same noise); -100 bans and +100 forces."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=gen)
    best = logits.argmax(-1).tolist()
    biases = [{best[0]: -100.0}, {17: 100.0}, {3: 2.5, 40: -1.25, 41: 0.5}, None]
    params = [SamplingParams(temperature=0, logit_bias=biases[0], logprobs=1),
              SamplingParams(temperature=0, logit_bias=biases[1]),
              SamplingParams(temperature=0.9, seed=11, logit_bias=biases[2]),
              SamplingParams(temperature=0.9, seed=12)]
    meta = _meta(params)
    assert meta.logit_bias is not None and meta.logit_bias.index.shape == (2, 5)
    dense = torch.zeros(4, VOCAB)
    for row, bias in enumerate(biases):
        for tok, value in (bias or {}).items():
            dense[row, tok] += value
    plain = [SamplingParams(temperature=p.temperature, seed=p.seed, logprobs=p.logprobs) for p in params]
    ref = Sampler()(logits + dense, _meta(plain))
    out = Sampler()(logits.clone(), meta)
    assert torch.equal(out.sampled_token_ids, ref.sampled_token_ids)
    assert out.sampled_token_ids[0].item() != best[0]  # banned: the second best instead
    assert out.sampled_token_ids[0].item() == logits[0].topk(2).indices[1].item()
    assert out.sampled_token_ids[1].item() == 17
    # Log-probabilities stay those of the raw distribution.
    raw = logits[0].log_softmax(-1)
    assert out.logprobs is not None
    assert out.logprobs[0, 0].item() == pytest.approx(raw[out.sampled_token_ids[0]].item(), abs=1e-5)


def test_duplicate_entries_accumulate_and_minus_inf_wins() -> None:
    class Twice(LogitsProcessor):
        def logit_bias(self, output_token_ids: Sequence[int], vocab_size: int):
            return np.array([5, 5, 6], dtype=np.int64), np.array([1.0, 2.0, -np.inf], dtype=np.float32)

    meta = LogitBiasMetadata.build([[Twice()], [], [Twice(), Twice()]], [[], [], []], VOCAB, CPU)
    assert meta.index[0].tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 2]
    from ember.sample.logits_processor import apply_logit_bias

    logits = torch.zeros(3, VOCAB)
    out = apply_logit_bias(logits, meta)
    assert out[0, 5].item() == 3.0 and out[2, 5].item() == 6.0 and out[1].abs().sum().item() == 0
    assert math.isinf(out[0, 6].item()) and out[0, 6].item() < 0
    assert logits.abs().sum().item() == 0  # not modified in place


def test_bias_errors() -> None:
    class Bad(LogitsProcessor):
        def __init__(self, ids, values):
            self.answer = (np.asarray(ids, dtype=np.int64), np.asarray(values, dtype=np.float32))

        def logit_bias(self, output_token_ids, vocab_size):
            return self.answer

    with pytest.raises(ValueError, match="returned 2 token ids and 1 biases"):
        LogitBiasMetadata.build([[Bad([1, 2], [0.5])]], [[]], VOCAB, CPU)
    with pytest.raises(ValueError, match="outside \\[0, 50\\)"):
        LogitBiasMetadata.build([[Bad([50], [0.5])]], [[]], VOCAB, CPU)


def test_min_tokens_bans_stop_tokens_until_reached() -> None:
    proc = MinTokensProcessor(3, [7, 9, 60])  # 60 is past this vocabulary: skipped
    for n in range(3):
        ids, values = proc.logit_bias([0] * n, VOCAB)
        assert ids.tolist() == [7, 9] and np.isneginf(values).all()
    assert proc.logit_bias([0] * 3, VOCAB) is None
    # Through the sampler: EOS (7) and a stop token id (9) are the best tokens, yet not picked.
    logits = torch.zeros(2, VOCAB)
    logits[:, 7], logits[:, 9], logits[:, 4] = 9.0, 8.0, 1.0
    params = [_with_eos(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[9]), {7})] * 2
    out = Sampler()(logits, _meta(params, positions=[1, 2], token_ids=[[1, 5], [1, 5, 5]]))
    assert out.sampled_token_ids.tolist() == [4, 7]
    # ignore_eos leaves EOS alone (it cannot end the text anyway).
    p = _with_eos(SamplingParams(temperature=0, min_tokens=2, ignore_eos=True), {7})
    assert Sampler()(logits[:1], _meta([p])).sampled_token_ids.tolist() == [7]


def test_bad_words_ban_the_last_token_after_the_others() -> None:
    proc = BadWordsProcessor([[11], [20, 21, 22], [30, 31]])
    ids, _ = proc.logit_bias([], VOCAB)
    assert ids.tolist() == [11]
    assert sorted(proc.logit_bias([5, 20, 21], VOCAB)[0].tolist()) == [11, 22]
    assert sorted(proc.logit_bias([20, 21, 30], VOCAB)[0].tolist()) == [11, 31]
    assert sorted(proc.logit_bias([21], VOCAB)[0].tolist()) == [11]  # only a part of the prefix
    p = SamplingParams(bad_words=["x"])
    p._bad_words_token_ids = [[11], [20, 21, 22]]
    assert reads_output_history(p) and any(isinstance(q, BadWordsProcessor) for q in logits_processors_for(p))
    p._bad_words_token_ids = [[11], [12]]
    assert not reads_output_history(p)  # one-token words are banned everywhere
    assert not reads_output_history(SamplingParams(logit_bias={1: 2.0}, min_tokens=3))


def test_bad_words_through_the_sampler_read_each_rows_output() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 22] = 5.0
    p = SamplingParams(temperature=0, bad_words=["w"])
    p._bad_words_token_ids = [[20, 21, 22]]
    # Output tails: (20, 21) -> 22 banned; (21, 20) -> allowed; prompt tokens do not count.
    token_ids = [[1, 20, 21], [1, 21, 20], [20, 21]]
    out = Sampler()(logits, _meta([p] * 3, positions=[2, 2, 0], token_ids=token_ids))
    assert out.sampled_token_ids.tolist()[1:] == [22, 22]
    assert out.sampled_token_ids[0].item() != 22


@pytest.mark.parametrize("kwargs, match", [
    ({"logit_bias": {1: 100.5}}, "logit_bias values must be numbers in \\[-100, 100\\]"),
    ({"logit_bias": {1: float("nan")}}, "logit_bias values"),
    ({"logit_bias": {1: True}}, "logit_bias values"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {"3": 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": [1]}, "logit_bias must be None or a dict"),
    ({"min_tokens": -1}, "min_tokens must be an integer in \\[0, 2\\*\\*63\\)"),
    ({"min_tokens": 1.5}, "min_tokens must be an integer"),
    ({"min_tokens": 17, "max_tokens": 16}, "min_tokens must not exceed max_tokens \\(16\\)"),
    ({"bad_words": [""]}, "bad_words must be None or a list of words"),
    ({"bad_words": ["  "]}, "bad_words must be None or a list of words"),
    ({"bad_words": "abc"}, "bad_words must be None or a list of words"),
    ({"bad_words": ["\ud800"]}, "bad_words is not valid Unicode text"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be None, -1 or an integer >= 1"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens must be None, -1"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output must be a bool"),
    ({"spaces_between_special_tokens": None}, "spaces_between_special_tokens must be a bool"),
])
def test_validation_names_the_field(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_logit_bias_vocab_check_and_wire() -> None:
    p = SamplingParams(logit_bias={3: -100, 49: 100.0}, min_tokens=2, bad_words=["a b"],
                       include_stop_str_in_output=True, spaces_between_special_tokens=False,
                       truncate_prompt_tokens=-1)
    p.check_vocab(50)
    with pytest.raises(ValueError, match="logit_bias: token id 49 is outside the vocabulary \\[0, 49\\)"):
        p.check_vocab(49)
    p._bad_words_token_ids = [[4, 5], [6]]
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams)
    assert back == p and back.logit_bias == {3: -100, 49: 100.0}
    assert back._bad_words_token_ids == [[4, 5], [6]]


@pytest.mark.gpu
def test_logit_bias_on_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(3)
    vocab = 1000
    logits = torch.randn(4, vocab, generator=gen)
    eos = {5}
    bw = SamplingParams(temperature=0, bad_words=["w"])
    bw._bad_words_token_ids = [[1, 2], [int(logits[2].argmax())]]
    params = [SamplingParams(temperature=0, logit_bias={int(logits[0].argmax()): -100.0, 7: 3.0}),
              _with_eos(SamplingParams(temperature=0, min_tokens=4), eos), bw, SamplingParams(temperature=0)]
    token_ids = [[1, 2]] * 4
    cpu = Sampler()(logits, SamplingMetadata.build(params, [0] * 4, CPU, token_ids=token_ids, vocab_size=vocab))
    cuda = torch.device("cuda")
    dev = Sampler()(logits.to(cuda), SamplingMetadata.build(params, [0] * 4, cuda, token_ids=token_ids,
                                                           vocab_size=vocab))
    assert torch.equal(dev.sampled_token_ids.cpu(), cpu.sampled_token_ids)
