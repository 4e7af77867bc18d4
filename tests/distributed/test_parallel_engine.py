"""The whole engine over several CPU worker processes (gloo): the offline
``LLM`` with ``tensor_parallel_size=2`` (the multiprocess executor, one worker
per rank) gives the same greedy tokens as the in-process engine at
``tensor_parallel_size=1``, with log-probabilities within float32 noise, on
tiny random Llama (GQA, one KV head per rank), Qwen3 (q/k norms, tied head),
Qwen3-MoE (experts split per rank, or whole experts per rank with expert
parallelism, in its all-reduce and its all-to-all form) and DeepSeek-V3
(MLA, grouped routing, shared experts) checkpoints. Three prompts run
together under a token budget of 8, so steps mix chunked prefills with
decodes.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ember import LLM, SamplingParams
from tests.models import test_deepseek_v3, test_qwen3_moe
from tests.models.tiny import BLOCK_SIZE, KV_CACHE_BYTES, make_prompts, one_thread, randomize_norms_, save_tiny

pytestmark = pytest.mark.slow

NUM_NEW = 6
PROMPTS = make_prompts(lengths=(5, 13, 22))


def _llama():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.2, tie_word_embeddings=False))
    randomize_norms_(hf)
    return hf


def _qwen3():
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                      max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=True))
    randomize_norms_(hf)
    return hf


MODELS = {
    "llama": _llama,
    "qwen3": _qwen3,
    "qwen3_moe": lambda: test_qwen3_moe.tiny_model(),
    "deepseek_v3": lambda: test_deepseek_v3.tiny_model(test_deepseek_v3.tiny_config()),
}


def generate(path: str, min_preemptions: int = 0, prompts: list[list[int]] = PROMPTS,
             **kwargs) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probabilities for ``prompts``, all at
    once; asserts the engine preempted at least ``min_preemptions`` times."""
    kwargs = dict(kv_cache_memory=KV_CACHE_BYTES) | kwargs
    llm = LLM(path, dtype="float32", block_size=BLOCK_SIZE, max_num_batched_tokens=8, **kwargs)
    try:
        params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=0)
        outs = llm.generate([list(p) for p in prompts], params, use_tqdm=False)
        assert llm.get_stats().num_preemptions >= min_preemptions
    finally:
        llm.llm_engine.shutdown()
    return [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs])
            for o in outs]


def assert_same(ours: list, ref: list) -> None:
    for i, ((toks, lps), (ref_toks, ref_lps)) in enumerate(zip(ours, ref)):
        assert toks == ref_toks, f"prompt {i}: {toks} != {ref_toks}"
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("parallel_engine")
    return {name: save_tiny(make(), root / name, max_shard_size="200KB") for name, make in MODELS.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_tensor_parallel_2_equals_1(checkpoints: dict[str, str], name: str) -> None:
    with one_thread():
        ref = generate(checkpoints[name])
    assert min(len(set(t)) for t, _ in ref) >= 2, f"degenerate reference: {ref}"
    assert_same(generate(checkpoints[name], tensor_parallel_size=2), ref)
    if name in ("qwen3_moe", "deepseek_v3"):
        assert_same(generate(checkpoints[name], tensor_parallel_size=2, enable_expert_parallel=True), ref)
        # The all-to-all form on every step: decode steps of 3, 2 and 1 tokens
        # (odd counts; at 1 token rank 1 owns none) and chunked prefills.
        assert_same(generate(checkpoints[name], tensor_parallel_size=2, enable_expert_parallel=True,
                             expert_parallel_dispatch="alltoall"), ref)


def test_tensor_parallel_with_preemption(checkpoints: dict[str, str]) -> None:
    """A KV cache of 10 blocks (40 tokens) for three requests that need 58:
    requests are preempted and recomputed, on both ranks alike."""
    tight = dict(num_gpu_blocks_override=10, max_model_len=32, min_preemptions=1)
    with one_thread():
        ref = generate(checkpoints["llama"], **tight)
    assert_same(generate(checkpoints["llama"], tensor_parallel_size=2, **tight), ref)


@pytest.mark.parametrize("name", ["llama", "qwen3", "deepseek_v3"])
def test_pipeline_parallel_2_equals_1(checkpoints: dict[str, str], name: str) -> None:
    with one_thread():
        ref = generate(checkpoints[name])
    assert_same(generate(checkpoints[name], pipeline_parallel_size=2), ref)


def test_tensor_2_by_pipeline_2_equals_1(checkpoints: dict[str, str]) -> None:
    """Four ranks: two stages of two tensor-parallel ranks each."""
    with one_thread():
        ref = generate(checkpoints["qwen3_moe"])
    assert_same(generate(checkpoints["qwen3_moe"], tensor_parallel_size=2, pipeline_parallel_size=2), ref)


# Eight prompts of 3-20 tokens: with 4-token blocks they need 37 blocks for
# their prompts and NUM_NEW tokens, and the KV cache below holds 12.
BUNDLED_PROMPTS = make_prompts(lengths=(3, 7, 11, 16, 5, 20, 9, 14), seed=1)
TIGHT_BUNDLED = dict(max_model_len=32, num_gpu_blocks_override=12, min_preemptions=1, prompts=BUNDLED_PROMPTS)


@pytest.mark.parametrize("model", ["smollm2", "qwen"])
def test_bundled_models_split_over_ranks_equal_one_rank(model: str, request, capfd) -> None:
    """Both bundled models over 8 prompts at once, with chunked prefill (a
    token budget of 8) and a KV cache too small for all of them (requests are
    preempted and recomputed): two pipeline stages, and for Qwen2.5-Coder also
    two tensor-parallel ranks, give one rank's greedy tokens, log-probabilities
    within 1e-4 in float32. (SmolLM2's 9 query heads do not split over 2.)

    Qwen2.5-Coder-0.5B over two tensor-parallel ranks: 14 query heads and 2 KV
    heads (7 and one KV head per rank), the 151,936-token vocabulary split in
    two. Each rank keeps only its half of every projection, and reads and
    dequantizes only that half of the file's tensors (its log line says how
    much it read: about half; the Q4_K/Q6_K down projections split inside a
    block, so both ranks read the block they share)."""
    path = request.getfixturevalue(f"{model}_path")
    with one_thread():
        ref = generate(path, **TIGHT_BUNDLED)
    assert min(len(set(t)) for t, _ in ref) >= 2, f"degenerate reference: {ref}"
    assert_same(generate(path, pipeline_parallel_size=2, **TIGHT_BUNDLED), ref)
    if model == "qwen":
        capfd.readouterr()
        assert_same(generate(path, tensor_parallel_size=2, **TIGHT_BUNDLED), ref)
        reads = re.findall(r"read ([\d.]+) of ([\d.]+) MiB of tensor data", capfd.readouterr().err)
        assert len(reads) == 2, reads  # one line per worker
        for done, whole in reads:
            assert 0.45 < float(done) / float(whole) < 0.55, reads


def test_bundled_qwen_coder_tensor_parallel_2_grammar_and_embeddings(qwen_path: str) -> None:
    """Over the multiprocess executor, a grammar-constrained request gets its
    token masks on every rank that samples (the output is one of the choices,
    as at one rank), and a pooling request returns the embedding one rank gives."""
    from ember.pooling_params import PoolingParams
    from ember.sampling_params import StructuredOutputsParams

    kwargs = dict(max_model_len=64, kv_cache_memory=16 << 20)
    prompt = "Is the sky blue? Answer:"
    params = SamplingParams(temperature=0, max_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["yes, it is", "no"]))
    results = []
    for tp in (1, 2):
        llm = LLM(qwen_path, tensor_parallel_size=tp, **kwargs)
        try:
            text = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
            pooled = llm.embed([prompt], PoolingParams(pooling_type="MEAN"), use_tqdm=False)[0].pooled_output
        finally:
            llm.llm_engine.shutdown()
        results.append((text, torch.tensor(pooled)))
    (text1, emb1), (text2, emb2) = results
    assert text1 in ("yes, it is", "no") and text2 == text1
    torch.testing.assert_close(emb2, emb1, atol=1e-4, rtol=1e-4)


def test_pipeline_keeps_micro_batches_in_flight(checkpoints: dict[str, str]) -> None:
    """With two stages the engine keeps up to two steps in flight, over
    different requests (micro-batches), also while requests are preempted
    and recomputed; tokens stay those of one process."""
    tight = dict(num_gpu_blocks_override=10, max_model_len=32)
    with one_thread():
        ref = generate(checkpoints["llama"], min_preemptions=1, **tight)
    llm = LLM(checkpoints["llama"], dtype="float32", block_size=BLOCK_SIZE, max_num_batched_tokens=8,
              pipeline_parallel_size=2, kv_cache_memory=KV_CACHE_BYTES, **tight)
    depths = []
    llm.llm_engine.engine_core.add_step_observer(lambda record: depths.append(record.launched_ahead))
    try:
        params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=0)
        outs = llm.generate([list(p) for p in PROMPTS], params, use_tqdm=False)
        assert llm.get_stats().num_preemptions >= 1
    finally:
        llm.llm_engine.shutdown()
    # A step collected while another was in flight behind it.
    assert sum(depths) >= 3, depths
    assert_same([(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs], ref)
