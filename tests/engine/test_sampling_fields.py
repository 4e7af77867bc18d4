"""vLLM's sampling fields offline (``LLM.generate`` / ``LLM.chat`` with
``SamplingParams``) on the bundled SmolLM2 in float32: ``logit_bias``,
``min_tokens``, ``bad_words`` (also under asynchronous scheduling, where the
request's steps wait for its tokens), ``include_stop_str_in_output``,
``truncate_prompt_tokens`` and ``prompt_logprobs`` against HF transformers'
``log_softmax`` of the prompt within 1e-4."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from tests.models.tiny import load_hf_gguf

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, dtype="float32", max_model_len=256, block_size=16, kv_cache_memory=32 << 20)


def _one(llm, prompt, **kwargs):
    return llm.generate(prompt, SamplingParams(temperature=0, **kwargs), use_tqdm=False)[0]


def test_logit_bias_bans_and_forces(llm):
    base = _one(llm, PROMPT, max_tokens=6).outputs[0]
    banned = _one(llm, PROMPT, max_tokens=6, logit_bias={base.token_ids[0]: -100}).outputs[0]
    assert base.token_ids[0] not in banned.token_ids
    tok = llm.get_tokenizer()
    (berlin,) = tok.encode(" Berlin", add_special_tokens=False)
    forced = _one(llm, PROMPT, max_tokens=3, logit_bias={berlin: 100.0}, logprobs=0).outputs[0]
    assert forced.token_ids == [berlin] * 3 and forced.text == " Berlin" * 3
    # The reported log-probabilities are the model's own, not the biased ones.
    assert forced.logprobs[0].logprob < -1 and forced.logprobs[0].rank > 1


def test_min_tokens_and_stop_strings(llm):
    free = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "stop" and len(free.token_ids) < 30
    longer = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=64, min_tokens=40),
                      use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) > 40 and longer.text.startswith(free.text)
    assert 2 not in longer.token_ids[:40]  # <|im_end|>, the chat's EOS
    # A stop string is not looked for in the first min_tokens tokens' text.
    base = _one(llm, PROMPT, max_tokens=8).outputs[0]
    assert base.text.startswith(" Paris.") and llm.get_tokenizer().decode(base.token_ids[1]) == "."
    early = _one(llm, PROMPT, max_tokens=8, stop=["."], min_tokens=1).outputs[0]
    assert (early.text, early.finish_reason) == (" Paris", "stop")
    late = _one(llm, PROMPT, max_tokens=8, stop=["."], min_tokens=2).outputs[0]
    assert late.text.startswith(" Paris.") and len(late.token_ids) > 2  # its "." is the 2nd token


def test_bad_words_sync_and_async(smollm2_path, llm):
    base = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0].text
    assert "capital of" in base and "Paris" in base
    params = SamplingParams(temperature=0, max_tokens=24, bad_words=["capital of", "Paris"])
    sync = llm.chat(QUESTION, params, use_tqdm=False)[0].outputs[0]
    assert sync.text and "capital of" not in sync.text and "Paris" not in sync.text
    assert params._bad_words_token_ids and any(len(s) > 1 for s in params._bad_words_token_ids)
    asynchronous = LLM(smollm2_path, dtype="float32", max_model_len=256, block_size=16, kv_cache_memory=32 << 20,
                       async_scheduling=True)
    out = asynchronous.chat(QUESTION, [params], use_tqdm=False)[0].outputs[0]
    assert out.token_ids == sync.token_ids


def test_include_stop_str_in_output(llm):
    cut = _one(llm, PROMPT, max_tokens=8, stop=["."]).outputs[0]
    kept = _one(llm, PROMPT, max_tokens=8, stop=["."], include_stop_str_in_output=True).outputs[0]
    assert (cut.finish_reason, kept.finish_reason, kept.stop_reason) == ("stop", "stop", ".")
    assert kept.text == cut.text + "."
    eos = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=64, include_stop_str_in_output=True,
                                            skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
    assert eos.finish_reason == "stop" and eos.text.endswith("<|im_end|>")


def test_truncate_prompt_tokens(llm):
    ids = llm.get_tokenizer().encode("Once upon a time there was a king. " * 3 + PROMPT)
    out = _one(llm, ids, max_tokens=5, truncate_prompt_tokens=6)
    assert out.prompt_token_ids == ids[-6:]
    assert out.outputs[0].token_ids == _one(llm, ids[-6:], max_tokens=5).outputs[0].token_ids
    whole = _one(llm, ids, max_tokens=5, truncate_prompt_tokens=-1)  # it fits: kept whole
    assert whole.prompt_token_ids == ids
    fits = _one(llm, ids, max_tokens=250, truncate_prompt_tokens=-1)  # 256 - 250 tokens are left
    assert fits.prompt_token_ids == ids[-6:]
    with pytest.raises(ValueError, match="truncate_prompt_tokens \\(300\\) is greater than the context window"):
        _one(llm, ids, max_tokens=5, truncate_prompt_tokens=300)


def test_prompt_logprobs_match_hf_within_1e4(smollm2_path, llm):
    hf = load_hf_gguf(smollm2_path)
    prompt = llm.get_tokenizer().encode("The three most useful things to pack for a long hike are water, food")
    out = _one(llm, prompt, max_tokens=1, prompt_logprobs=3)
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([prompt])).logits[0].float().log_softmax(dim=-1)
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    for pos in range(1, len(prompt)):
        lp = plp[pos]
        assert lp.token_id == prompt[pos]
        assert abs(lp.logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
        assert len(lp.top) == 3
        for tok, value in lp.top:
            assert abs(value - ref[pos - 1, tok].item()) < 1e-4
        assert torch.allclose(torch.tensor([v for _, v in lp.top]), ref[pos - 1].topk(3).values, atol=1e-4)
