"""Ember vs HF transformers on the two bundled GGUF models (float32).

HF loads the same GGUF file (``gguf_file=``), dequantized to float32, and is
the independent reference: greedy tokens must match for 64 steps and prefill
logits within 1e-3 relative error.
"""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from tests.models.prompts import CHAT_PROMPTS, RAW_PROMPTS
from tests.models.tiny import hf_greedy, load_hf_gguf

pytestmark = pytest.mark.slow
NUM_NEW = 64


@pytest.fixture(scope="module", params=["smollm2", "qwen"])
def pair(request, smollm2_path, qwen_path):
    path = smollm2_path if request.param == "smollm2" else qwen_path
    llm = LLM(path, dtype="float32", max_model_len=2048, kv_cache_memory=256 << 20)
    hf = load_hf_gguf(path)
    tok = llm.get_tokenizer()
    ip = llm.llm_engine.input_processor
    prompts = [ip.tokenize(p) for p in RAW_PROMPTS] + [ip.apply_chat_template(m) for m in CHAT_PROMPTS]
    assert max(len(p) for p in prompts) > 300, "need several-hundred-token prompts"
    refs = [hf_greedy(hf, p, NUM_NEW) for p in prompts]
    yield llm, hf, tok, prompts, refs
    del hf


def test_greedy_matches_hf(pair):
    llm, _, _, prompts, refs = pair
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    outs = llm.generate([list(p) for p in prompts], params, use_tqdm=False)
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.outputs[0].token_ids == ref, f"prompt {i} diverged"
        assert out.outputs[0].finish_reason == "length"


def test_prefill_logits_match_hf(pair):
    llm, hf, _, prompts, _ = pair
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    for p in (prompts[2], prompts[4]):
        ours = runner.compute_prompt_logits(p)
        with torch.inference_mode():
            ref = hf(input_ids=torch.tensor([p])).logits[0].float()
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < 1e-3, f"relative logit error {rel:.2e}"


def test_chat_template_and_text(pair):
    llm, _, tok, _, _ = pair
    out = llm.chat(CHAT_PROMPTS[0], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
