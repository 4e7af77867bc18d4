"""The whole GPU path (Triton attention, CUDA graphs, packed batches) against
HF transformers on the same random tiny Llama, float32. GPU only."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine.step_stats import StepTimes
from tests.models.tiny import hf_greedy

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                      initializer_range=0.2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return str(path), model.cuda().eval()


@pytest.mark.parametrize("enforce_eager,async_scheduling,piecewise",
                         [(False, True, True), (True, True, True), (False, False, True), (False, True, False)])
def test_gpu_greedy_matches_hf(tiny_llama, enforce_eager, async_scheduling, piecewise):
    path, hf = tiny_llama
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (1, 15, 17, 100, 600)]
    refs = [hf_greedy(hf, p, 32) for p in prompts]
    llm = LLM(path, device="cuda", dtype="float32", skip_tokenizer_init=True, max_model_len=1024,
              kv_cache_memory=64 << 20, max_num_batched_tokens=128, max_num_seqs=8, enforce_eager=enforce_eager,
              async_scheduling=async_scheduling, piecewise_cuda_graphs=piecewise)
    times = StepTimes()
    llm.llm_engine.engine_core.add_step_observer(times)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    together = llm.generate(prompts, params, use_tqdm=False)
    for i, (out, ref) in enumerate(zip(together, refs)):
        assert out.outputs[0].token_ids == ref, f"prompt {i}"
    again = llm.generate(prompts, params, use_tqdm=False)  # prefix-cache hits: extend over cached context
    for i, (out, ref) in enumerate(zip(again, refs)):
        assert out.outputs[0].token_ids == ref, f"prompt {i}, with its prefix cached"
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert (runner.cuda_graphs is None) == enforce_eager
    graphed = not enforce_eager and piecewise
    assert (runner.piecewise_graphs is not None) == graphed
    if graphed:  # chunks of 128 tokens with decodes: the steps with prefill tokens replayed pieces
        assert runner.piecewise_graphs.num_runs > 0
    assert (times.num_steps_ahead > 0) == async_scheduling


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_gpu_fp8_kv_cache_matches_torch_backend(tiny_llama, kv_cache_dtype):
    """FP8 cache: the Triton path (graphs, piecewise, async) gives the greedy
    tokens of the plain-PyTorch backend over the same FP8 cache (float32 model;
    the attention math itself is checked in tests/kernels/)."""
    path, _ = tiny_llama
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (1, 17, 100, 600)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = {}
    for backend in ("triton", "torch"):
        llm = LLM(path, device="cuda", dtype="float32", skip_tokenizer_init=True, max_model_len=1024,
                  kv_cache_memory=64 << 20, max_num_batched_tokens=128, max_num_seqs=8,
                  kv_cache_dtype=kv_cache_dtype, attention_backend=backend, enforce_eager=backend == "torch")
        assert llm.llm_engine.engine_core.executor.worker.model_runner.kv_caches[0].element_size() == 1
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    assert outs["triton"] == outs["torch"]


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_gpu_embeddings_match_hf_next_to_decoding(tiny_llama, pooling_type):
    """Pooling requests on CUDA (CUDA graphs, asynchronous scheduling, chunked
    prompts) next to decoding ones: the pooled vectors equal HF's
    ``last_hidden_state`` pooled the same way, and the decodes stay greedy-exact."""
    from ember.pooling_params import PoolingParams

    path, hf = tiny_llama
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (1, 17, 300)]
    llm = LLM(path, device="cuda", dtype="float32", skip_tokenizer_init=True, max_model_len=1024,
              kv_cache_memory=64 << 20, max_num_batched_tokens=128, max_num_seqs=8)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    pooling = PoolingParams(pooling_type, normalize=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"gen{i}", p, params)
        engine.add_request(f"emb{i}", p, None, pooling_params=pooling)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            hidden = hf.model(input_ids=torch.tensor([p], device="cuda")).last_hidden_state[0].float()
            ref = hidden[-1] if pooling_type == "LAST" else hidden.mean(dim=0)
            got = torch.tensor(finals[f"emb{i}"].pooled_output, device="cuda")
            torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
            assert finals[f"gen{i}"].outputs[0].token_ids == hf_greedy(hf, p, 16), f"prompt {i}"
    assert engine.engine_core.scheduler.kv_cache_manager.usage == 0
