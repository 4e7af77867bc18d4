"""The offline API (``LLM`` / ``LLMEngine``) refuses what the engine core cannot
carry with a ValueError naming the parameter, before anything is queued:
integers outside int64 (msgpack's and torch's limit), lone surrogates (not
Unicode text: SmolLM2's tokenizer raises TypeError on them, msgpack
UnicodeEncodeError), token ids outside the vocabulary. The int64 edges
themselves are served, through the in-process core and the core process alike.

A tiny Qwen3-shaped model with dummy weights and SmolLM2's tokenizer keeps this
fast."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ember import LLM, SamplingParams
from ember.engine.arg_utils import EngineArgs
from ember.engine.llm_engine import LLMEngine
from ember.sampling_params import RequestOutputKind
from ember.utils import INT64_MAX, INT64_MIN

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}
ENGINE = {"model": "Qwen3-8B", "load_format": "dummy", "hf_overrides": TINY, "max_model_len": 128,
          "kv_cache_memory": 8 << 20, "tokenizer": "SmolLM2-135M-Instruct"}
NUM_NEW = 4


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    llm = LLM(**ENGINE)
    yield llm
    llm.llm_engine.shutdown()


def sampled(**fields) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=NUM_NEW, ignore_eos=True, **fields)


def test_bad_offline_inputs_raise_value_error_naming_the_parameter(llm: LLM) -> None:
    with pytest.raises(TypeError):  # the reference: what the tokenizer alone does with a lone surrogate
        llm.get_tokenizer().encode("\ud800")
    assert llm.get_tokenizer().encode("\x1d") == []  # a control character SmolLM2's tokenizer drops
    vocab = llm.llm_engine.model_config.vocab_size
    cases = [
        (lambda: llm.generate("a\ud800b", use_tqdm=False), "prompt"),
        (lambda: llm.generate(["ok", "\udfff"], use_tqdm=False), "prompt"),
        (lambda: llm.generate([[1, 10 ** 30]], use_tqdm=False), "prompt"),
        (lambda: llm.generate([[1, vocab]], use_tqdm=False), "prompt"),
        (lambda: llm.generate([[-1]], use_tqdm=False), "prompt"),
        (lambda: llm.generate("\x1d", use_tqdm=False), "prompt tokenizes to no tokens"),
        (lambda: llm.chat([{"role": "user", "content": "x\udfffy"}], use_tqdm=False), r"messages\[0\]\.content"),
        (lambda: llm.chat([{"role": "user", "content": "x"}, {"role": "us\ud800", "content": "y"}], use_tqdm=False),
         r"messages\[1\]\.role"),
        (lambda: llm.generate("hi", priority=INT64_MAX + 1, use_tqdm=False), "priority"),
        (lambda: llm.generate("hi", priority=INT64_MIN - 1, use_tqdm=False), "priority"),
        (lambda: llm.generate("hi", priority=True, use_tqdm=False), "priority"),
        (lambda: llm.generate("hi", cache_salt="\ud800", use_tqdm=False), "cache_salt"),
        (lambda: llm.generate("hi", cache_salt="", use_tqdm=False), "cache_salt"),
        (lambda: llm.generate("hi", sampled(seed=INT64_MAX + 1), use_tqdm=False), "seed"),
        (lambda: llm.generate("hi", sampled(stop=["\ud800"]), use_tqdm=False), "stop"),
        (lambda: llm.generate("hi", sampled(allowed_token_ids=[1, vocab]), use_tqdm=False), "allowed_token_ids"),
        (lambda: llm.generate("hi", sampled(stop_token_ids=[1, vocab]), use_tqdm=False),
         f"stop_token_ids: token id {vocab} is outside the vocabulary"),
        # LLMEngine with a pre-tokenized prompt: the ids are still checked.
        (lambda: llm.llm_engine.add_request("x", "hi", sampled(), prompt_token_ids=[1, vocab]), "prompt"),
        (lambda: llm.llm_engine.add_request("x", "hi", sampled(), prompt_token_ids=[2 ** 64]), "prompt"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=f"^{name}"):
            call()
    assert not llm.llm_engine.has_unfinished_requests()  # nothing was queued


def test_int64_edges_are_served_in_process(llm: LLM) -> None:
    # The last vocabulary id as a stop token (stop token ids are checked against the vocabulary).
    last = llm.llm_engine.model_config.vocab_size - 1
    edge = sampled(seed=INT64_MAX, n=2, top_k=INT64_MAX, stop_token_ids=[last])
    out = llm.generate("Hello", edge, priority=INT64_MIN, cache_salt="\U0001F600", use_tqdm=False)[0]
    assert [len(c.token_ids) for c in out.outputs] == [NUM_NEW, NUM_NEW]
    # Completion 1's seed INT64_MAX + 1 wraps to INT64_MIN: the same tokens as a
    # request seeded INT64_MIN (seeded noise depends only on seed and position).
    alone = [llm.generate("Hello", sampled(seed=s), use_tqdm=False)[0].outputs[0].token_ids
             for s in (INT64_MAX, INT64_MIN)]
    assert [c.token_ids for c in out.outputs] == alone
    assert alone[0] != alone[1]  # the seeds do matter


def test_core_process_carries_int64_edges_and_refuses_beyond(llm: LLM) -> None:
    engine = LLMEngine.from_engine_args(EngineArgs(**ENGINE), multiprocess=True)
    try:
        for bad in (lambda: engine.add_request("b1", "hi", sampled(), priority=2 ** 64),
                    lambda: engine.add_request("b2", "hi\udfff", sampled())):
            with pytest.raises(ValueError, match="^(priority|prompt) "):
                bad()
        last = llm.llm_engine.model_config.vocab_size - 1
        params = sampled(seed=INT64_MAX, n=2, top_k=INT64_MAX, stop_token_ids=[last],
                         output_kind=RequestOutputKind.FINAL_ONLY)
        engine.add_request("edge", "Hello", params, priority=INT64_MIN, cache_salt="s")
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                final = out if out.finished else final
        assert final is not None and final.request_id == "edge"
        # Same dummy weights, same seeds: the same tokens as the in-process engine.
        expected = llm.generate("Hello", sampled(seed=INT64_MAX, n=2), use_tqdm=False)[0]
        assert [c.token_ids for c in final.outputs] == [c.token_ids for c in expected.outputs]
    finally:
        engine.shutdown()
