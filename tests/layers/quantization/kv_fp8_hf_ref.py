"""Independent reference for the FP8 KV cache on real text: HF transformers'
Qwen2 with each layer's keys (after RoPE) and values rounded to
``float8_e4m3fn`` with that layer's scales (``x / scale`` to e4m3 and back
times ``scale``: what the cache stores and attention reads), perplexity over
the sliding windows of :func:`ember.entrypoints.bench.perplexity.perplexity`.

The model comes from :func:`tests.models.tiny.load_hf_gguf`. Used by
``test_perplexity.py`` (with the scales Ember calibrated) and by
``benchmarks/perplexity_kv_fp8_hf.py`` (scales of 1).
"""

from __future__ import annotations

import math

import torch
import transformers.models.qwen2.modeling_qwen2 as qwen2
from transformers import Qwen2ForCausalLM

from ember.entrypoints.bench.perplexity import sliding_windows


def _round_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale


@torch.inference_mode()
def hf_perplexity(model: Qwen2ForCausalLM, token_ids: list[int], context_length: int, stride: int,
                  kv_scales: list[tuple[float, float]] | None = None) -> float:
    """Perplexity of ``token_ids`` (windows of ``context_length`` tokens every
    ``stride``), with the KV cache rounded to e4m3 when ``kv_scales`` gives one
    ``(k_scale, v_scale)`` per decoder layer (float32 when ``None``).

    Raises:
        ValueError: ``kv_scales`` does not have one pair per layer.
    """
    layers = model.model.layers
    if kv_scales is not None and len(kv_scales) != len(layers):
        raise ValueError(f"kv_scales has {len(kv_scales)} pairs for {len(layers)} layers")
    rope, hooks, current_k_scale = qwen2.apply_rotary_pos_emb, [], [1.0]

    def rope_then_round_k(q, k, *args, **kwargs):
        q, k = rope(q, k, *args, **kwargs)
        return q, _round_fp8(k, current_k_scale[0])

    if kv_scales is not None:
        qwen2.apply_rotary_pos_emb = rope_then_round_k
        for layer, (k_scale, v_scale) in zip(layers, kv_scales):
            hooks.append(layer.self_attn.register_forward_pre_hook(
                lambda _m, _a, s=k_scale: current_k_scale.__setitem__(0, s)))
            hooks.append(layer.self_attn.v_proj.register_forward_hook(
                lambda _m, _i, out, s=v_scale: _round_fp8(out, s)))
    total, count = 0.0, 0
    try:
        for w in sliding_windows(len(token_ids), context_length, stride):
            logits = model(input_ids=torch.tensor([token_ids[w.begin: w.end]])).logits[0]
            logprobs = logits.float().log_softmax(-1)
            for t in range(w.first_scored, w.end):
                total -= float(logprobs[t - w.begin - 1, token_ids[t]])
                count += 1
    finally:
        qwen2.apply_rotary_pos_emb = rope
        for h in hooks:
            h.remove()
    return math.exp(total / count)
