"""Tiny DeepSeek-V3 through the engine with the Triton MLA backend forced on
CPU (its kernels in Triton's interpreter): greedy tokens equal those of the
plain-PyTorch backend, a batch of prompts together (decode steps, mixed
steps with prompt chunks) and with speculative decoding by its MTP layer
(verification steps through the kernel's multi-row mode)."""

from __future__ import annotations

import pytest

from ember import SamplingParams
from tests.models.test_deepseek_v3 import tiny_config, tiny_model
from tests.models.tiny import ember_llm, make_prompts, one_thread, runner_of, save_tiny

pytest.importorskip("triton")


def _greedy(path: str, backend: str, n: int = 8, **kwargs) -> list[list[int]]:
    llm = ember_llm(path, attention_backend=backend, max_num_batched_tokens=32, **kwargs)
    from ember.layers.attention.mla import MLAAttention

    impls = {type(m.impl).__name__ for m in runner_of(llm).model.modules() if isinstance(m, MLAAttention)}
    assert impls == {"TritonMLABackend" if backend == "triton" else "TorchMLABackend"}
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    with one_thread():
        outs = llm.generate([list(p) for p in make_prompts()], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_triton_mla_greedy_equals_torch(tmp_path):
    path = save_tiny(tiny_model(tiny_config()), tmp_path)
    assert _greedy(path, "triton") == _greedy(path, "torch")


def test_triton_mla_mtp_speculation_greedy_equals_torch(tmp_path):
    """MTP speculation (k = 3) on the Triton MLA backend: verification steps of
    several rows per request and the MTP layer's own MLA steps through the
    kernel; greedy output equals the torch backend without speculation."""
    from tests.models.test_deepseek_mtp import write_mtp_checkpoint
    from tests.models.tiny import make_tokenizer

    path, target, _, _ = write_mtp_checkpoint(tmp_path / "ckpt")
    make_tokenizer(target.config.vocab_size).save_pretrained(path)
    spec = {"method": "mtp", "num_speculative_tokens": 3}
    got = _greedy(str(path), "triton", n=10, speculative_config=spec)
    assert got == _greedy(str(path), "torch", n=10)
