"""Qwen2 (``Qwen2ForCausalLM``): Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen.

Same layer stack as Llama except that the Q/K/V projections carry a bias
(HF transformers' ``modeling_qwen2``); the output projection has none.
"""

from __future__ import annotations

from ember.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
