"""Grammar compilation, matchers and the mask path, against xgrammar's own
matcher and mask application as the reference (Qwen2.5's tokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xgrammar as xgr

from ember.loader import load_tokenizer_for
from ember.sample.logits_processor import TokenMaskMetadata, apply_token_mask, unpack_bitmask
from ember.sampling_params import SamplingParams
from ember.sampling_params import StructuredOutputsParams as SO
from ember.structured_output.grammar import build_grammar, grammar_key
from ember.structured_output.manager import ReasoningMode, StructuredOutputManager

VOCAB = 151936  # Qwen2.5-0.5B's logits width (the tokenizer has fewer tokens)
EOS = 151645
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
          "required": ["name", "age", "tags"]}


@pytest.fixture(scope="module")
def tokenizer(qwen_path):
    return load_tokenizer_for(qwen_path)


@pytest.fixture(scope="module")
def manager(qwen_path, tokenizer):
    m = StructuredOutputManager(qwen_path, None, VOCAB, tokenizer_obj=tokenizer)
    yield m
    m.shutdown()


def _state(manager, so: SO):
    params = SamplingParams(structured_outputs=so)
    params._eos_token_ids = frozenset({EOS})
    state = manager.new_request(params)
    state.grammar.result(timeout=120)
    manager.start(state, [1, 2, 3])
    return state


def _reference_matcher(tokenizer, so: SO):
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB)
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_grammar(build_grammar(grammar_key(so)))
    return xgr.GrammarMatcher(compiled, override_stop_tokens=[EOS])


def _our_mask(state) -> torch.Tensor:
    bitmask = torch.from_numpy(np.full((1, (VOCAB + 31) // 32), -1, dtype=np.int32))
    state.fill_bitmask(bitmask, 0)
    return bitmask


def test_mask_path_matches_xgrammar_along_a_json_output(manager, tokenizer) -> None:
    so = SO(json=SCHEMA)
    state, ref = _state(manager, so), _reference_matcher(tokenizer, so)
    text = '{"name": "Ada", "age": 36, "tags": ["a", "b"]}'
    tokens = tokenizer.encode(text, add_special_tokens=False) + [EOS]
    gen = torch.Generator().manual_seed(0)
    for i, token in enumerate(tokens):
        ours = _our_mask(state)
        want = xgr.allocate_token_bitmask(1, VOCAB)
        ref.fill_next_token_bitmask(want, 0)
        assert torch.equal(ours, want), f"position {i}"
        # Applied on "the device": the same -inf pattern as xgrammar's own kernel.
        logits = torch.randn(3, VOCAB, generator=gen)
        expect = logits.clone()
        xgr.apply_token_bitmask_inplace(expect[1:2], want)
        got = apply_token_mask(logits, TokenMaskMetadata.from_rows(ours, [1], 3, torch.device("cpu")))
        assert torch.equal(got, expect)
        # Each allowed token is one xgrammar's matcher accepts, and a sample of the others is rejected.
        allowed = unpack_bitmask(ours, VOCAB)[0]
        assert allowed[token]
        probe = torch.randint(0, VOCAB, (40,), generator=gen).tolist() + allowed.nonzero()[:40, 0].tolist()
        for t in probe:
            ok = ref.accept_token(t)
            assert ok == bool(allowed[t]), (i, t)
            if ok:
                ref.rollback(1)
        assert ref.accept_token(token)
        finished = not state.accept_tokens([token])
        assert finished == (token == EOS)
    assert state.terminated and ref.is_terminated()


def test_eos_allowed_only_when_the_grammar_can_end(manager, tokenizer) -> None:
    state = _state(manager, SO(regex="[0-9]{3}"))
    for token in (tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("2")):
        assert not unpack_bitmask(_our_mask(state), VOCAB)[0, EOS]
        assert state.accept_tokens([token])
    state.accept_tokens([tokenizer.convert_tokens_to_ids("3")])
    allowed = unpack_bitmask(_our_mask(state), VOCAB)[0]
    assert allowed.nonzero()[:, 0].tolist() == [EOS]
    assert not state.accept_tokens([EOS]) and state.terminated


def test_rejected_token_ends_the_sequence(manager, tokenizer) -> None:
    state = _state(manager, SO(choice=["yes", "no"]))
    assert not state.accept_tokens([tokenizer.convert_tokens_to_ids("maybe") or 100])


def test_repeated_spec_hits_the_cache(manager) -> None:
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}
    hits = manager.num_cache_hits
    a = _state(manager, SO(json=schema))
    b = _state(manager, SO(json=json.dumps(schema)))
    assert a.grammar is b.grammar and manager.num_cache_hits == hits + 1
    assert len(manager.drain_compile_times()) >= 1 and manager.drain_compile_times() == []


def test_reasoning_is_unconstrained_until_the_end_tag(manager, tokenizer) -> None:
    # Qwen2.5 has no think tokens: two of its special tokens stand in for them.
    start, end = 151657, 151658
    so = SO(choice=["yes", "no"], reasoning="required")
    params = SamplingParams(structured_outputs=so)
    params._eos_token_ids = frozenset({EOS})
    state = manager.new_request(params)
    state.grammar.result(timeout=60)
    state.start([5, 6], start, end)
    assert not state.constraining and bool((_our_mask(state) == -1).all())
    assert state.accept_tokens([100, 200, 300])  # reasoning tokens, anything goes
    assert state.accept_tokens([end]) and state.constraining
    allowed = unpack_bitmask(_our_mask(state), VOCAB)[0]
    assert not allowed[100] and allowed.sum() < 20
    # A prompt that closed the reasoning block already: constrained from the start.
    state2 = manager.new_request(params)
    state2.start([start, 9, end, 10], start, end)
    assert state2.constraining
    # OPTIONAL: the first token may open a block, or be the answer's.
    state3 = manager.new_request(params)
    state3.reasoning = ReasoningMode.OPTIONAL
    state3.start([5], start, end)
    allowed = unpack_bitmask(_our_mask(state3), VOCAB)[0]
    assert allowed[start] and allowed.sum() < 20
    assert state3.accept_tokens([start]) and not state3.constraining


def test_batch_fill_equals_one_by_one(manager, tokenizer) -> None:
    from ember.structured_output.manager import BATCH_FILL_MIN

    specs = [SO(json=SCHEMA), SO(regex="[a-z]+@[a-z]+\\.com"), SO(choice=["alpha", "beta"]), SO(json_object=True),
             SO(grammar='root ::= "x" [0-9]*')]
    prefixes = ['{"name": "B', "bob@", "", '{"a": [1, ', "x12"]
    states = []
    for so, prefix in zip(specs, prefixes):
        st = _state(manager, so)
        assert st.accept_tokens(tokenizer.encode(prefix, add_special_tokens=False))
        states.append(st)
    states.insert(2, None)  # a finished request's row: stays all ones
    assert sum(s is not None for s in states) >= BATCH_FILL_MIN
    words = (VOCAB + 31) // 32
    batch = torch.full((len(states), words), -1, dtype=torch.int32)
    manager.fill_bitmasks(states, batch)
    for i, st in enumerate(states):
        if st is None:
            assert bool((batch[i] == -1).all())
        else:
            assert torch.equal(batch[i], _our_mask(st)[0]), i
