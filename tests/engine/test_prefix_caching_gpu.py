"""Prefix caching, preemption and swap on the GPU path (Triton attention, CUDA
graphs, pinned host swap space) with a random tiny Llama, float32: greedy
outputs with caching on equal those with caching off. GPU only."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams

pytestmark = pytest.mark.gpu
NUM_NEW = 24


@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                      initializer_range=0.2, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny_llama_pc")
    LlamaForCausalLM(cfg).float().save_pretrained(path)
    return str(path)


def _llm(path: str, **kw) -> LLM:
    args = dict(device="cuda", dtype="float32", skip_tokenizer_init=True, max_model_len=256, block_size=16,
                kv_cache_memory=64 << 20, max_num_batched_tokens=128, max_num_seqs=8)
    args.update(kw)
    return LLM(path, **args)


def test_gpu_caching_on_equals_off_with_preemption_and_swap(tiny_llama_path):
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 512, (100,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, 512, (n,), generator=gen).tolist() for n in (1, 5, 17, 30, 44, 60)]
    prompts += [prompts[2], torch.randint(0, 512, (70,), generator=gen).tolist()]
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in _llm(tiny_llama_path, enable_prefix_caching=False)
           .generate(prompts, params, use_tqdm=False)]
    tight = dict(num_gpu_blocks_override=12, max_model_len=192, max_num_batched_tokens=64)
    runs = {
        "cached": _llm(tiny_llama_path),
        "recompute": _llm(tiny_llama_path, **tight),
        "swap": _llm(tiny_llama_path, **tight, preemption_mode="swap", swap_space=1 << 20,
                     scheduling_policy="priority"),
    }
    for name, llm in runs.items():
        prio = [i % 3 for i in range(len(prompts))] if name == "swap" else None
        outs = llm.generate(prompts, params, use_tqdm=False, priority=prio)
        assert [o.outputs[0].token_ids for o in outs] == ref, name
        stats = llm.get_stats()
        assert stats.prefix_cache.hits > 0, name
        if name != "cached":
            assert stats.num_preemptions > 0, name
        if name == "swap":
            assert stats.num_swap_outs > 0 and stats.num_swap_ins == stats.num_swap_outs
        pool = llm.llm_engine.engine_core.scheduler.kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_blocks
