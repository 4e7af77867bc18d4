"""``tokenizer=`` (``--tokenizer``): a preset with dummy weights served as text
through another model's tokenizer, as the GPU serving benchmarks do."""

from __future__ import annotations

import pytest

from ember import LLM, SamplingParams
from ember.config import ConfigError
from ember.loader import ModelLoadError, load_tokenizer_for

# Qwen3-8B's layout at toy width (its vocabulary, 151936, is the Qwen2.5 tokenizer's).
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}


def test_preset_with_a_bundled_tokenizer(qwen_path: str) -> None:
    llm = LLM("Qwen3-8B", load_format="dummy", hf_overrides=TINY, max_model_len=128, kv_cache_memory=8 << 20,
              tokenizer="Qwen2.5-Coder-0.5B-Instruct")
    tok = llm.get_tokenizer()
    assert tok is not None and tok.vocab_size > 150_000
    out = llm.generate("Hello, world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == tok.encode("Hello, world")
    completion = out.outputs[0]
    assert len(completion.token_ids) == 8
    assert completion.text == tok.decode(completion.token_ids, skip_special_tokens=True)


def test_preset_without_tokenizer_takes_token_ids() -> None:
    llm = LLM("Qwen3-8B", load_format="dummy", hf_overrides=TINY, max_model_len=128, kv_cache_memory=8 << 20)
    assert llm.get_tokenizer() is None
    with pytest.raises(ValueError, match="token ids"):
        llm.generate("text", SamplingParams(max_tokens=2), use_tqdm=False)


def test_bad_tokenizer_source(tmp_path) -> None:
    with pytest.raises(ModelLoadError):
        load_tokenizer_for("SmolLM2-135M-Instruct", str(tmp_path))  # an empty directory
    with pytest.raises((ModelLoadError, ConfigError)):
        load_tokenizer_for("SmolLM2-135M-Instruct", "Llama-3.1-8B")  # a preset has none
